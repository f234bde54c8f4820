"""Assistant ladders for teacher-assistant chains (TAKD, Mirzadeh et al. 2020; DGKD, Son et al. 2021).

A ladder orders one family from large to small. ``assistants.depth = d`` picks d models evenly spaced
among those strictly between the teacher and the student, so d = 0 is plain KD and the largest d uses
every intermediate size.
"""

from __future__ import annotations

import math

from kdray.schema import AssistantsConfig

LADDERS: tuple[tuple[str, ...], ...] = (
    ("resnet110", "resnet56", "resnet44", "resnet32", "resnet26", "resnet20", "resnet14", "resnet8"),
    ("plane10", "plane8", "plane6", "plane4", "plane2"),
    ("wrn_40_4", "wrn_40_2", "wrn_16_2", "wrn_16_1"),
)


def intermediates(teacher: str, student: str, ladder: tuple[str, ...]) -> list[str]:
    """Models of ``ladder`` smaller than the teacher and larger than the student, largest first."""
    if student not in ladder:
        return []
    below_teacher = ladder.index(teacher) + 1 if teacher in ladder else 0
    return list(ladder[below_teacher : ladder.index(student)])


def assistant_candidates(teacher: str, student: str, assistants: AssistantsConfig) -> tuple[list[str], str]:
    """The models assistants are picked from (``assistants.models``, else the built-in ladder between teacher
    and student), largest first, and where they come from."""
    if assistants.models:
        return list(assistants.models), "assistants.models"
    ladder = next((ladder for ladder in LADDERS if student in ladder), ())
    source = f"the built-in ladder {' > '.join(ladder)}" if ladder else "no built-in ladder"
    return intermediates(teacher, student, ladder), source


def pick_assistants(teacher: str, student: str, assistants: AssistantsConfig) -> list[str]:
    """The ``depth`` assistants, evenly spaced, largest first; ValueError (naming the field) if impossible."""
    candidates, source = assistant_candidates(teacher, student, assistants)
    if assistants.depth > len(candidates):
        raise ValueError(
            f"assistants.depth={assistants.depth} but {source} has {len(candidates)} model(s) between "
            f"{teacher} and {student}; lower the depth or list assistants.models"
        )
    count = len(candidates)
    positions = [math.floor((i + 1) * (count + 1) / (assistants.depth + 1) + 0.5) - 1 for i in range(assistants.depth)]
    return [candidates[p] for p in positions]
