"""``kdray tune``: a Ray Tune search with Optuna's samplers over an experiment, recorded in MLflow.

Layout in MLflow: one parent run per search (role ``search``), one child run per trial (role
``trial``, created by the trial itself and found again by its Tune trial id), guide stages trained by
a trial nested under that trial, and the reference experiments (student alone, default KD) nested
under the search. A resumed search sets aside the runs of trials Tune's saved state lacks (role
``unrecorded_trial``) until a trial that draws their values takes them over (``kdray.search.unrecorded``).
Tune keeps its state under ``scaling.storage_path/<search name>`` beside ``kdray-search.json`` (the
resolved config and the parent run id), so ``kdray tune --resume NAME`` needs nothing else to continue a
search whose driver was killed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kdray import run_storage
from kdray import tag_names as tag
from kdray.data import Dataset, load_dataset
from kdray.preflight import check_decode_cpus, check_models, check_writable
from kdray.ray_session import connect_ray
from kdray.resolve import validate_config
from kdray.run import run_experiment, run_tags
from kdray.schema import COST_METRICS, ConfigError, ExperimentConfig, SamplerConfig, absolute_path, plain_name
from kdray.search.findings import REFERENCE_NAMES, SearchReport, study_of
from kdray.search.objectives import ObjectiveSearch, allow_metrics_at_completion
from kdray.search.progress import SearchProgress
from kdray.search.report import gather_report, publish, rendered
from kdray.search.shared import train_shared_guides
from kdray.search.space import check_space, default_points, sample
from kdray.search.trial import run_trial
from kdray.search.unrecorded import (
    align_searcher_with_trials,
    restored_trial_ids,
    runs_of_trial,
    set_aside,
    tune_saved_a_state,
)
from kdray.store import ModelStore, open_store
from kdray.tracking import Tracker, flatten

log = logging.getLogger(__name__)

STATE_FILE = "kdray-search.json"


@dataclass
class SearchOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    report: SearchReport
    registered: str | None = None  # models:/<name>/<version> of the best student, when registered
    optuna_storage: str = ""  # the Optuna study's storage URL (study name: the search's name)


def make_sampler(sampler: SamplerConfig) -> Any:
    """Optuna's seeded TPE (default; one or several objectives), Gaussian-process, NSGA-II or random sampler. The
    first three prefer trials that meet the constraints ``ObjectiveSearch`` sets on them."""
    import optuna

    if sampler.name == "gp":
        return optuna.samplers.GPSampler(seed=sampler.seed)
    if sampler.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=sampler.seed)
    if sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=sampler.seed)
    return optuna.samplers.TPESampler(seed=sampler.seed)


def make_searcher(cfg: ExperimentConfig, parent: str) -> Any:
    """Ray Tune's ``OptunaSearch`` over the space (define-by-run), the default points first; with several
    objectives ``ObjectiveSearch`` (their cost metrics read from the trials' runs, constraints to the sampler)."""
    from ray.tune.search.optuna import OptunaSearch

    search = cfg.search
    common = {
        "space": partial(sample, space={k: v.model_dump() for k, v in search.space.items()}, method=cfg.method.name),
        "points_to_evaluate": default_points(cfg),
    }
    if not search.objectives:
        return OptunaSearch(metric=search.metric, mode=search.mode, sampler=make_sampler(search.sampler), **common)
    return ObjectiveSearch(
        uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, parent=parent,
        constraints=search.parsed_constraints, metric=[o.metric for o in search.objectives],
        mode=[o.mode for o in search.objectives], sampler=make_sampler(search.sampler), **common,
    )  # fmt: skip


def make_scheduler(cfg: ExperimentConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = cfg.search.scheduler
    if scheduler.name == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=scheduler.max_t or cfg.train.epochs,
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )


class TrialRunCloser(Callback):
    """A Tune callback on the driver: closes the trial runs a trial could not close itself.

    A trial stopped by ASHA is ended from outside, so its run is still RUNNING: it ends FINISHED (MLflow's
    UI draws KILLED and FAILED runs with a red cross, and a scheduler's stop is no failure) with the reason
    in ``kdray.stopped`` and in the run's description. A trial that errored after its retries becomes
    FAILED with the error's last line.
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str) -> None:
        super().__init__()
        self.uri = uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id

    def _running(self, trial_id: str) -> str | None:
        runs = runs_of_trial(Tracker(self.uri, self.experiment), self.parent_run_id, trial_id)
        return runs[0].info.run_id if runs and runs[0].info.status == "RUNNING" else None

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._running(trial.trial_id)
        if run_id is not None:
            epoch = (trial.last_result or {}).get("epoch", 0)
            end_stopped(Tracker(self.uri, self.experiment), run_id, f"stopped by ASHA after epoch {epoch}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._running(trial.trial_id)
        if run_id is not None:
            reason = "the trial failed"
            if trial.error_file and os.path.exists(trial.error_file):
                lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
                reason = lines[-1] if lines else reason
            tracker = Tracker(self.uri, self.experiment)
            tracker.set_tags(run_id, {tag.ERROR: reason[:5000]})
            tracker.end_run(run_id, "FAILED")


def end_stopped(tracker: Tracker, run_id: str, why: str) -> None:
    """End a trial run the search stopped: FINISHED, with why in ``kdray.stopped`` and on its page."""
    note = f"Stopped early ({why}): not a failure; a trial stopped early stores no student."
    tracker.set_tags(run_id, {tag.STOPPED: why, tag.NOTE: note})
    tracker.end_run(run_id, "FINISHED")


def _trainable(cfg: ExperimentConfig, setup: dict[str, Any]) -> Any:
    from ray import tune

    trainable = tune.with_parameters(run_trial, setup=setup)
    if cfg.scaling.on_ray_train:
        # The trial only launches a TorchTrainer, whose workers hold the CPUs/GPUs. Tune refuses an empty
        # request, so the trial asks for one byte of memory: any CPU share would keep a worker group that
        # needs every CPU of the cluster from ever starting.
        return tune.with_resources(trainable, {"CPU": 0, "memory": 1})
    return tune.with_resources(trainable, dict(cfg.search.resources_per_trial))


def reuse_actors(cfg: ExperimentConfig) -> bool:
    """Whether Tune starts a trial in an ended trial's process: for in-process trials, as ``search.reuse_actors``
    says. Never for Ray Train trials: their process only waits on a worker group that is new for every trial
    anyway, and one that ASHA stopped inside its TorchTrainer left the next trial in that process without
    results (Ray 2.60)."""
    return cfg.search.reuse_actors and not cfg.scaling.on_ray_train


def optuna_url(cfg: ExperimentConfig) -> str:
    """Where the finished search is kept as an Optuna study (named like the search), so ``optuna-dashboard``
    can open it: ``optuna.db`` beside a sqlite MLflow store, else in ``scaling.storage_path`` (a local
    folder; with storage on s3:// the driver's working folder).

    The searcher itself keeps its study in memory: Tune checkpoints it with the search, and a resumed
    search restores it; a study in a database would run ahead of that checkpoint (trials finished after
    it), and a resumed trial could not report to its already finished Optuna trial."""
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
    else:
        folder = Path(cfg.scaling.storage_path) if "://" not in cfg.scaling.storage_path else Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


def save_study(report: SearchReport, cfg: ExperimentConfig, name: str) -> None:
    """Write the search's scored trials as the Optuna study ``name`` at ``optuna_url(cfg)`` (replacing an
    earlier copy: a resumed search writes it again), under a lock, as two searches may end together."""
    import filelock
    import optuna

    url = optuna_url(cfg)
    database = Path(url.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(f"{database}.lock"):
        storage = optuna.storages.RDBStorage(url)
        if name in {summary.study_name for summary in optuna.get_all_study_summaries(storage)}:
            optuna.delete_study(study_name=name, storage=storage)
        study_of(report, cfg, storage, name)


def progress(cfg: ExperimentConfig, name: str) -> SearchProgress:
    """The live status table on stdout, in place of what Ray Tune and Optuna print for their own users: the new
    output engine (switched off: the legacy one at verbose=0 prints nothing), the note that the experiment
    state was written, warnings that checkpoints are frequent (every epoch of every trial is, by design),
    and Optuna's announcement of each in-memory study."""
    import optuna

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = cfg.search
    return SearchProgress(name, search.metric, search.mode, search.num_samples, cfg.train.epochs, cfg.method.name)


def run_search(cfg: ExperimentConfig, default_name: str) -> SearchOutcome:
    """Start a new search; every check runs before Ray or MLflow is touched."""
    check_space(cfg)
    check_writable(cfg)
    name = cfg.search.name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        plain_name(name)  # it names a folder under scaling.storage_path
    except ValueError as error:
        raise ConfigError(f"search.name: {error}") from None
    root = cfg.scaling.storage_path
    if run_storage.exists(run_storage.join(root, name)):
        raise ConfigError(
            f"search.name: a search called '{name}' exists under {root}; "
            f"continue it with `kdray tune --resume {name}` or choose another name"
        )
    dataset = load_dataset(cfg.data)
    check_models(cfg, dataset)
    check_decode_cpus(cfg, dataset)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    tags = {**run_tags(cfg), tag.ROLE: "search", tag.SEARCH_NAME: name}
    parent = tracker.start_run(name, tags)
    tracker.log_params(parent, flatten(cfg.dump()))
    tracker.set_tags(parent, {tag.OPTUNA_STORAGE: optuna_url(cfg), tag.OPTUNA_STUDY: name})
    tracker.log_text(parent, cfg.to_yaml(), "config.yaml")
    state = json.dumps({"config": cfg.dump(), "parent_run_id": parent})
    run_storage.write_text(run_storage.join(root, name, STATE_FILE), state)
    return _start_tune(cfg, name, parent, tracker, dataset)


def _start_tune(
    cfg: ExperimentConfig, name: str, parent: str, tracker: Tracker, dataset: Dataset, resumed: bool = False
) -> SearchOutcome:
    """Train the shared guides and run the trials, from the first: a new search, or (``resumed``) one whose
    driver stopped before Tune saved any state, whose earlier trial runs the new trials take over."""
    root = cfg.scaling.storage_path
    with tracker.run(parent, finish=False):  # _finish ends it FINISHED; anything raised, FAILED
        from ray import tune

        connect_ray(log_to_driver=False)
        setup = {"base": cfg.dump(), "parent_run_id": parent, "search_name": name, "resumed": resumed}
        search = cfg.search
        watch = progress(cfg, name)  # first: it quiets Optuna, which announces the searcher's study
        searcher = make_searcher(cfg, parent)
        allow_metrics_at_completion(cfg)
        tuner = tune.Tuner(
            _trainable(cfg, setup),
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                search_alg=searcher,
                scheduler=make_scheduler(cfg),
                num_samples=search.num_samples,
                max_concurrent_trials=search.max_concurrent_trials,
                reuse_actors=reuse_actors(cfg),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=root,
                failure_config=tune.FailureConfig(max_failures=search.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.scaling.keep_checkpoints),
                callbacks=[TrialRunCloser(cfg.tracking.uri, cfg.tracking.experiment, parent), watch],
                verbose=0,
            ),
        )
        shared_s = train_shared_guides(cfg, dataset, tracker, parent)
        started = time.perf_counter()
        tuner.fit()
        log_utilisation(tracker, parent, cfg, time.perf_counter() - started, shared_s)
        return _finish(cfg, name, parent, tracker)


