"""Distillation methods; importing this package registers every method, in the order listed here."""

# isort: off
from kdray.methods import (  # noqa: F401  (registration; the order is the order of `kdray methods`)
    student_only,
    kd,
    dkd,
    dist,
    triplet,
    feature_mixup,
    stkd,
    chains,
    pacemaker,
    online_branch,
    dml,
)

# isort: on
from importlib.metadata import entry_points

from kdray.methods.base import METHODS, Method, MethodParams, StepInfo

ENTRY_POINT_GROUP = "kdray.methods"


def load_installed() -> None:
    """Register the methods installed packages declare under the entry-point group ``kdray.methods``
    (``name = "package.module:MethodClass"``): a method of your own is one file in your own package."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in METHODS:
            continue
        method = entry.load()  # a module using @METHODS.register(name) registers itself on import
        if entry.name not in METHODS:
            if not (isinstance(method, type) and issubclass(method, Method)):
                raise ValueError(f"entry point {entry.name} = {entry.value}: not a kdray Method subclass")
            METHODS.add(entry.name, method)


load_installed()

__all__ = ["METHODS", "Method", "MethodParams", "StepInfo", "load_installed"]
