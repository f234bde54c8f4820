"""Architecture families with size knobs: ``student.depth`` and ``student.width`` (a search can vary them).

A family turns (depth, width) into a canonical model name, and that name into an architecture, so a sized model
is an ordinary model everywhere else (store key, listings, MLflow). Where the size is one of the registered
models the name is that model's (resnet + depth 20 + width 1 is ``resnet20``), so no existing key moves:

| family | names | depth | width |
| --- | --- | --- | --- |
| CIFAR ResNet | ``resnet{d}``, ``resnet{d}_w{x}`` | 6n+2 (8, 14, 20, 26, 32, …) | multiplies 16-16-32-64 channels |
| WRN | ``wrn_{d}_{k}`` | 6n+4 (10, 16, 22, 28, 40, …) | the widen factor k, a whole number |
| MobileNetV2 | ``mobilenetv2`` (x0.5, RepDistiller's), ``mobilenetv2_w{x}`` | – | the width multiplier |
| ShuffleNetV2 | ``shufflenetv2`` (x1), ``shufflenetv2_w{x}`` | – | 0.5, 1, 1.5 or 2 (the paper's channel tables) |
| plain CNN | ``plane{d}`` | 2, 4, 6, 8, 10 (TAKD's book) | – |

The builders are the families' own (``kdray.models.resnet``, …), called with other sizes: their code, and this
module's, enter a sized model's code version.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kdray.models.mobilenetv2 import mobilenetv2
from kdray.models.plane import PLANE_BOOK, plane_cnn
from kdray.models.registry import SIZED, ModelInfo, ModelSpec
from kdray.models.resnet import cifar_resnet
from kdray.models.shufflenet import shufflenet_v2
from kdray.models.staged import StagedNet
from kdray.models.wrn import wide_resnet

# Ma et al. 2018, Table 5: ShuffleNetV2's output channels of stages 2-4 and conv5 per width multiplier.
SHUFFLENETV2_WIDTHS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}


def _multiplier(width: float) -> str:
    return f"{width:g}"


@dataclass(frozen=True)
class Family:
    """One family: how its names read, which sizes it takes, and how a size is built."""

    label: str
    pattern: re.Pattern[str]  # a name of the family; groups "depth" and/or "width"
    default_depth: int | None
    default_width: float | None
    name: Callable[[int | None, float | None], str]
    build: Callable[[int | None, float | None, ModelInfo], StagedNet]
    depth_rule: Callable[[int], bool] = lambda depth: True
    depth_text: str = ""
    width_rule: Callable[[float], bool] = lambda width: width > 0
    width_text: str = "a multiplier > 0"
    code: tuple[str, ...] = ()

    def parse(self, name: str) -> tuple[int | None, float | None] | None:
        """The (depth, width) a name of this family stands for, or None if it is not one."""
        found = self.pattern.fullmatch(name)
        if found is None:
            return None
        groups = found.groupdict()
        depth = int(groups["depth"]) if groups.get("depth") else self.default_depth
        width = float(groups["width"]) if groups.get("width") else self.default_width
        return depth, width

    def check(self, depth: int | None, width: float | None) -> str | None:
        """Why (depth, width) is not a size of this family, or None."""
        if (depth is None) != (self.default_depth is None):
            return f"{self.label} has no depth knob" if depth is not None else f"{self.label} needs a depth"
        if (width is None) != (self.default_width is None):
            return f"{self.label} has no width knob" if width is not None else f"{self.label} needs a width"
        if depth is not None and not self.depth_rule(depth):
            return f"{self.label} takes depths {self.depth_text}, not {depth}"
        if width is not None and not self.width_rule(width):
            return f"{self.label} takes widths {self.width_text}, not {width:g}"
        return None


def _resnet_name(depth: int | None, width: float | None) -> str:
    return f"resnet{depth}" if width == 1 else f"resnet{depth}_w{_multiplier(width or 1)}"


def _scaled(channels: tuple[int, ...], width: float) -> tuple[int, ...]:
    return tuple(max(1, round(c * width)) for c in channels)


FAMILIES = (
    Family(
        "CIFAR ResNet", re.compile(r"resnet(?P<depth>\d+)(_w(?P<width>\d+(\.\d+)?))?"), 8, 1.0, _resnet_name,
        lambda d, w, info: cifar_resnet(d, _scaled((16, 16, 32, 64), w), info),  # type: ignore[arg-type]
        lambda d: d >= 8 and (d - 2) % 6 == 0, "6n+2 (8, 14, 20, 26, 32, 44, 56, 110, …)",
        code=(__name__, cifar_resnet.__module__),
    ),
    Family(
        "WRN", re.compile(r"wrn_(?P<depth>\d+)_(?P<width>\d+)"), 16, 1.0, lambda d, w: f"wrn_{d}_{int(w or 1)}",
        lambda d, w, info: wide_resnet(d, int(w), info),  # type: ignore[arg-type]
        lambda d: d >= 10 and (d - 4) % 6 == 0, "6n+4 (10, 16, 22, 28, 40, …)",
        lambda w: w >= 1 and w == int(w), "a whole widen factor ≥ 1", (__name__, wide_resnet.__module__),
    ),
    Family(
        "MobileNetV2", re.compile(r"mobilenetv2(_w(?P<width>\d+(\.\d+)?))?"), None, 0.5,
        lambda d, w: "mobilenetv2" if w == 0.5 else f"mobilenetv2_w{_multiplier(w or 0.5)}",
        lambda d, w, info: mobilenetv2(w, info),  # type: ignore[arg-type]
        code=(__name__, mobilenetv2.__module__),
    ),
    Family(
        "ShuffleNetV2", re.compile(r"shufflenetv2(_w(?P<width>\d+(\.\d+)?))?"), None, 1.0,
        lambda d, w: "shufflenetv2" if w == 1 else f"shufflenetv2_w{_multiplier(w or 1)}",
        lambda d, w, info: shufflenet_v2(info, SHUFFLENETV2_WIDTHS[w]),  # type: ignore[index]
        width_rule=lambda w: w in SHUFFLENETV2_WIDTHS, width_text="0.5, 1, 1.5 or 2",
        code=(__name__, shufflenet_v2.__module__),
    ),
    Family(
        "plain CNN", re.compile(r"plane(?P<depth>\d+)"), 2, None, lambda d, w: f"plane{d}",
        lambda d, w, info: plane_cnn(d, info),  # type: ignore[arg-type]
        lambda d: d in PLANE_BOOK, ", ".join(map(str, PLANE_BOOK)),
        code=(__name__, plane_cnn.__module__),
    ),
)  # fmt: skip


def family_of(name: str) -> tuple[Family, int | None, float | None] | None:
    """The family of a model name with the size it stands for, or None (no size knobs)."""
    for family in FAMILIES:
        size = family.parse(name)
        if size is not None:
            return family, *size
    return None


def sized_name(name: str, depth: int | None, width: float | None) -> str:
    """``name`` resized: the given depth and/or width replace the ones the name stands for. ValueError naming the
    family's sizes where ``name`` has no such knob or the size is not one of its own."""
    found = family_of(name)
    if found is None:
        raise ValueError(f"{name} has no size knobs (families with depth/width: {', '.join(_labels())})")
    family, own_depth, own_width = found
    depth = own_depth if depth is None else depth
    width = own_width if width is None else width
    problem = family.check(depth, width)
    if problem is not None:
        raise ValueError(problem)
    return family.name(depth, width)


def _labels() -> list[str]:
    return [family.label for family in FAMILIES]


def _sized_spec(name: str) -> ModelSpec | None:
    """The architecture of a sized name that is not registered itself (``resnet20_w0.5``, ``wrn_22_2``)."""
    found = family_of(name)
    if found is None:
        return None
    family, depth, width = found
    if family.check(depth, width) is not None or family.name(depth, width) != name:
        return None  # not a size of the family, or not its canonical spelling (resnet20_w1)
    return ModelSpec(
        lambda info: family.build(depth, width, info),
        f"{family.label} at depth {depth}, width {width}" if depth is not None else f"{family.label} x{width:g}",
        onthefly=family.label in ("CIFAR ResNet", "WRN", "plain CNN"),
        code=family.code,
    )


SIZED.append(_sized_spec)
