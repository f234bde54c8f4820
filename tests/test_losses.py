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


def _standardized_rows(rows: list[list[float]]) -> list[list[float]]:
    """Each row minus its mean over its unbiased standard deviation, by hand."""
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        out.append([(v - mean) / std for v in row])
    return out


def test_kd_with_the_ls_authors_weights_is_their_kd_plus_ls_loss() -> None:
    """CE 0.1 + KD 9 at base temperature 2 on z-scored logits (sunshangquan/logit-standardization-KD:
    --logit-stand --base-temp 2 --kd-weight 9): weights that do not sum to 1, which alpha alone cannot give."""
    torch.manual_seed(0)
    info = ModelInfo(num_classes=10, in_channels=1, image_size=8)
    student, teacher = build_model("plane2", info), build_model("plane4", info)
    params = METHODS["kd"].Params(temperature=2.0, ce_weight=0.1, kd_weight=9.0, logit_standardization=True)
    method = METHODS["kd"](student, [teacher], params).train()
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    terms = method(Batch(images, labels, torch.arange(len(labels))), StepInfo(0, 0, 1, 1))
    s, t = student(images).tolist(), teacher.eval()(images).tolist()
    expected_kd = 9.0 * _hand_kl(_standardized_rows(s), _standardized_rows(t), 2.0)
    assert terms["kd"].item() == pytest.approx(expected_kd, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(0.1 * F.cross_entropy(torch.tensor(s), labels).item(), rel=1e-5)


def test_weights_added_later_stay_out_of_a_kd_stages_identity_at_their_defaults() -> None:
    """Stored kd students keep their store keys: the new weights enter the identity only when set."""
    plain = METHODS["kd"].Params()
    assert plain.identity() == {k: v for k, v in plain.model_dump(mode="json").items() if not k.endswith("_weight")}
    assert plain.weights() == (pytest.approx(0.1), 0.9)
    weighted = METHODS["kd"].Params(ce_weight=0.1, kd_weight=9.0)
    assert weighted.identity()["kd_weight"] == 9.0 and weighted.identity()["ce_weight"] == 0.1
    assert weighted.weights() == (0.1, 9.0)


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


# --- modern logit baselines: DKD, DIST, logit standardisation ---------------------------------------------


def _softmax(row: list[float], T: float) -> list[float]:
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def _hand_dkd(
    student: list[list[float]], teacher: list[list[float]], labels: list[int], T: float
) -> tuple[float, float]:
    """TCKD and NCKD from their definitions (Zhao et al. 2022, eq. 1-4), sample by sample."""
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(student, teacher, labels, strict=True):
        p, q = _softmax(t_row, T), _softmax(s_row, T)
        binary_p, binary_q = [p[y], 1 - p[y]], [q[y], 1 - q[y]]
        tckd += sum(a * math.log(a / b) for a, b in zip(binary_p, binary_q, strict=True))
        for c in range(len(p)):
            if c != y:
                hat_p, hat_q = p[c] / (1 - p[y]), q[c] / (1 - q[y])
                nckd += hat_p * math.log(hat_p / hat_q)
    n = len(student)
    return T * T * tckd / n, T * T * nckd / n


def _hand_pearson_distance(a: list[list[float]], b: list[list[float]]) -> float:
    total = 0.0
    for x, y in zip(a, b, strict=True):
        mx, my = sum(x) / len(x), sum(y) / len(y)
        cov = sum((u - mx) * (v - my) for u, v in zip(x, y, strict=True))
        total += cov / math.sqrt(sum((u - mx) ** 2 for u in x) * sum((v - my) ** 2 for v in y))
    return 1 - total / len(a)


def _method(name: str, **params: object) -> tuple[object, torch.Tensor, torch.Tensor, Batch]:
    torch.manual_seed(0)
    info = ModelInfo(num_classes=10, in_channels=1, image_size=8)
    student, teacher = build_model("plane2", info), build_model("plane4", info)
    method = METHODS[name](student, [teacher], METHODS[name].Params(**params)).train()
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    return method, student(images).detach(), teacher.eval()(images).detach(), Batch(images, labels, torch.arange(6))


def test_dkd_terms_match_their_definitions_and_ramp_up() -> None:
    method, s, t, batch = _method("dkd", temperature=2.0, alpha=0.5, beta=3.0, ce_weight=0.7, warmup_epochs=4)
    tckd, nckd = _hand_dkd(s.tolist(), t.tolist(), batch.labels.tolist(), 2.0)
    early = method(batch, StepInfo(0, 0, 1, 10))  # epoch 1 of a 4-epoch warm-up
    assert early["tckd"].item() == pytest.approx(0.25 * 0.5 * tckd, rel=1e-5)
    assert early["nckd"].item() == pytest.approx(0.25 * 3.0 * nckd, rel=1e-5)
    assert early["ce"].item() == pytest.approx(0.7 * F.cross_entropy(s, batch.labels).item(), rel=1e-5)
    late = method(batch, StepInfo(5, 5, 1, 10))
    assert late["nckd"].item() == pytest.approx(3.0 * nckd, rel=1e-5)


# The LS authors' DKD + LS recipe for resnet32x4 -> resnet8x4 (sunshangquan/logit-standardization-KD: configs/
# cifar100/dkd/resnet32x4_resnet8x4.yaml with --logit-stand --base-temp 2 --kd-weight 9; tools/train.py multiplies
# DKD's alpha 1 and beta 8 by the KD weight): alpha 9, beta 72, T 2, CE weight 1, 20 warm-up epochs.
DKD_LS_RECIPE = {"logit_standardization": True, "temperature": 2.0, "alpha": 9.0, "beta": 72.0, "ce_weight": 1.0}


def test_dkd_with_the_ls_authors_recipe_is_their_dkd_plus_ls_loss() -> None:
    method, s, t, batch = _method("dkd", **DKD_LS_RECIPE)
    tckd, nckd = _hand_dkd(_standardized_rows(s.tolist()), _standardized_rows(t.tolist()), batch.labels.tolist(), 2.0)
    terms = method(batch, StepInfo(25, 25, 1, 100))  # past the 20-epoch warm-up
    assert terms["tckd"].item() == pytest.approx(9.0 * tckd, rel=1e-4)
    assert terms["nckd"].item() == pytest.approx(72.0 * nckd, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, batch.labels).item(), rel=1e-5)  # raw logits


