"""``search`` and ``trials``: whole ``kdray tune`` searches, timed from outside, each in its own folders.

Every search gets a fresh MLflow store (artifacts included: the searches run in that folder), Tune
storage and, unless shared on purpose, model store and cache, all under one temporary folder. They
run in this process's Ray instance (started once, so its start-up is in no number). Counts come from
the searches' own MLflow runs."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from kdray.bench import BenchOptions
from kdray.config import ExperimentConfig, load_config
from kdray.launch import connect_ray
from kdray.run import run_experiment
from kdray.search.driver import run_search
from kdray.tracking import Tracker

SPACE = {"method.temperature": {"kind": "float", "low": 1.0, "high": 8.0}}


def search_config(folder: Path, options: BenchOptions, name: str, *overrides: str) -> ExperimentConfig:
    """A KD temperature search; everything it writes goes under ``folder``."""
    file = folder / "search.yaml"
    file.write_text(yaml.safe_dump({"search": {"space": SPACE}}))
    return load_config(
        file,
        [
            f"teacher.name={options.teacher}",
            f"student.name={options.student}",
            f"tracking.uri=sqlite:///{folder}/mlflow.db",
            f"scaling.storage_path={folder}/runs",
            f"store.path={folder}/store",
            "search.references=false",
            "search.scheduler.name=none",
            f"search.name={name}",
            *options.overrides,
            *overrides,
        ],
    )


def timed_search(cfg: ExperimentConfig, folder: str) -> tuple[float, Tracker]:
    """Wall seconds of the search, run from ``folder`` (MLflow puts a sqlite store's artifacts in
    ./mlruns). Configs are built before: relative paths in the overrides mean the caller's folder."""
    started = time.perf_counter()
    with contextlib.chdir(folder):
        run_search(cfg, "bench")
    return time.perf_counter() - started, Tracker(cfg.tracking.uri, cfg.tracking.experiment)


def guide_work(tracking: Tracker) -> dict[str, int]:
    """Over every run of the store: images the frozen guides ran on, and teachers trained."""
    forward = 0
    teachers = 0
    for run in tracking.runs({}):
        if run.data.tags.get("kdray.role") == "teacher":
            teachers += 1
        if "guide/forward_images" in run.data.metrics:
            forward += sum(int(m.value) for m in tracking.metric_history(run.info.run_id, "guide/forward_images"))
    return {"teacher_forward_images": forward, "teachers_trained": teachers}


def utilisation(tracking: Tracker) -> dict[str, float]:
    """The search run's own account of its time (``search/utilisation``: trial training seconds over the
    trial slots' seconds), and the seconds its shared guides took before the trials."""
    (search,) = tracking.runs({"kdray.role": "search"})
    metrics = search.data.metrics
    return {
        "utilisation": round(metrics["search/utilisation"], 3),
        "slots": int(metrics["search/slots"]),
        "shared_guides_s": round(metrics["search/shared_guides_s"], 1),
    }


def measure_search(options: BenchOptions) -> dict:
    """The same search twice: model store and guide cache on (kdray's defaults), then off; wall time, teacher
    work and the search's utilisation (shared guides first, then the trials) for each."""
    results = {}
    connect_ray(log_to_driver=False)
    for label, switches in (("on", ()), ("off", ("store.reuse=false", "guide_cache.enabled=false"))):
        with tempfile.TemporaryDirectory() as folder:
            cfg = search_config(
                Path(folder),
                options,
                f"bench-{label}",
                f"search.num_samples={options.search_trials}",
                "train.epochs=3",
                "teacher.epochs=3",
                *switches,
            )
            seconds, tracking = timed_search(cfg, folder)
            results[label] = {"wall_s": round(seconds, 1), **guide_work(tracking), **utilisation(tracking)}
    on, off = results["on"], results["off"]
    return {
        "store_and_cache_on": on,
        "store_and_cache_off": off,
        "wall_ratio_on_over_off": round(on["wall_s"] / off["wall_s"], 3),
        "trials": options.search_trials,
    }


TRIAL_MODES = {"in_process": 0, "ray_train_1_worker": 1}  # label: scaling.num_workers


def measure_trials(options: BenchOptions, trials: int = 3, modes: tuple[str, ...] = tuple(TRIAL_MODES)) -> dict:
    """Seconds one more trial adds to a sequential search, from searches of 1 and ``trials`` trials with
    a stored teacher and one student epoch, for each of ``modes`` (in-process, 1-worker Ray Train runs);
    minus the trial's own training and evaluation time, that is the per-trial overhead."""
    connect_ray(log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        base = ("search.max_concurrent_trials=1", "train.epochs=1", "teacher.epochs=2")
        # Train the teacher once, outside every timed search (1 and 0 workers share its key); each search
        # gets a copy of that store, so it reuses the teacher but trains every student itself.
        warm = search_config(Path(folder), options, "warm-up", *base)
        with contextlib.chdir(folder):
            shutil.rmtree(run_experiment(warm).student.stored.path)  # keep the teacher only
        for label in modes:
            workers = TRIAL_MODES[label]
            walls = {}
            for count in (1, trials):
                name = f"{label}-{count}"
                shutil.copytree(warm.store.path, Path(folder) / f"store-{name}")
                cfg = search_config(
                    Path(folder),
                    options,
                    name,
                    *base,
                    f"search.num_samples={count}",
                    f"scaling.num_workers={workers}",
                    f"store.path={folder}/store-{name}",
                )
                walls[count], tracking = timed_search(cfg, folder)
            per_trial = (walls[trials] - walls[1]) / (trials - 1)
            train_s = _trial_training_seconds(tracking, cfg)
            results[label] = {
                "per_trial_s": round(per_trial, 1),
                "training_s": round(train_s, 1),
                "overhead_s": round(per_trial - train_s, 1),
            }
    return results


def _trial_training_seconds(tracking: Tracker, cfg: ExperimentConfig) -> float:
    """Mean time a trial of the last search spent in its training epochs (from the images/s it logged)."""
    runs = tracking.runs({"kdray.role": "trial"}, newest_first=True)
    rates = [
        run.data.metrics["images_per_s"] for run in runs[: cfg.search.num_samples] if "images_per_s" in run.data.metrics
    ]
    if not rates:
        return 0.0
    images_per_epoch = _train_images(cfg)
    return statistics.mean(cfg.train.epochs * images_per_epoch / rate for rate in rates)


def _train_images(cfg: ExperimentConfig) -> int:
    from kdray.data import load_dataset

    dataset = load_dataset(cfg.data)
    return len(dataset.train) // cfg.train.batch_size * cfg.train.batch_size
