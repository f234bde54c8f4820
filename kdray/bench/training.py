"""``step`` and ``cache``: kdray's engine (``kdray.engine.fit``) timed on in-memory data.

Both take the images/s that ``fit`` logs for its last epoch (training only: evaluation is outside
the timer), after one warm-up epoch, so allocator and kernel selection costs are left out on both
sides of every comparison.
"""

from __future__ import annotations

import random
import tempfile
from statistics import median

import torch

from kdray.bench.loop import hand_written_kd_epoch
from kdray.bench.options import BenchOptions, synthetic_dataset
from kdray.build import build_stage, model_info
from kdray.data import Dataset
from kdray.distributed import WorkerContext, local_context
from kdray.engine import fit
from kdray.models import StagedNet, build_model
from kdray.resolve import load_config
from kdray.schema import ExperimentConfig
from kdray.sinks import MemorySink
from kdray.stages import plan_stages


def bench_config(options: BenchOptions, *overrides: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"teacher.name={options.teacher}",
            f"student.name={options.student}",
            f"train.batch_size={options.batch_size}",
            "train.epochs=2",
            "data.augment.padding=4",  # CIFAR's augmentation: 162 views per image
            "data.augment.flip=true",
            f"scaling.use_gpu={options.device == 'cuda'}",
            *overrides,
        ],
    )


def engine_epoch(cfg: ExperimentConfig, data: Dataset, guides: list[StagedNet], ctx: WorkerContext) -> dict:
    """Metrics of the last epoch of a ``fit`` of ``cfg``'s student."""
    plan = plan_stages(cfg, data.fingerprint())[-1]
    return fit(build_stage(cfg, plan, data, guides, ctx), MemorySink()).history[-1]


def _teacher(options: BenchOptions, data: Dataset) -> StagedNet:
    torch.manual_seed(1)
    return build_model(options.teacher, model_info(data))


STEP_TARGET = 0.97  # kdray's KD step over the hand-written loop's images/s


def median_interval(values: list[float], level: float = 0.95, resamples: int = 10_000) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (seeded: the same rounds give the same
    interval). Bootstrap, not a t-interval: round-to-round spread on a shared machine has outliers."""
    if len(values) < 2:
        return values[0], values[0]
    rng = random.Random(0)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]


def measure_step(options: BenchOptions) -> dict:
    """kdray's KD step vs the hand-written loop, alternated ``rounds`` times: median images/s of each, the
    median of the rounds' ratios and its 95% interval; the verdict against the 0.97 target is "unresolved"
    while the interval straddles it (then run more ``--rounds``)."""
    data = synthetic_dataset(options.steps * options.batch_size, options)
    ctx = local_context(options.device == "cuda")
    cfg = bench_config(options, "method.name=kd", "guide_cache.enabled=false")
    teacher = _teacher(options, data)
    kdray_rates, loop_rates = [], []

    def kdray_epoch() -> None:
        kdray_rates.append(engine_epoch(cfg, data, [teacher], ctx)["images_per_s"])

    def loop_epoch() -> None:
        torch.manual_seed(cfg.train.seed)
        student = build_model(options.student, model_info(data))
        loop_rates.append(
            hand_written_kd_epoch(student, teacher, data.train, data.mean, data.std, options.batch_size, ctx.device)
        )

    for round_ in range(options.rounds):  # who goes first alternates, so neither gains from going first
        for measure in (kdray_epoch, loop_epoch) if round_ % 2 == 0 else (loop_epoch, kdray_epoch):
            measure()
    # Each round's two runs are adjacent in time, so their ratio cancels slow drifts of the machine.
    ratios = [k / loop for k, loop in zip(kdray_rates, loop_rates, strict=True)]
    # the verdict is read off the interval as printed, so a reader checking it against the target agrees with it
    low, high = (round(bound, 3) for bound in median_interval(ratios))
    verdict = "meets" if low >= STEP_TARGET else "misses" if high < STEP_TARGET else "unresolved"
    return {
        "kdray_images_per_s": round(median(kdray_rates), 1),
        "loop_images_per_s": round(median(loop_rates), 1),
        "ratio": round(median(ratios), 3),
        "ratio_ci95": [low, high],
        "target": f">= {STEP_TARGET}",
        "verdict": verdict,
        "rounds": {"kdray": [round(r, 1) for r in kdray_rates], "loop": [round(r, 1) for r in loop_rates]},
    }


def measure_cache(options: BenchOptions) -> dict:
    """Seconds per KD epoch with the cache off, cold (empty) and warm (a second run over the same views,
    as every trial after the first in a search), and the student trained alone; medians of ``rounds``."""
    data = synthetic_dataset(options.steps * options.batch_size, options)
    ctx = local_context(options.device == "cuda")
    teacher = _teacher(options, data)
    images = options.steps * options.batch_size
    runs: dict[str, list[dict]] = {"student_alone": [], "cache_off": [], "cache_cold": [], "cache_warm": []}

    def epoch(variant: str, *overrides: str) -> None:
        guides = [] if variant == "student_alone" else [teacher]
        metrics = engine_epoch(bench_config(options, *overrides), data, guides, ctx)
        runs[variant].append(
            {
                "epoch_s": images / metrics["images_per_s"],
                "teacher_images": int(metrics.get("guide/forward_images", 0)),
                **({"hit_rate": metrics["cache/hit_rate"]} if "cache/hit_rate" in metrics else {}),
            }
        )

    for _ in range(options.rounds):
        epoch("student_alone", "method.name=none")
        epoch("cache_off", "method.name=kd", "guide_cache.enabled=false")
        with tempfile.TemporaryDirectory() as folder:
            epoch("cache_cold", "method.name=kd", f"guide_cache.path={folder}")
            epoch("cache_warm", "method.name=kd", f"guide_cache.path={folder}")
    summary = {
        variant: {
            "epoch_s": round(median([run["epoch_s"] for run in measured]), 3),
            **{key: value for key, value in measured[-1].items() if key != "epoch_s"},
        }
        for variant, measured in runs.items()
    }
    floor = summary["student_alone"]["epoch_s"]
    return {
        **summary,
        "warm_over_alone": round(summary["cache_warm"]["epoch_s"] / floor, 3),
        "cold_over_alone": round(summary["cache_cold"]["epoch_s"] / floor, 3),
        "off_over_alone": round(summary["cache_off"]["epoch_s"] / floor, 3),
        "target": "warm_over_alone <= 1.15",
    }
