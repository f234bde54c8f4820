"""Each method's loss against an independent computation on small hand-made tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdray.data import Batch
from kdray.methods import METHODS, StepInfo
from kdray.methods.chains import DGKD
from kdray.methods.feature_mixup import mixing_weights
from kdray.methods.losses import soft_kl
from kdray.methods.online_branch import FeatureFusion, classifier_diversity, rampup_weight
from kdray.methods.pacemaker import teacher_weight
from kdray.methods.stkd import mixed_cross_entropy
from kdray.methods.triplet import mine_negatives, pairwise_l2
from kdray.models import ModelInfo, StagedNet, build_model

DIGITS = ModelInfo(num_classes=10, in_channels=1, image_size=8)


def step(seed: int = 0, at: int = 0, total: int = 10) -> StepInfo:
    """A step of a 10-step run whose random draws come from ``default_rng(seed)``."""
    return StepInfo(epoch=at // 10, step=at, steps_per_epoch=10, total_steps=total, rng=np.random.default_rng(seed))


def batch(images: torch.Tensor, labels: torch.Tensor) -> Batch:
    return Batch(images, labels, torch.arange(len(labels)))


class FixedLogits(nn.Module):
    """A 'network' whose logits are given rows (looked up by the first pixel): exact control in tests."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.table[images[:, 0, 0, 0].long()]


def as_staged(module: nn.Module) -> StagedNet:
    return StagedNet([("identity", nn.Identity())], module)


# --- triplet -------------------------------------------------------------------------------------


def test_hardest_negative_is_the_closest_other_class_output() -> None:
    anchors = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    outputs = torch.tensor([[1.0, 0.0], [9.0, 0.0], [0.0, 2.0]])  # output 2 is close to anchor 0
    labels = torch.tensor([0, 1, 2])
    distances = pairwise_l2(anchors, outputs)
    assert distances[0, 2].item() == pytest.approx(2.0)
    index, valid = mine_negatives(distances, labels, distances.diagonal(), margin=5.0, mining="hardest")
    assert index.tolist() == [2, 0, 0] and valid.all()  # anchor 1: |(10,0)-(1,0)| = 9 < |(10,0)-(0,2)|


def test_semihard_prefers_negatives_beyond_the_positive_inside_the_margin() -> None:
    distances = torch.tensor([[1.0, 0.5, 3.0, 9.0]] * 4)
    labels = torch.tensor([0, 1, 2, 3])
    index, _ = mine_negatives(distances, labels, torch.full((4,), 1.0), margin=5.0, mining="semihard")
    assert index[0].item() == 2  # 0.5 is harder but closer than the positive; 9.0 is outside the margin


def test_samples_without_another_class_have_no_negative() -> None:
    distances = torch.rand(3, 3)
    _, valid = mine_negatives(distances, torch.tensor([4, 4, 5]), distances.diagonal(), 1.0, "random")
    assert valid.tolist() == [True, True, True]
    _, valid = mine_negatives(distances, torch.tensor([4, 4, 4]), distances.diagonal(), 1.0, "random")
    assert not valid.any()


def test_random_negatives_are_always_of_another_class() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (64,))
    distances = torch.rand(64, 64)
    index, _ = mine_negatives(distances, labels, distances.diagonal(), 1.0, "random")
    assert (labels[index] != labels).all()


@pytest.mark.parametrize("variant", ["triplet", "pair"])
def test_triplet_method_terms_against_torch_and_hand_formulas(variant: str) -> None:
    student_table = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    teacher_table = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    student, teacher = as_staged(FixedLogits(student_table)), as_staged(FixedLogits(teacher_table))
    params = METHODS["triplet"].Params(mining="hardest", margin=5.0, w_tri=2.0, w_kd=1.0, variant=variant)
    method = METHODS["triplet"](student, [teacher], params)
    images = torch.arange(3.0).view(3, 1, 1, 1)
    labels = torch.tensor([0, 1, 2])
    terms = method(batch(images, labels), step())
    distances = torch.cdist(teacher_table, student_table)
    hardest = distances.masked_fill(torch.eye(3, dtype=torch.bool), float("inf")).argmin(1)
    negatives = student_table[hardest]
    if variant == "triplet":
        expected = F.triplet_margin_loss(teacher_table, student_table, negatives, margin=5.0)
    else:
        pos = (teacher_table - student_table).norm(dim=1)
        neg = (teacher_table - negatives).norm(dim=1)
        expected = (pos**2 + (5.0 - neg).clamp_min(0) ** 2).mean()
    assert terms[variant].item() == pytest.approx(2.0 * expected.item(), rel=1e-4)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(student_table, labels).item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(soft_kl(student_table, teacher_table, 1.0).item(), rel=1e-6)


