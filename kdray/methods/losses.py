"""Loss functions shared by several methods, each written once."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_to_target(student_logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(target ‖ softmax(s/T))``, averaged over the batch; ``target`` holds probabilities.

    The T² factor keeps the gradient scale of the soft term independent of T (Hinton et al., 2015).
    The reduction is ``batchmean`` (sum over classes, mean over samples): ``reduction='mean'`` would
    also divide by the number of classes, a silent pitfall of several public implementations.
    Computed in float32 so that mixed precision does not round small probabilities away.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, target.float(), reduction="batchmean") * temperature**2


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean: the KD term of Hinton et al. (2015)."""
    return kl_to_target(student_logits, F.softmax(teacher_logits.float() / temperature, dim=1), temperature)