def concurrent_slots(cfg: ExperimentConfig) -> int:
    """How many trials the cluster runs at once: ``max_concurrent_trials`` within what its CPUs (and GPUs)
    hold, counting a Ray Train trial by its workers."""
    import ray

    search, scaling = cfg.search, cfg.scaling
    if scaling.on_ray_train:
        per_worker = {"CPU": 1.0, **scaling.resources_per_worker}
        per_trial = {name: amount * scaling.num_workers for name, amount in per_worker.items()}
    else:
        per_trial = {"CPU": 1.0, **search.resources_per_trial}
    cluster = ray.cluster_resources()
    fits = [cluster.get(name, 0) // amount for name, amount in per_trial.items() if name in ("CPU", "GPU") and amount]
    return int(max(1, min([search.max_concurrent_trials, search.num_samples, *fits])))


def trials_training_seconds(tracker: Tracker, parent: str) -> float:
    """Seconds the trials under search run ``parent`` spent in their training epochs (their ``epoch_s``)."""
    return sum(
        point.value
        for run in tracker.runs_under(parent, role="trial")
        for point in tracker.metric_history(run.info.run_id, "epoch_s")
    )


def log_utilisation(tracker: Tracker, parent: str, cfg: ExperimentConfig, wall_s: float, shared_s: float) -> None:
    """``search/utilisation`` on the search run: the seconds trials spent in their training epochs over the
    seconds the trial slots were there (the trials' phase, from Tune's start to its end, times the slots).
    What is not training is per-trial overhead (process start, imports, data, evaluation) and idle slots.
    The shared guides trained before the trials are timed apart (``search/shared_guides_s``)."""
    trained = trials_training_seconds(tracker, parent)
    slots = concurrent_slots(cfg)
    metrics = {
        "search/utilisation": trained / (wall_s * slots),
        "search/trials_wall_s": wall_s,
        "search/trials_train_s": trained,
        "search/slots": float(slots),
        "search/shared_guides_s": shared_s,
    }
    tracker.log_metrics(parent, metrics, step=0)
    log.info("search utilisation %.2f: %.0f s of training in %.0f s x %d slots", trained / (wall_s * slots), trained,
             wall_s, slots)  # fmt: skip


def resume_search(name: str, storage_path: str) -> SearchOutcome:
    """Continue a search whose driver died: Tune's trials and the searcher's state come back from the
    search folder, the same MLflow runs continue."""
    root = absolute_path(storage_path)
    try:
        plain_name(name)  # never a path: the search's folder is read (and Tune's pickles loaded) from it
    except ValueError as error:
        raise ConfigError(f"--resume: {error}") from None
    folder = run_storage.join(root, name)
    state_file = run_storage.join(folder, STATE_FILE)
    if not run_storage.exists(state_file):
        raise ConfigError(f"--resume {name}: no search of that name under {root} (set --storage to its storage_path)")
    state = json.loads(run_storage.read_text(state_file))
    cfg = validate_config(state["config"])
    parent = state["parent_run_id"]
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    tracker.reopen(parent)
    close_orphans(tracker, parent, open_store(cfg.store))
    from ray import tune

    # Tune writes tuner.pkl when the Tuner is made: with it and no saved state, Tune's own restore logs a
    # traceback ("no experiment state file") and runs one trial of num_samples. Start over here instead.
    if not tune.Tuner.can_restore(folder) or not tune_saved_a_state(folder):
        log.info(
            "search %s: its driver stopped before Tune saved a first state; starting its trials afresh under the "
            "same name and MLflow run (the runs it had opened are taken over or closed)",
            name,
        )
        set_aside(tracker, parent, set())
        return _start_tune(cfg, name, parent, tracker, load_dataset(cfg.data), resumed=True)
    realigned = align_searcher_with_trials(folder)
    if realigned is not None:
        log.info(
            "search %s: its saved trial list and searcher were out of step (the driver died between saving them); "
            "trials the searcher never saw, to be drawn again: %s; trials created: %d (it had counted %d)",
            name, ", ".join(realigned.unseen) or "none", realigned.count_after, realigned.count_before,
        )  # fmt: skip
    with tracker.run(parent, finish=False):  # _finish ends it FINISHED; anything raised, FAILED
        connect_ray(log_to_driver=False)
        setup = {"base": cfg.dump(), "parent_run_id": parent, "search_name": name, "resumed": True}
        tuner = tune.Tuner.restore(
            folder, trainable=_trainable(cfg, setup), resume_unfinished=True, resume_errored=True
        )
        set_aside(tracker, parent, restored_trial_ids(folder))
        train_shared_guides(cfg, load_dataset(cfg.data), tracker, parent)  # the rest of any interrupted there
        allow_metrics_at_completion(cfg)
        tuner.fit()
        return _finish(cfg, name, parent, tracker)


def close_orphans(tracker: Tracker, parent: str, store: ModelStore) -> None:
    """Guide runs (teachers, assistants) that the shared-guides task or trials were training when the driver
    died stay RUNNING: nothing will write to them again. One whose model reached the store (a process outlives
    its driver by a moment) ends FINISHED; the others end KILLED, and the resumed search trains the model in a
    new run, from its checkpoint."""
    trials = tracker.runs_under(parent, role="trial")
    shared = [run for run in tracker.runs_under(parent) if run.data.tags.get(tag.SHARED_GUIDE) == "true"]
    for run in [*shared, *(guide for trial in trials for guide in tracker.runs_under(trial.info.run_id))]:
        if run.info.status != "RUNNING":
            continue
        key = run.data.tags.get(tag.MODEL_KEY)
        if key and store.find(key) is not None:
            closed = "on resume: its model was stored before the driver stopped"
            tracker.set_tags(run.info.run_id, {tag.CLOSED: closed})
            tracker.end_run(run.info.run_id)
        else:
            why = "interrupted: the search's driver stopped; `kdray tune --resume` trains this model in a new run"
            tracker.set_tags(run.info.run_id, {tag.ERROR: why})
            tracker.end_run(run.info.run_id, "KILLED")


def _finish(cfg: ExperimentConfig, name: str, parent: str, tracker: Tracker) -> SearchOutcome:
    """Close what is still open, train the references, write the report to the parent run."""
    for run in tracker.runs_under(parent, role="trial"):
        if run.info.status == "RUNNING":  # its trial is over (the search is): nothing will close it
            end_stopped(tracker, run.info.run_id, "not finished when the search ended")
    references: dict[str, float] = {}
    points: list[dict[str, Any]] = []
    if cfg.search.objectives:  # the references of every architecture on the front: how far distillation moved it
        points = front_references(cfg, tracker, parent, gather_report(tracker, parent, cfg, {}, []))
    else:
        for method in cfg.search.references:
            result = run_reference(cfg, parent, method, cfg.student.name)
            references[method] = result.student.metrics.get(cfg.search.metric, math.nan)
    report = rendered(gather_report(tracker, parent, cfg, references, points), cfg)
    publish(tracker, parent, report)
    save_study(report, cfg, name)
    registered = None
    if cfg.search.register_model and cfg.search.objectives:
        registered = register_front(tracker, parent, report, f"{cfg.tracking.experiment}-pareto")
    elif cfg.search.register_model:
        registered = register_best(tracker, parent, report, f"{cfg.tracking.experiment}-student")
    tracker.end_run(parent)
    return SearchOutcome(name, parent, cfg.tracking.uri, report, registered, optuna_url(cfg))


def run_reference(cfg: ExperimentConfig, parent: str, method: str, student: str) -> Any:
    """``method`` at its defaults on the ``student`` architecture, with the search's budget, nested under it."""
    label = f"reference: {REFERENCE_NAMES.get(method, method)}" + (f", {student}" if cfg.search.objectives else "")
    log.info("%s (%s at its defaults, %d epochs, as a baseline)", label, method, cfg.train.epochs)
    raw = {**cfg.dump(), "method": {"name": method}, "assistants": {}, "search": {}}
    raw["student"] = {**raw["student"], "name": student}
    raw["tracking"] = {**raw["tracking"], "run_name": label}
    return run_experiment(validate_config(raw), parent_run_id=parent, role="reference")


def front_references(
    cfg: ExperimentConfig, tracker: Tracker, parent: str, report: SearchReport
) -> list[dict[str, Any]]:
    """Each reference method on each architecture of the front; each point with the architecture's cost (the
    front trial's: measured once per architecture), tagged on its run for ``kdray report``."""
    rows = {row.run_id: row for row in report.rows}
    costs = {}
    for run_id in report.front:
        costs.setdefault(rows[run_id].model, {k: v for k, v in rows[run_id].values.items() if k in COST_METRICS})
    points = []
    for model, cost in costs.items():
        for method in cfg.search.references:
            result = run_reference(cfg, parent, method, model)
            tracker.set_tags(result.parent_run_id, {tag.PARETO_MODEL: model})
            tracker.log_metrics(result.parent_run_id, cost, step=0)
            values = {k: v for k, v in result.student.metrics.items() if k.startswith("val/")} | cost
            points.append({"method": method, "model": model, "values": values})
    return points


def register_front(tracker: Tracker, parent: str, report: SearchReport, name: str) -> str | None:
    """Every front member's student as a version of ``name`` (best first by the first objective), its
    architecture, objectives and cost as the version's tags; ``models:/name`` tagged on the search run."""
    rows = {row.run_id: row for row in report.rows}
    registered = []
    for run_id in report.front:
        row = rows[run_id]
        model_id = student_model_id(tracker, row.run_id)
        if model_id is None:
            continue
        version = tracker.register_model(model_id, name)
        point = report.point(row)
        tags = {"trial": row.name, "architecture": row.model, "method": row.method}
        tags |= {metric: f"{value:.6g}" for metric, value in point.items() if metric in (*COST_METRICS, report.metric)}
        tracker.tag_model_version(name, version, tags)
        registered.append(f"models:/{name}/{version}")
    if not registered:
        return None
    tracker.set_tags(parent, {tag.PARETO_MODEL: name, tag.REGISTERED_MODEL: registered[0]})
    log.info("front of %d students registered as versions of %s", len(registered), name)
    return registered[0]


def student_model_id(tracker: Tracker, run_id: str) -> str | None:
    """The logged model of a trial's student: its own, or that of the run it reused."""
    tags = tracker.tags(run_id)
    model_id = tags.get(tag.MODEL_ID)
    source = tags.get(tag.SOURCE_RUN_ID, "")
    if not model_id and tracker.has_run(source):  # reused a model logged by an earlier run of this store
        model_id = tracker.tags(source).get(tag.MODEL_ID)
    return model_id or None


def register_best(tracker: Tracker, parent: str, report: SearchReport, name: str) -> str | None:
    """Register the best finished trial's student (its logged model, or that of the run it reused) as a new
    version of ``name`` in the MLflow Model Registry; its ``models:/`` URI, tagged on the search run."""
    for row in report.ranked:
        if row.status != "FINISHED":
            continue  # a trial stopped early stored no student
        model_id = student_model_id(tracker, row.run_id)
        if model_id:
            uri = f"models:/{name}/{tracker.register_model(model_id, name)}"
            tracker.set_tags(parent, {tag.REGISTERED_MODEL: uri})
            log.info("best student (%s) registered as %s", row.name, uri)
            return uri
    return None