# --- STKD and feature mixup ----------------------------------------------------------------------


def test_mixed_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    partners = torch.tensor([1, 0])
    log_p = torch.log_softmax(logits, 1)
    by_hand = -(0.3 * (log_p[0, 0] + log_p[1, 1]) + 0.7 * (log_p[0, 1] + log_p[1, 0])) / 2
    assert mixed_cross_entropy(logits, labels, partners, 0.3).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_stkd_teacher_and_student_see_the_same_mixed_images() -> None:
    torch.manual_seed(0)
    student, teacher = build_model("plane2", DIGITS), build_model("plane4", DIGITS).eval()
    method = METHODS["stkd"](student, [teacher], METHODS["stkd"].Params(alpha=0.5, beta=2.0, temperature=3.0))
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    terms = method(batch(images, labels), step(seed=1))
    rng = np.random.default_rng(1)  # replay the step's two draws: λ, then the partner permutation
    lam = float(rng.beta(0.5, 0.5))
    partners = torch.as_tensor(rng.permutation(8))
    mixed = lam * images + (1 - lam) * images[partners]
    s = student(mixed)
    assert terms["ce"].item() == pytest.approx(mixed_cross_entropy(s, labels, partners, lam).item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(2.0 * soft_kl(s, teacher(mixed), 3.0).item(), rel=1e-5)


def test_feature_mixup_mixes_stage_outputs_labels_and_teacher_targets() -> None:
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", DIGITS), build_model("plane2", DIGITS).eval()
    params = METHODS["feature_mixup"].Params(branches=3, alpha=0.7, stage="layer1", temperature=2.0)
    method = METHODS["feature_mixup"](student, [teacher], params).eval()  # eval: BatchNorm is a fixed map
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    terms = method(batch(images, labels), step(seed=3))
    rng = np.random.default_rng(3)  # replay the step's draws: weights, then two partner permutations
    w = mixing_weights(0.7, 3, rng)
    orders = [torch.arange(6), torch.as_tensor(rng.permutation(6)), torch.as_tensor(rng.permutation(6))]
    assert sum(w) == pytest.approx(1.0)
    # the mixed map, rebuilt from three separate weight-sharing passes over the permuted batches
    hidden = sum(wk * student.forward_to("layer1", images[o]) for wk, o in zip(w, orders, strict=True))
    logits = student.forward_from("layer1", hidden)
    ce = sum(wk * F.cross_entropy(logits, labels[o]) for wk, o in zip(w, orders, strict=True))
    target = sum(wk * F.softmax(teacher(images[o]) / 2.0, 1) for wk, o in zip(w, orders, strict=True))
    kl = (target * (target.log() - F.log_softmax(logits / 2.0, 1))).sum(1).mean() * 4.0
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kl.item(), rel=1e-4)


def test_feature_mixup_without_kd_needs_no_teacher_and_rejects_unknown_stage() -> None:
    params = METHODS["feature_mixup"].Params(w_kd=0)
    method = METHODS["feature_mixup"](build_model("plane4", DIGITS), [], params)
    assert set(method(batch(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))), step())) == {"ce"}
    with pytest.raises(ValueError, match="method.stage: 'layer9' is not a stage"):
        METHODS["feature_mixup"](
            build_model("plane4", DIGITS), [], METHODS["feature_mixup"].Params(stage="layer9", w_kd=0)
        )


# --- DGKD ----------------------------------------------------------------------------------------


def _guides(count: int) -> list[StagedNet]:
    return [as_staged(FixedLogits(torch.randn(4, 5))) for _ in range(count)]


