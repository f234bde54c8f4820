"""The feature and relation baselines (FitNets, AT, SP, RKD, PKT, VID, CRD, ReviewKD): each loss against a second
computation written out here from the authors' formulas (RepDistiller's distiller_zoo, ReviewKD's hcl_loss), in
values and in gradients, and each method's terms, connectors, state and pairing of architectures. Tolerance:
1e-5 relative (float32 against float64 loops)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdray.data import Batch
from kdray.methods import METHODS, StepInfo
from kdray.methods.feature_losses import (
    attention_loss,
    contrastive_nce_loss,
    hierarchical_context_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_loss,
    vid_loss,
)
from kdray.models import ModelInfo, build_model
from kdray.models.features import forward_features
from kdray.resolve import load_config
from kdray.schema import ConfigError

QUICKSTART = str(Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml")


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def hand_attention(s: torch.Tensor, t: torch.Tensor, p: float) -> torch.Tensor:
    """Per sample: the channel mean of |f|^p at every position, divided by its L2 norm; mean squared difference."""
    total = torch.zeros((), dtype=torch.float64)
    for a, b in zip(s.double(), t.double(), strict=True):
        qa, qb = a.abs().pow(p).mean(0).flatten(), b.abs().pow(p).mean(0).flatten()
        total = total + ((qa / qa.norm() - qb / qb.norm()) ** 2).sum()
    return total / (s.shape[0] * s.shape[2] * s.shape[3])


def hand_similarity(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    b = s.shape[0]
    fs, ft = s.double().reshape(b, -1), t.double().reshape(b, -1)
    gs = torch.stack([torch.stack([fs[i] @ fs[j] for j in range(b)]) for i in range(b)])
    gt = torch.stack([torch.stack([ft[i] @ ft[j] for j in range(b)]) for i in range(b)])
    gs = gs / gs.norm(dim=1, keepdim=True)
    gt = gt / gt.norm(dim=1, keepdim=True)
    return ((gt - gs) ** 2).sum() / (b * b)


def hand_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    b = len(s)

    def normalised(e: torch.Tensor) -> list[list[torch.Tensor]]:
        d = [[(e[i] - e[j]).norm() if i != j else torch.zeros((), dtype=e.dtype) for j in range(b)] for i in range(b)]
        mean = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * b - b)
        return [[d[i][j] / mean for j in range(b)] for i in range(b)]

    ds, dt = normalised(s.double()), normalised(t.double())
    terms = [ds[i][j] - dt[i][j] for i in range(b) for j in range(b)]
    return sum(0.5 * x * x if abs(x) < 1 else abs(x) - 0.5 for x in terms) / (b * b)  # type: ignore[return-value]


def hand_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    b = len(s)

    def cos(e: torch.Tensor, a: int, i: int, k: int) -> torch.Tensor:
        u, v = e[i] - e[a], e[k] - e[a]
        if i == a or k == a:
            return torch.zeros((), dtype=e.dtype)  # a zero vector normalises to zero, as F.normalize does
        return (u @ v) / (u.norm() * v.norm())

    es, et = s.double(), t.double()
    terms = [cos(es, a, i, k) - cos(et, a, i, k) for a in range(b) for i in range(b) for k in range(b)]
    return sum(0.5 * x * x if abs(x) < 1 else abs(x) - 0.5 for x in terms) / b**3  # type: ignore[return-value]


def hand_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    b = len(s)

    def conditional(e: torch.Tensor) -> list[list[torch.Tensor]]:
        sim = [
            [((e[i] @ e[j]) / ((e[i].norm() + eps) * (e[j].norm() + eps)) + 1) / 2 for j in range(b)] for i in range(b)
        ]
        return [[sim[i][j] / sum(sim[i]) for j in range(b)] for i in range(b)]

    ps, pt = conditional(s.double()), conditional(t.double())
    return sum(pt[i][j] * torch.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / (b * b)


def block_mean(f: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling to ``size`` x ``size`` by hand: the mean of each (h/size) x (w/size) block."""
    n, c, h, w = f.shape
    return f.reshape(n, c, size, h // size, size, w // size).mean((3, 5))


def hand_hcl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ReviewKD's hcl_loss written out for an 8x8 map: full size weight 1, then 4x4, 2x2, 1x1 at 1/2, 1/4, 1/8."""
    weights = {8: 1.0, 4: 0.5, 2: 0.25, 1: 0.125}
    terms = [w * ((block_mean(s, k) - block_mean(t, k)) ** 2).mean() for k, w in weights.items()]
    return sum(terms) / sum(weights.values())  # type: ignore[return-value]


def hand_nce(x: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller's ContrastLoss, entry by entry: log(P/(P + m/N + eps)) for the positive, log((m/N)/(P + m/N
    + eps)) for each negative, summed, negated, over the batch size."""
    b, m = x.shape[0], x.shape[1] - 1
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        total = total + torch.log(x[i, 0] / (x[i, 0] + m / n_data + eps))
        for j in range(1, m + 1):
            total = total + torch.log((m / n_data) / (x[i, j] + m / n_data + eps))
    return -total / b


@pytest.mark.parametrize(
    ("loss", "hand", "shape_s", "shape_t"),
    [
        (lambda s, t: attention_loss(s, t, 2.0), lambda s, t: hand_attention(s, t, 2.0), (4, 3, 4, 4), (4, 5, 4, 4)),
        (lambda s, t: attention_loss(s, t, 3.0), lambda s, t: hand_attention(s, t, 3.0), (4, 3, 4, 4), (4, 2, 4, 4)),
        (similarity_loss, hand_similarity, (5, 3, 4, 4), (5, 6, 2, 2)),
        (rkd_distance_loss, hand_rkd_distance, (5, 7), (5, 3)),
        (rkd_angle_loss, hand_rkd_angle, (4, 6), (4, 3)),
        (pkt_loss, hand_pkt, (5, 7), (5, 4)),
        (hierarchical_context_loss, hand_hcl, (3, 4, 8, 8), (3, 4, 8, 8)),
        (lambda s, t: contrastive_nce_loss(s + 0.05, 50), lambda s, t: hand_nce(s + 0.05, 50), (4, 6), (4, 6)),  # > 0
    ],
    ids=["at-p2", "at-p3", "sp", "rkd-distance", "rkd-angle", "pkt", "reviewkd-hcl", "crd-nce"],
)
def test_feature_losses_match_the_authors_formulas_in_value_and_gradient(loss, hand, shape_s, shape_t) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    s = torch.randn(*shape_s, dtype=torch.float32).relu().requires_grad_(True)
    t = torch.randn(*shape_t, dtype=torch.float32).relu() + 0.1
    s64 = s.detach().double().requires_grad_(True)
    got, expected = loss(s, t), hand(s64, t.double())
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-9)
    got.backward()
    expected.backward()
    assert torch.allclose(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-8)  # type: ignore[union-attr]


def test_vid_loss_is_the_gaussian_negative_log_likelihood_in_value_and_gradient() -> None:
    """``½((μ − t)²/σ² + log σ²)`` averaged over every entry, ``σ² = log(1 + e^a) + 1e-5`` per channel, by loops."""
    torch.manual_seed(2)
    mean, target = torch.randn(2, 3, 2, 2, requires_grad=True), torch.randn(2, 3, 2, 2)
    log_scale = torch.randn(3, requires_grad=True)
    mean64, scale64 = mean.detach().double().requires_grad_(True), log_scale.detach().double().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for n, c, h, w in torch.cartesian_prod(*(torch.arange(k) for k in mean.shape)).tolist():
        variance = torch.log(1 + torch.exp(scale64[c])) + 1e-5
        total = total + 0.5 * ((mean64[n, c, h, w] - target.double()[n, c, h, w]) ** 2 / variance + torch.log(variance))
    expected = total / mean.numel()
    got = vid_loss(mean, target, log_scale)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    expected.backward()
    assert torch.allclose(mean.grad.double(), mean64.grad, rtol=1e-4, atol=1e-8)  # type: ignore[union-attr]
    assert torch.allclose(log_scale.grad.double(), scale64.grad, rtol=1e-4, atol=1e-8)  # type: ignore[union-attr]


def test_vid_variances_start_at_the_initial_variance() -> None:
    from kdray.methods.vid import VariationalRegressor

    regressor = VariationalRegressor(4, 6, initial_variance=5.0, eps=1e-5)
    assert torch.allclose(F.softplus(regressor.log_scale) + 1e-5, torch.full((6,), 5.0))


def test_attention_pools_the_larger_map_to_the_smaller_as_repdistiller() -> None:
    torch.manual_seed(1)
    s, t = torch.rand(3, 4, 8, 8), torch.rand(3, 6, 4, 4)
    pooled = s.reshape(3, 4, 4, 2, 4, 2).mean((3, 5))  # 2x2 blocks by hand
    assert attention_loss(s, t, 2.0).item() == pytest.approx(hand_attention(pooled, t, 2.0).item(), rel=1e-5)


def methods_on_one_batch(name: str, teacher: str = "resnet20", student: str = "resnet8", **params: object):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    info = ModelInfo(num_classes=10, in_channels=3, image_size=16)
    s, t = build_model(student, info), build_model(teacher, info).eval()
    method = METHODS[name](s, [t], METHODS[name].Params(**params))
    train_labels = torch.arange(40) % 10
    method.connect(info, train_labels)
    index = torch.tensor([3, 17, 22, 8, 31, 5])
    return method.train(), s, t, Batch(torch.randn(6, 3, 16, 16), train_labels[index], index)


@pytest.mark.integration  # builds and runs models
@pytest.mark.parametrize(
    ("name", "terms", "beta"),
    [("fitnet", {"hint"}, 7.0), ("at", {"at"}, 7.0), ("sp", {"sp"}, 7.0), ("rkd", {"rkd_distance", "rkd_angle"}, 7.0),
     ("pkt", {"pkt"}, 7.0), ("vid", {"vid"}, 7.0), ("crd", {"crd"}, 7.0), ("reviewkd", {"review"}, 7.0)],
)  # fmt: skip
def test_each_method_returns_ce_and_its_terms_weighted_by_beta(name: str, terms: set[str], beta: float) -> None:
    method, student, teacher, batch = methods_on_one_batch(name, beta=beta, ce_weight=0.5)
    got = method(batch, StepInfo(0, 0, 1, 1))
    assert set(got) == {"ce", *terms}
    assert got["ce"].item() == pytest.approx(
        0.5 * F.cross_entropy(student(batch.images), batch.labels).item(), rel=1e-5
    )
    plain, *_ = methods_on_one_batch(name, beta=1.0, ce_weight=0.5)
    unit = plain(batch, StepInfo(0, 0, 1, 1))
    for term in terms:
        assert got[term].item() == pytest.approx(beta * unit[term].item(), rel=1e-5)
    sum(got.values()).backward()  # type: ignore[union-attr]
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.integration  # builds and runs models
def test_at_sums_over_every_block_group_and_sp_reads_the_last() -> None:
    method, student, teacher, batch = methods_on_one_batch("at", beta=1.0)
    _, s_stages, _ = forward_features(student, batch.images)
    _, t_stages, _ = forward_features(teacher, batch.images)
    expected = sum(attention_loss(s_stages[n], t_stages[n], 2.0) for n in ("layer1", "layer2", "layer3"))
    assert method(batch, StepInfo(0, 0, 1, 1))["at"].item() == pytest.approx(expected.item(), rel=1e-5)
    sp, *_ = methods_on_one_batch("sp", beta=1.0)
    expected_sp = similarity_loss(s_stages["layer3"], t_stages["layer3"])
    assert sp(batch, StepInfo(0, 0, 1, 1))["sp"].item() == pytest.approx(expected_sp.item(), rel=1e-5)


@pytest.mark.integration  # builds and runs models
def test_fitnets_regressor_trains_with_the_student_and_is_not_stored_with_it() -> None:
    method, student, _, batch = methods_on_one_batch("fitnet", teacher="resnet32x4", student="resnet8")
    regressor = {id(p) for p in method.regressor.parameters()}
    assert regressor <= {id(p) for p in method.trainable()}
    assert not any(key.startswith("regressor") for key in method.deployable().state_dict())
    assert method.regressor.conv[0].in_channels == 32 and method.regressor.conv[0].out_channels == 128  # layer2s
    method(batch, StepInfo(0, 0, 1, 1))["hint"].backward()
    assert all(p.grad is not None for p in method.regressor.parameters() if p.requires_grad)


@pytest.mark.integration  # builds and runs models
@pytest.mark.parametrize(
    ("teacher", "student"), [("resnet32x4", "shufflenetv1"), ("vgg13", "mobilenetv2"), ("resnet20", "plane2")]
)
@pytest.mark.parametrize("name", ["fitnet", "at", "sp", "rkd", "pkt", "vid", "crd", "reviewkd"])
def test_heterogeneous_pairs_train_a_step(name: str, teacher: str, student: str) -> None:
    """Connectors adapt channel counts and spatial sizes; stages pair from the last one backwards."""
    method, *_, batch = methods_on_one_batch(name, teacher=teacher, student=student)
    total = sum(method(batch, StepInfo(0, 0, 1, 1)).values())
    assert torch.isfinite(total)  # type: ignore[arg-type]
    total.backward()  # type: ignore[union-attr]


@pytest.mark.integration  # builds and runs models
def test_a_hint_stage_deeper_than_either_network_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"method.hint_stage=-9: the student has 2 stages .* choose -1 to -2"):
        methods_on_one_batch("fitnet", teacher="resnet20", student="plane2", hint_stage=-9)


def test_feature_knobs_are_validated_at_both_ends() -> None:
    cases = [
        ("fitnet", "method.beta=-1"), ("at", "method.p=0.5"), ("fitnet", "method.hint_stage=0"),
        ("fitnet", "method.hint_stage=-17"), ("vid", "method.initial_variance=0"), ("crd", "method.nce_k=0"),
        ("crd", "method.nce_t=0"), ("crd", "method.nce_m=1"), ("crd", "method.feat_dim=1"),
        ("reviewkd", "method.warmup_epochs=-1"),
    ]  # fmt: skip
    for name, override in cases:
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            load_config(QUICKSTART, [f"method.name={name}", override])


@pytest.mark.integration  # builds and runs models
def test_crd_scores_its_own_index_against_negatives_of_other_classes_only() -> None:
    method, *_, batch = methods_on_one_batch("crd", nce_k=30)
    contrast = method.contrast_indices(batch.index, batch.labels, StepInfo(0, 0, 1, 1))
    assert contrast.shape == (6, 31) and torch.equal(contrast[:, 0], batch.index)
    assert not (method.train_labels[contrast[:, 1:]] == batch.labels[:, None]).any()
    again = method.contrast_indices(batch.index, batch.labels, StepInfo(0, 0, 1, 1))
    assert torch.equal(contrast, again)  # drawn from the step's generator: a resumed run draws the same


@pytest.mark.integration  # builds and runs models
def test_crd_bank_moves_each_sample_towards_its_embedding_and_fixes_z_once() -> None:
    method, student, teacher, batch = methods_on_one_batch("crd", nce_k=30, nce_m=0.5)
    before_s, before_t = method.memory_student.clone(), method.memory_teacher.clone()
    terms = method(batch, StepInfo(0, 0, 1, 1))
    _, _, e_s = forward_features(student, batch.images)
    _, _, e_t = forward_features(teacher, batch.images)
    v_s = F.normalize(method.embed_student(e_s), dim=1).detach()
    v_t = F.normalize(method.embed_teacher(e_t), dim=1).detach()
    for bank, before, v in ((method.memory_student, before_s, v_s), (method.memory_teacher, before_t, v_t)):
        moved = 0.5 * before[batch.index] + 0.5 * v
        assert torch.allclose(bank[batch.index], moved / moved.norm(dim=1, keepdim=True), atol=1e-6)
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[batch.index] = False
        assert torch.equal(bank[untouched], before[untouched])
    # Z: 40 samples times the mean of the first batch's scores (student anchors against the teacher's bank)
    contrast = method.contrast_indices(batch.index, batch.labels, StepInfo(0, 0, 1, 1))
    h_s = torch.exp(torch.einsum("bkd,bd->bk", before_t[contrast], v_s) / 0.07)
    assert method.normalizers[0].item() == pytest.approx(40 * h_s.mean().item(), rel=1e-5)
    h_t = torch.exp(torch.einsum("bkd,bd->bk", before_s[contrast], v_t) / 0.07)
    expected = contrastive_nce_loss(h_s / method.normalizers[0], 40) + contrastive_nce_loss(
        h_t / method.normalizers[1], 40
    )
    assert terms["crd"].item() == pytest.approx(0.8 * expected.item(), rel=1e-5)
    z = method.normalizers.clone()
    method(batch, StepInfo(0, 1, 1, 2))
    assert torch.equal(method.normalizers, z)


@pytest.mark.integration  # builds and runs models
def test_crd_bank_is_checkpointed_with_the_method_and_not_broadcast_or_stored() -> None:
    method, *_, batch = methods_on_one_batch("crd", nce_k=30)
    method(batch, StepInfo(0, 0, 1, 1))
    state = method.state_dict()
    assert {"memory_student", "memory_teacher", "normalizers"} <= set(state) and "train_labels" not in state
    assert set(method._ddp_params_and_buffers_to_ignore) == {"memory_student", "memory_teacher", "normalizers"}
    assert not any(key.startswith(("memory", "embed", "normalizers")) for key in method.deployable().state_dict())
    fresh, *_ = methods_on_one_batch("crd", nce_k=30)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory_student, method.memory_student) and fresh.normalizers[0] > 0


@pytest.mark.integration  # builds and runs models
def test_reviewkd_fuses_every_level_and_ramps_its_weight_over_the_warm_up() -> None:
    method, *_, batch = methods_on_one_batch("reviewkd", warmup_epochs=4)
    assert len(method.fusions) == 4  # layer1, layer2, layer3 and the embedding
    assert method.fusions[-1].attention is None and all(f.attention is not None for f in method.fusions[:-1])
    plain, *_ = methods_on_one_batch("reviewkd", warmup_epochs=0)
    full = plain(batch, StepInfo(0, 0, 1, 1))["review"].item()
    for epoch, ramp in ((0, 0.25), (2, 0.75), (3, 1.0), (9, 1.0)):
        got = method(batch, StepInfo(epoch, 0, 1, 1))["review"].item()
        assert got == pytest.approx(ramp * full, rel=1e-5)
