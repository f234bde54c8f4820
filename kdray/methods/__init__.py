"""Distillation methods; importing this package registers every method listed here."""

from kdray.methods import kd, student_only  # noqa: F401  (registration)
from kdray.methods.base import METHODS, Method, MethodParams, StepInfo

__all__ = ["METHODS", "Method", "MethodParams", "StepInfo"]