@pytest.mark.parametrize(("guides", "drop", "kept"), [(4, 1, 3), (4, 2, 2), (3, 5, 1), (1, 1, 1), (3, 0, 3)])
def test_dgkd_drops_exactly_drop_num_guides_and_never_runs_them(guides: int, drop: int, kept: int) -> None:
    torch.manual_seed(0)
    student = as_staged(FixedLogits(torch.randn(4, 5)))
    teachers = _guides(guides)
    method = DGKD(student, teachers, METHODS["dgkd"].Params(drop_num=drop, temperature=2.0, alpha=0.5))
    images, labels = torch.arange(4.0).view(4, 1, 1, 1), torch.tensor([0, 1, 2, 3])
    used = set()
    for seed in range(20):
        before = [g.head.calls for g in teachers]
        terms = method(batch(images, labels), step(seed=seed))
        called = [i for i, g in enumerate(teachers) if g.head.calls > before[i]]
        assert len(called) == kept
        used.update(called)
        s = student(images)
        expected = 0.5 * sum(soft_kl(s, teachers[i](images), 2.0) for i in called)
        assert terms["kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert used == set(range(guides))  # every guide, the teacher included, is sometimes dropped or kept


def test_dgkd_mean_reduction_averages_kept_terms() -> None:
    student, teachers = as_staged(FixedLogits(torch.randn(4, 5))), _guides(2)
    method = DGKD(student, teachers, METHODS["dgkd"].Params(drop_num=0, reduce="mean", alpha=1.0, temperature=1.0))
    images = torch.arange(4.0).view(4, 1, 1, 1)
    terms = method(batch(images, torch.zeros(4, dtype=torch.long)), step())
    s = student(images)
    expected = (soft_kl(s, teachers[0](images), 1.0) + soft_kl(s, teachers[1](images), 1.0)) / 2
    assert terms["kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["ce"].item() == 0.0


# --- Pacemaker -----------------------------------------------------------------------------------


def test_pacemaker_schedule_hands_over_from_pacemaker_to_teacher() -> None:
    assert [teacher_weight(p, 0.0, 1.0) for p in (0.0, 0.25, 1.0)] == [0.0, 0.25, 1.0]
    assert [teacher_weight(p, 0.2, 0.6) for p in (0.1, 0.4, 0.9)] == pytest.approx([0.0, 0.5, 1.0])
    student = as_staged(FixedLogits(torch.randn(4, 5)))
    pace, teacher = _guides(2)
    method = METHODS["pacemaker"](student, [pace, teacher], METHODS["pacemaker"].Params(alpha=1.0, temperature=1.0))
    images, labels = torch.arange(4.0).view(4, 1, 1, 1), torch.zeros(4, dtype=torch.long)
    start = method(batch(images, labels), step(at=0, total=100))
    assert set(start) == {"ce", "kd_pacemaker"} and teacher.head.calls == 0
    quarter = method(batch(images, labels), step(at=25, total=100))
    s = student(images)
    assert quarter["kd_pacemaker"].item() == pytest.approx(0.75 * soft_kl(s, pace(images), 1.0).item(), rel=1e-5)
    assert quarter["kd_teacher"].item() == pytest.approx(0.25 * soft_kl(s, teacher(images), 1.0).item(), rel=1e-5)


def test_onthefly_models_use_one_by_three_kernels() -> None:
    for name in ("resnet8", "wrn_16_1", "plane4"):
        model = build_model(name, ModelInfo(num_classes=10, onthefly=True))
        kernels = {tuple(m.kernel_size) for m in model.modules() if isinstance(m, nn.Conv2d)}
        assert (1, 3) in kernels and (3, 3) not in kernels
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- Online multi-branch -------------------------------------------------------------------------


def test_classifier_diversity_by_hand_and_with_gradient() -> None:
    w1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    w2 = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    w3 = torch.tensor([[0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    by_hand = sum(float((a.t() @ b).pow(2).sum().detach()) for a, b in ((w1, w2), (w1, w3), (w2, w3)))
    gram = classifier_diversity([w1, w2, w3], "gram")
    assert gram.item() == pytest.approx(by_hand)
    # cosine form by hand: class vectors (1,0),(0,1) | (1,1)/√2,(0,1) | (0,1),(1,0); squared cosines per pair
    pair_12 = (0.5 + 0.0 + 0.5 + 1.0) / 4
    pair_13 = (0.0 + 1.0 + 1.0 + 0.0) / 4
    pair_23 = (0.5 + 0.5 + 1.0 + 0.0) / 4
    cosine = classifier_diversity([w1, w2, w3])
    assert cosine.item() == pytest.approx((pair_12 + pair_13 + pair_23) / 3)
    (gram + cosine).backward()
    assert w1.grad.abs().sum() > 0 and w2.grad.abs().sum() > 0


def test_cosine_cd_is_zero_for_orthogonal_classifiers_and_blind_to_scale() -> None:
    """The property the docs promise: branches classifying from disjoint feature subspaces score 0, and scaling
    a classifier (what weight decay does) changes nothing; the re-implementations' Gram form fails both."""
    w1 = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, -1.0, 0.0, 0.0]])
    w2 = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, -5.0]])
    assert classifier_diversity([w1, w2]).item() == 0.0
    assert classifier_diversity([w1, w2], "gram").item() > 0  # W_1ᵀW_2 is not zero here
    w3 = torch.randn(3, 4)
    assert classifier_diversity([w1, 10 * w3]).item() == pytest.approx(classifier_diversity([w1, w3]).item())


