"""The model registry, and how a model name becomes an architecture.

A name is one of kdray's own architectures (``kdray models``), ``torchvision.<name>``, ``timm.<name>``
(with timm installed), ``package.module:callable`` (a function or class returning an ``nn.Module``), or a
name an installed package registers under the entry-point group ``kdray.models``. Every architecture is
built as a ``StagedNet`` (``kdray.models.foreign`` splits the ones written elsewhere into stages).

Each architecture also has a code version, part of every store key that holds its weights: a changed
definition (of a layer, an initialisation, a block order) never silently reuses weights trained by the old one.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from types import ModuleType

from kdray.models import foreign
from kdray.models.spec import ModelInfo, ModelSpec
from kdray.models.staged import StagedNet
from kdray.registry import Registry

ENTRY_POINT_GROUP = "kdray.models"


MODELS: Registry[ModelSpec] = Registry("model")
# Readers of sized names of kdray's families (``resnet20_w0.5``): each returns the architecture, or None for a
# name that is not one of its sizes. ``kdray.models.families`` adds its reader when imported.
SIZED: list[Callable[[str], ModelSpec | None]] = []


def model_spec(name: str) -> ModelSpec:
    """The architecture called ``name`` (see the module docstring); ValueError naming the choices otherwise."""
    if name in MODELS:
        return MODELS[name]
    for reader in SIZED:
        sized = reader(name)
        if sized is not None:
            return sized
    return _outside_spec(name)


@functools.cache
def _outside_spec(name: str) -> ModelSpec:
    if name.startswith("torchvision."):
        return foreign.torchvision_spec(name.removeprefix("torchvision."))
    if name.startswith("timm."):
        return foreign.timm_spec(name.removeprefix("timm."))
    if ":" in name:
        return foreign.callable_spec(name, foreign.import_callable(name))
    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return foreign.callable_spec(f"{entry.value} (entry point {name})", entry.load())
    raise ValueError(
        f"unknown model '{name}'; choose one of: {', '.join(MODELS.names())}, or torchvision.<name>, timm.<name>, "
        f"package.module:callable, or a '{ENTRY_POINT_GROUP}' entry point"
    )


def require_model(name: str) -> str:
    """``name`` if it names an architecture (a pydantic validator), else ValueError."""
    model_spec(name)
    return name


def installed_models() -> dict[str, str]:
    """Models registered by installed packages (entry-point group ``kdray.models``): name -> target."""
    return {entry.name: entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)}


def build_model(name: str, info: ModelInfo) -> StagedNet:
    """Build a freshly initialised ``name`` for ``info`` (call ``torch.manual_seed`` first to fix it)."""
    if info.image_size < 8:
        raise ValueError(f"images must be at least 8x8, got {info.image_size}x{info.image_size}")
    spec = model_spec(name)
    if info.onthefly and not spec.onthefly:
        raise ValueError(f"{name}: 1xN on-the-fly filters exist only in kdray's resnet, wrn, plane and vgg families")
    if not info.batchnorm and not spec.native:
        raise ValueError(f"{name}: batchnorm=false applies only to kdray's own architectures")
    return spec.build(info)


def code_version(name: str) -> str:
    """A digest of the code that defines ``name`` (docstrings, comments and layout left out), and of the
    library version for torchvision/timm models: part of the store key of every model of this architecture."""
    spec = model_spec(name)
    modules = spec.code or (spec.build.__module__,)
    digest = hashlib.blake2b(spec.version_tag.encode(), digest_size=8)
    for module_name in sorted({*modules, StagedNet.__module__}):
        digest.update(_code_digest(sys.modules.get(module_name) or __import__(module_name, fromlist=["_"])).encode())
    return digest.hexdigest()


@functools.cache
def _code_digest(module: ModuleType) -> str:
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):  # no source (a compiled or interactive module): its name stands in
        return module.__name__
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return hashlib.blake2b(ast.dump(tree).encode(), digest_size=8).hexdigest()


def parameter_count(model: StagedNet) -> int:
    return sum(p.numel() for p in model.parameters())
