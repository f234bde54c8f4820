"""Distillation methods; importing this package registers every method, in the order listed here."""

# isort: off
from kdray.methods import (  # noqa: F401  (registration; the order is the order of `kdray methods`)
    student_only,
    kd,
    triplet,
    feature_mixup,
    stkd,
    chains,
    pacemaker,
    online_branch,
    dml,
)

# isort: on
from kdray.methods.base import METHODS, Method, MethodParams, StepInfo

__all__ = ["METHODS", "Method", "MethodParams", "StepInfo"]
