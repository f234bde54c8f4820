"""``search`` and ``trials``: whole ``kdray tune`` searches, timed from outside, each in its own folders.

Every search gets a fresh MLflow store (artifacts included: the searches run in that folder), Tune
storage and, unless shared on purpose, model store and cache, all under one temporary folder. They
run in this process's Ray instance (started once, so its start-up is in no number). Counts come from
the searches' own MLflow runs."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from kdray import tag_names as tag
from kdray.bench.options import BenchOptions
from kdray.ray_session import connect_ray
from kdray.resolve import load_config
from kdray.run import run_experiment
from kdray.schema import ExperimentConfig
from kdray.search.driver import run_search, trials_training_seconds
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
        if run.data.tags.get(tag.ROLE) == "teacher":
            teachers += 1
        if "guide/forward_images" in run.data.metrics:
            forward += sum(int(m.value) for m in tracking.metric_history(run.info.run_id, "guide/forward_images"))
    return {"teacher_forward_images": forward, "teachers_trained": teachers}


def utilisation(tracking: Tracker) -> dict[str, float]:
    """The search run's own account of its time (``search/utilisation``: trial training seconds over the
    trial slots' seconds), and the seconds its shared guides took before the trials."""
    (search,) = tracking.runs({tag.ROLE: "search"})
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


TRIAL_MODES = {  # label: overrides of the timed searches
    "in_process": ("scaling.num_workers=0",),
    "in_process_fresh_process_per_trial": ("scaling.num_workers=0", "search.reuse_actors=false"),
    "ray_train_1_worker": ("scaling.num_workers=1",),
}


def measure_trials(
    options: BenchOptions, counts: tuple[int, int] = (2, 6), modes: tuple[str, ...] = tuple(TRIAL_MODES)
) -> dict:
    """Seconds one more trial adds to a sequential search, from searches of ``counts`` trials with a stored
    teacher and one student epoch, for each of ``modes``; minus the trial's own training epochs, that is the
    per-trial overhead (process start or reuse, MLflow run, data, model, teacher load, evaluation). Taking
    the difference cancels what every search pays once (Tune's start, the first trial process)."""
    connect_ray(log_to_driver=False)
    few, many = counts
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        base = ("search.max_concurrent_trials=1", "train.epochs=1", "teacher.epochs=2")
        # Train the teacher once, outside every timed search (1 and 0 workers share its key); each search
        # gets a copy of that store, so it reuses the teacher but trains every student itself.
        warm = search_config(Path(folder), options, "warm-up", *base)
        with contextlib.chdir(folder):
            shutil.rmtree(run_experiment(warm).student.stored.path)  # keep the teacher only
        for label in modes:
            walls, training = {}, {}
            for count in counts:
                name = f"{label}-{count}"
                shutil.copytree(warm.store.path, Path(folder) / f"store-{name}")
                cfg = search_config(
                    Path(folder),
                    options,
                    name,
                    *base,
                    *TRIAL_MODES[label],
                    f"search.num_samples={count}",
                    f"store.path={folder}/store-{name}",
                )
                walls[count], tracking = timed_search(cfg, folder)
                training[count] = _training_seconds(tracking, name)
            per_trial = (walls[many] - walls[few]) / (many - few)
            train_s = (training[many] - training[few]) / (many - few)
            results[label] = {
                "per_trial_s": round(per_trial, 2),
                "training_s": round(train_s, 2),
                "overhead_s": round(per_trial - train_s, 2),
            }
    return {**results, "trials": list(counts)}


def _training_seconds(tracking: Tracker, search_name: str) -> float:
    """Seconds the trials of search ``search_name`` spent in their training epochs."""
    (search,) = tracking.runs({tag.ROLE: "search", tag.SEARCH_NAME: search_name})
    return trials_training_seconds(tracking, search.info.run_id)