def test_kd_is_tckd_plus_the_non_target_mass_times_nckd() -> None:
    """The paper's decomposition (eq. 4), a second route: for one sample KD = TCKD + (1 − p_t,y)·NCKD."""
    from kdray.methods.losses import decoupled_kl

    torch.manual_seed(1)
    s, t, y = torch.randn(1, 7), torch.randn(1, 7) * 3, torch.tensor([2])
    tckd, nckd = decoupled_kl(s, t, y, 3.0)
    non_target = 1 - torch.softmax(t / 3.0, dim=1)[0, 2]
    assert soft_kl(s, t, 3.0).item() == pytest.approx((tckd + non_target * nckd).item(), rel=1e-5)


def test_dist_terms_match_pearson_by_hand() -> None:
    method, s, t, batch = _method("dist", temperature=3.0, beta=1.5, gamma=0.5, ce_weight=1.0)
    terms = method(batch, StepInfo(0, 0, 1, 1))
    ps = [_softmax(row, 3.0) for row in s.tolist()]
    pt = [_softmax(row, 3.0) for row in t.tolist()]
    inter = 9.0 * _hand_pearson_distance(ps, pt)
    intra = 9.0 * _hand_pearson_distance(
        [list(c) for c in zip(*ps, strict=True)], [list(c) for c in zip(*pt, strict=True)]
    )
    assert terms["inter"].item() == pytest.approx(1.5 * inter, rel=1e-4)
    assert terms["intra"].item() == pytest.approx(0.5 * intra, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, batch.labels).item(), rel=1e-5)


def test_dist_is_zero_for_a_student_that_matches_relations_not_values() -> None:
    """DIST asks for the teacher's relations: predictions that are an affine map of the teacher's (per sample
    and per class alike) cost nothing, although their KL to the teacher does not vanish."""
    from kdray.methods.losses import pearson_distance

    teacher = torch.softmax(torch.randn(5, 4), dim=1)
    student = 0.5 * teacher + 0.05  # ρ = 1 across classes and across samples
    assert pearson_distance(student, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert pearson_distance(student.T, teacher.T).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_logit_standardization_ignores_the_teachers_logit_scale_and_shift(name: str) -> None:
    """With LS the distillation terms see z-scored logits: a teacher whose logits are 3·t + 5 teaches the
    same, though its raw logits differ; the cross-entropy is untouched."""
    torch.manual_seed(0)
    info = ModelInfo(num_classes=10, in_channels=1, image_size=8)
    student, teacher = build_model("plane2", info), build_model("plane4", info)
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    batch, step = Batch(images, labels, torch.arange(6)), StepInfo(30, 30, 1, 40)
    params = METHODS[name].Params(logit_standardization=True)
    plain = METHODS[name](student, [teacher], params).train()(batch, step)
    last = [module for module in teacher.modules() if isinstance(module, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(3.0)
        last.bias.mul_(3.0).add_(5.0)
    scaled = METHODS[name](student, [teacher], params).train()(batch, step)
    for term in plain:
        assert scaled[term].item() == pytest.approx(plain[term].item(), rel=1e-4), term
    raw = METHODS[name](student, [teacher], METHODS[name].Params()).train()(batch, step)
    assert any(raw[term].item() != pytest.approx(scaled[term].item(), rel=1e-3) for term in raw if term != "ce")


def test_standardized_logits_have_zero_mean_and_unit_unbiased_std() -> None:
    from kdray.methods.losses import standardized

    z = standardized(torch.tensor([[1.0, 2.0, 4.0, 9.0]]))[0].tolist()
    mean = sum([1.0, 2.0, 4.0, 9.0]) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in [1.0, 2.0, 4.0, 9.0]) / 3)
    assert z == pytest.approx([(v - mean) / std for v in [1.0, 2.0, 4.0, 9.0]], rel=1e-5)


def test_mean_kl_reduction_is_what_nn_kldivloss_computes() -> None:
    """TAKD's and DGKD's code: ``nn.KLDivLoss()(log σ_T(s), σ_T(t))·T²``, which divides by the classes too."""
    torch.manual_seed(2)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    theirs = torch.nn.KLDivLoss()(F.log_softmax(s / 3, dim=1), F.softmax(t / 3, dim=1)).item() * 9
    assert soft_kl(s, t, 3.0, "mean").item() == pytest.approx(theirs, rel=1e-5)
    assert soft_kl(s, t, 3.0).item() == pytest.approx(7 * theirs, rel=1e-5)
