"""The guide-output cache: exact (cached and uncached runs train the same student step by step), shared by
concurrent processes, bypassed for mixed inputs, and bounded in size."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdray.build import model_info
from kdray.data import Views, load_dataset
from kdray.engine import FitResult
from kdray.guide_cache import GuideCache, open_table
from kdray.models import build_model
from kdray.resolve import load_config
from kdray.stages import plan_stages
from tests.conftest import fit_stage

SMALL = [
    "teacher.name=plane4",
    "student.name=plane2",
    "train.epochs=3",
    "train.batch_size=32",
    "data.augment.padding=1",  # 18 views per image: epochs 2-3 of a cold run already hit a few rows
    "data.augment.flip=true",
]


class StepRecorder(nn.Module):
    """The engine's ``wrap`` hook used to record every step's loss terms."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method
        self.steps: list[dict[str, torch.Tensor]] = []

    def forward(self, *args: object) -> dict[str, torch.Tensor]:
        terms = self.method(*args)
        self.steps.append({name: value.detach().clone() for name, value in terms.items()})
        return terms


def run(overrides: list[str], guides: int = 1) -> tuple[FitResult, list[dict[str, torch.Tensor]], list[dict]]:
    """Train the student of ``overrides`` with randomly initialised frozen guides (seeded, so every call
    gets the same ones); returns the result, each step's terms and each epoch's metrics."""
    cfg = load_config(None, [*SMALL, *overrides])
    data = load_dataset(cfg.data)
    # The experiment's own method, with as many guides as given: without assistants a chain plans its student
    # as plain kd (one guide); here dgkd must drop among two.
    plan = plan_stages(cfg, data.fingerprint())[-1].model_copy(update={"method": cfg.method})
    torch.manual_seed(123)
    teachers = [build_model(name, model_info(data)) for name in ["plane4", "plane4"][:guides]]
    recorder: list[StepRecorder] = []

    def wrap(method: nn.Module) -> nn.Module:
        recorder.append(StepRecorder(method))
        return recorder[0]

    result, sink = fit_stage(cfg, plan, data, teachers, wrap=wrap)
    return result, recorder[0].steps, sink.history


def assert_same_training(a: tuple, b: tuple) -> None:
    (first, first_steps, _), (second, second_steps, _) = a, b
    assert len(first_steps) == len(second_steps) > 0
    for one, other in zip(first_steps, second_steps, strict=True):
        assert one.keys() == other.keys()
        assert all(torch.equal(one[name], other[name]) for name in one), (one, other)
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "guides"),
    [(["method.name=kd"], 1), (["method.name=dgkd", "method.drop_num=1"], 2)],
    ids=["kd", "dgkd"],
)
def test_cached_runs_train_the_same_student_as_uncached_step_by_step(
    workdir: Path, method: list[str], guides: int
) -> None:
    uncached = run([*method, "guide_cache.enabled=false"], guides)
    cold = run(method, guides)
    warm = run(method, guides)
    assert_same_training(uncached, cold)
    assert_same_training(uncached, warm)
    cold_epochs, warm_epochs = cold[2], warm[2]
    assert cold_epochs[0]["cache/hits"] == 0 and cold_epochs[0]["cache/misses"] > 0
    assert sum(epoch["cache/hits"] for epoch in cold_epochs[1:]) > 0  # views that recur within the run
    # The second run asks for exactly the views the first one computed: the guides never run.
    assert all(epoch["cache/hit_rate"] == 1.0 and epoch["guide/forward_images"] == 0 for epoch in warm_epochs)
    assert uncached[2][0]["guide/forward_images"] > 0 and "cache/hits" not in uncached[2][0]
    tables = list((workdir / ".kdray/store/guide-outputs").glob("*/meta.json"))
    assert len(tables) == guides


@pytest.mark.integration
def test_a_partly_filled_cache_still_trains_the_same_student(workdir: Path) -> None:
    """Batches with a few missing rows (filled by another seed's run) still give bit-identical training."""
    two_views = ["data.augment.padding=0", "data.augment.flip=true"]
    uncached = run([*two_views, "guide_cache.enabled=false"])
    run([*two_views, "train.seed=1"])  # another seed's views: ~7/8 of (image, flip) pairs filled after 3 epochs
    partial = run(two_views)
    assert_same_training(uncached, partial)
    rates = [epoch["cache/hit_rate"] for epoch in partial[2]]
    assert 0.5 < rates[0] < 1 and all(rate > 0.5 for rate in rates)


