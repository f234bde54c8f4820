"""Distillation methods; importing this package registers every method listed here."""

from kdray.methods import (  # noqa: F401  (registration)
    chains,
    feature_mixup,
    kd,
    online_branch,
    pacemaker,
    stkd,
    student_only,
    triplet,
)
from kdray.methods.base import METHODS, Method, MethodParams, StepInfo

__all__ = ["METHODS", "Method", "MethodParams", "StepInfo"]
