"""Distillation methods. Importing this package imports every module in it, and each registers its own
methods (``@METHODS.register``): a new method is one new file here, or one file in a package of your own
declared under the entry-point group ``kdray.methods``."""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from kdray.methods.base import METHODS, Method, MethodParams, Planner, StepInfo

ENTRY_POINT_GROUP = "kdray.methods"


def _import_package_modules() -> None:
    for module in pkgutil.iter_modules(__path__):  # shared code (base, losses) registers nothing
        importlib.import_module(f"{__name__}.{module.name}")


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


def params_model(name: str) -> type[MethodParams]:
    """The parameter model of method ``name`` (installed packages' methods included); ValueError naming the
    choices for an unknown name."""
    load_installed()  # packages installed since kdray.methods was imported
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS.names())}")
    return METHODS[name].Params


_import_package_modules()
load_installed()

__all__ = ["METHODS", "Method", "MethodParams", "Planner", "StepInfo", "load_installed", "params_model"]