def test_online_branch_shapes_and_cd_changes_the_classifiers() -> None:
    torch.manual_seed(0)
    student = build_model("resnet8", DIGITS)
    params = METHODS["online_branch"].Params(branches=3, cd_weight=1.0)
    method = METHODS["online_branch"](student, [], params)
    assert method.deployable() is student
    fusion = method.fusion
    assert isinstance(fusion, FeatureFusion)
    assert fusion([torch.randn(5, 64, 2, 2)] * 3).shape == (5, 10)
    trainable = {id(p) for p in method.trainable()}
    assert {id(p) for p in fusion.parameters()} <= trainable and {id(p) for p in student.parameters()} <= trainable
    # the branches start different (re-initialised copies), so they can disagree
    heads = [method.branches[str(b)].classifier.weight for b in range(3)]
    assert not torch.equal(heads[0], heads[1])
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    terms = method(batch(images, labels), step())
    assert set(terms) == {"ce", "kd", "ce_fused", "cd"}
    before = [w.detach().clone() for w in heads]
    terms["cd"].backward()
    optimizer = torch.optim.SGD(method.trainable(), lr=0.1)
    optimizer.step()
    assert all(not torch.equal(b, w) for b, w in zip(before, heads, strict=True))  # CD alone moved them
    extra = method.eval().eval_terms(images, labels)
    assert {"acc_branch0", "acc_branch2", "acc_ensemble", "acc_fused", "disagreement"} <= set(extra)


def test_online_baseline_has_no_fusion_and_uses_the_mean_target() -> None:
    torch.manual_seed(0)
    method = METHODS["online_branch"](
        build_model("plane4", DIGITS), [], METHODS["online_branch"].Params(ffm=False, cd_weight=0, rampup=0)
    )
    images, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    terms = method(batch(images, labels), step())
    assert set(terms) == {"ce", "kd"} and method.fusion is None
    logits, _ = method.branch_outputs(images)
    target = torch.stack(logits).mean(0)
    assert terms["kd"].item() == pytest.approx(sum(soft_kl(z, target, 3.0) for z in logits).item(), rel=1e-5)


def test_rampup_is_sigmoid_shaped() -> None:
    assert rampup_weight(0.0, 0.25) == pytest.approx(math.exp(-5))
    assert rampup_weight(0.25, 0.25) == 1.0 and rampup_weight(0.9, 0.25) == 1.0
    assert rampup_weight(0.0, 0.0) == 1.0


# --- dml -----------------------------------------------------------------------------------------


def test_dml_loss_is_each_peers_ce_plus_its_mean_kl_to_the_others() -> None:
    """Three peers with fixed logits: L = Σ_k CE_k + T²/(m−1) Σ_k Σ_{l≠k} KL(p_l ‖ p_k), by hand."""
    table = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    torch.manual_seed(0)
    method = METHODS["dml"](as_staged(FixedLogits(table)), [], METHODS["dml"].Params(peers=3, temperature=2.0))
    for index, scale in ((1, -1.0), (2, 3.0)):  # distinct peers: scaled copies of the table
        method.branches[str(index)].head.table.data = table * scale
    images = torch.zeros(2, 1, 1, 1)
    images[1, 0, 0, 0] = 1
    labels = torch.tensor([0, 1])
    terms = method(batch(images, labels), step())
    logits = [table, -table, 3 * table]
    probs = [torch.softmax(z / 2.0, 1) for z in logits]
    ce = sum(-torch.log_softmax(z, 1)[torch.arange(2), labels].mean() for z in logits)
    kl = sum((probs[j] * (probs[j].log() - probs[k].log())).sum(1).mean() for k in range(3) for j in range(3) if j != k)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx((4.0 / 2 * kl).item(), rel=1e-5)
    assert method.deployable() is method.student and method.branches["0"] is method.student
