"""The Pareto front of a search with several objectives: the finished trials that meet every constraint and that
no other such trial dominates (at least as good in every objective, better in one)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from kdray.schema import Constraint
from kdray.schema.search import Objective


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether objective values ``a`` dominate ``b`` (``modes``: "max" or "min" per objective)."""
    signs = [1.0 if mode == "max" else -1.0 for mode in modes]
    better_or_equal = all(s * x >= s * y for s, x, y in zip(signs, a, b, strict=True))
    return better_or_equal and any(s * x > s * y for s, x, y in zip(signs, a, b, strict=True))


def feasible(values: dict[str, float], constraints: Sequence[Constraint]) -> bool:
    """Whether every constraint holds (a metric that is missing breaks its constraint)."""
    return all(c.metric in values and c.excess(values[c.metric]) <= 0 for c in constraints)


def front(
    points: dict[str, dict[str, float]], objectives: Sequence[Objective], constraints: Sequence[Constraint]
) -> list[str]:
    """The keys of ``points`` (each a mapping of metric -> value) on the front, in input order: every objective
    finite, every constraint met, dominated by no other such point."""
    metrics = [o.metric for o in objectives]
    modes = [o.mode for o in objectives]
    candidates = {
        key: [values[m] for m in metrics]
        for key, values in points.items()
        if all(m in values and math.isfinite(values[m]) for m in metrics) and feasible(values, constraints)
    }
    return [
        key
        for key, mine in candidates.items()
        if not any(dominates(other, mine, modes) for k, other in candidates.items() if k != key)
    ]