@pytest.mark.integration
def test_float16_tables_are_half_the_size_and_agree_between_cold_and_warm(workdir: Path) -> None:
    _, cold_steps, cold_epochs = run(["guide_cache.dtype=float16"])
    _, warm_steps, _ = run(["guide_cache.dtype=float16"])
    _, exact_steps, exact_epochs = run([])
    assert cold_epochs[0]["cache/bytes"] * 2 == exact_epochs[0]["cache/bytes"]
    assert all(torch.equal(a["kd"], b["kd"]) for a, b in zip(cold_steps, warm_steps, strict=True))
    assert any(not torch.equal(a["kd"], b["kd"]) for a, b in zip(cold_steps, exact_steps, strict=True))


@pytest.mark.integration
def test_mixed_inputs_bypass_the_cache(workdir: Path) -> None:
    """STKD's guide sees mixup images, which are not views of one training image: nothing is cached."""
    _, _, epochs = run(["method.name=stkd"])
    assert not (workdir / ".kdray/store/guide-outputs").exists()
    assert all("cache/hits" not in epoch for epoch in epochs)
    assert epochs[0]["guide/forward_images"] > 0
    # With its clean-image term on, that term's lookups use the cache, the mixed term still bypasses it.
    _, _, epochs = run(["method.name=stkd", "method.clean_kd=0.5"])
    first = epochs[0]
    lookups = first["cache/hits"] + first["cache/misses"]
    assert lookups > 0 and first["guide/forward_images"] == lookups + first["cache/misses"]  # all mixed + clean misses


def _fill(folder: str, seed: int, done: multiprocessing.Queue) -> None:
    """A process that looks up (and so fills) overlapping rows of one table, in its own order."""
    torch.manual_seed(0)
    guide = nn.Linear(6, 5)
    images = torch.randn(40, 6)
    cache = GuideCache(
        load_config(None, []).guide_cache, Path(folder), {"data": "test"}, (40, 3, 5), torch.device("cpu")
    ).lookup(guide)
    every = np.random.default_rng(seed).permutation(40 * 3)  # each (image, view) once, in this process's order
    order, views = np.repeat(np.arange(40), 3)[every], np.tile(np.arange(3), 40)[every]
    for start in range(0, len(order), 8):
        rows = order[start : start + 8]
        cache.logits(
            images[rows] + torch.from_numpy(views[start : start + 8, None]).float(),
            Views(rows, views[start : start + 8]),
            lambda x: guide(x).detach(),
        )
    cache.flush()
    done.put(cache.epoch_metrics())


@pytest.mark.integration
def test_two_processes_filling_one_cache_leave_a_complete_valid_table(tmp_path: Path) -> None:
    spawn = multiprocessing.get_context("spawn")
    done = spawn.Queue()
    workers = [spawn.Process(target=_fill, args=(str(tmp_path), seed, done)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    stats = [done.get(timeout=5) for _ in workers]
    assert all(s["cache/hits"] + s["cache/misses"] == 120 for s in stats)
    (meta_file,) = tmp_path.glob("*/meta.json")
    table = np.fromfile(meta_file.parent / "logits.bin", dtype=np.float32).reshape(40, 3, 5)
    torch.manual_seed(0)
    guide = nn.Linear(6, 5)
    images = torch.randn(40, 6)
    with torch.no_grad():
        expected = torch.stack([guide(images + view) for view in range(3)], 1).numpy()
    np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-6)  # every row filled, every value the guide's own


def test_tables_stay_within_the_budget(tmp_path: Path) -> None:
    row = 3 * 5 * 4  # views x classes x float32 bytes of one image
    first = open_table(tmp_path, {"guide": "a"}, (40, 3, 5), "float32", max_bytes=100 * row)
    assert first is not None and first.images == 40
    # The second table does not fit beside the first: the first (least recently used) is evicted.
    second = open_table(tmp_path, {"guide": "b"}, (80, 3, 5), "float32", max_bytes=100 * row)
    assert second is not None and second.images == 80
    assert [json.loads(m.read_text())["guide"] for m in tmp_path.glob("*/meta.json")] == ["b"]
    # A table larger than the whole budget covers the first images only; the others are computed each time.
    big = open_table(tmp_path, {"guide": "c"}, (500, 3, 5), "float32", max_bytes=100 * row)
    assert big is not None and big.images == 100
    assert sum(p.stat().st_size for p in tmp_path.glob("*/logits.bin")) <= 100 * row
    looked_up = big.read(np.array([5, 99, 100, 400]), np.array([0, 1, 2, 0]))
    assert np.isnan(looked_up).all()
    big.write(np.array([5, 400]), np.array([0, 0]), np.ones((2, 5), dtype=np.float32))
    assert (big.read(np.array([5, 400]), np.array([0, 0])) == np.array([[1.0] * 5, [np.nan] * 5])).sum() == 5
    assert open_table(tmp_path, {"guide": "d"}, (10, 3, 5), "float32", max_bytes=row - 1) is None
