import math

import pytest
import torch
import torch.nn.functional as F

from kdray.data import Batch
from kdray.methods import METHODS, StepInfo
from kdray.methods.losses import soft_kl
from kdray.models import ModelInfo, build_model


def _hand_kl(student: list[list[float]], teacher: list[list[float]], T: float) -> float:
    """T² · mean over samples of Σ_c p_c (log p_c − log q_c), with p = softmax(t/T), q = softmax(s/T)."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        zs = sum(math.exp(v / T) for v in s_row)
        zt = sum(math.exp(v / T) for v in t_row)
        for s, t in zip(s_row, t_row, strict=True):
            p = math.exp(t / T) / zt
            q = math.exp(s / T) / zs
            total += p * (math.log(p) - math.log(q))
    return T * T * total / len(student)


def test_soft_kl_matches_a_hand_computation() -> None:
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [1.0, 1.0, 2.0]]
    for T in (1.0, 4.0):
        got = soft_kl(torch.tensor(student), torch.tensor(teacher), T).item()
        assert got == pytest.approx(_hand_kl(student, teacher, T), rel=1e-5)


def test_soft_kl_is_zero_for_equal_logits_and_not_divided_by_classes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    # float32 rounding over 100 classes leaves ~1e-6; a real difference between the distributions is far larger
    assert soft_kl(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    # batchmean, not mean: with 100 classes the 'mean' reduction would be 100 times smaller
    s, t = torch.randn(8, 100), torch.randn(8, 100)
    mean_reduced = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="mean").item()
    assert soft_kl(s, t, 1.0).item() == pytest.approx(100 * mean_reduced, rel=1e-5)


def test_kd_method_terms_are_weighted_hinton_terms() -> None:
    torch.manual_seed(0)
    info = ModelInfo(num_classes=10, in_channels=1, image_size=8)
    student, teacher = build_model("plane2", info), build_model("plane4", info)
    params = METHODS["kd"].Params(temperature=3.0, alpha=0.7)
    method = METHODS["kd"](student, [teacher], params).train()
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    terms = method(Batch(images, labels, torch.arange(len(labels))), StepInfo(0, 0, 1, 1))
    assert set(terms) == {"ce", "kd"}
    s = student(images).tolist()
    t = teacher.eval()(images).tolist()
    assert terms["kd"].item() == pytest.approx(0.7 * _hand_kl(s, t, 3.0), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.3 * F.cross_entropy(torch.tensor(s), labels).item(), rel=1e-5)


def test_kd_gradients_reach_only_the_student() -> None:
    info = ModelInfo(num_classes=10, in_channels=1, image_size=8)
    student, teacher = build_model("plane2", info), build_model("plane2", info)
    method = METHODS["kd"](student, [teacher], METHODS["kd"].Params()).train()
    assert not teacher.training  # the teacher stays in eval mode when the method trains
    batch = Batch(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)), torch.arange(4))
    sum(method(batch, StepInfo(0, 0, 1, 1)).values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in method.trainable()} == {id(p) for p in student.parameters()}


def test_kd_refuses_to_run_without_teacher() -> None:
    student = build_model("plane2", ModelInfo(num_classes=10, in_channels=1, image_size=8))
    method = METHODS["kd"](student, [], METHODS["kd"].Params())
    batch = Batch(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)), torch.arange(4))
    with pytest.raises(ValueError, match="needs a teacher"):
        method(batch, StepInfo(0, 0, 1, 1))
