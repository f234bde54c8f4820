"""Loss functions shared by several methods, each written once."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch (Hinton et al., 2015).

    The T² factor keeps the gradient scale of the soft term independent of T. The reduction is
    ``batchmean`` (sum over classes, mean over samples): ``reduction='mean'`` would also divide by
    the number of classes, a silent pitfall of several public implementations. Computed in float32
    so that mixed precision does not round the small probabilities away.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2
