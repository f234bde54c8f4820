"""MLflow behind one small interface: every run kdray reads or writes goes through a ``Tracker``.

Runs are addressed by explicit ids (no global active run), so the same calls work on the driver, in
a Tune trial and inside a Ray Train worker. Searches for runs are expressed as tag conditions and
turned into MLflow's filter syntax in one place (``_filter``). ``NullTracker`` records nothing, for
code that runs without a store (Ray Train workers other than the chief, benchmarks, tests).
"""

from __future__ import annotations

import contextlib
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import filelock

import kdray
from kdray import tag_names as tag
from kdray.schema import ConfigError, absolute_uri

log = logging.getLogger(__name__)

# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; kdray's are training runs.
KIND = {tag.EXPERIMENT_KIND: "custom_model_development"}


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


def check_reachable(uri: str) -> None:
    """Refuse a tracking URI that cannot work, before any training starts."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(
                f"tracking.uri: cannot reach the MLflow server at {uri} ({reason}); start it or point "
                "tracking.uri / MLFLOW_TRACKING_URI elsewhere"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(f"tracking.uri: folder {folder} of the sqlite store does not exist; create it first")


def _first_use_lock(uri: str) -> contextlib.AbstractContextManager[Any]:
    """An inter-process lock beside a sqlite store (``<file>.lock``); servers need none."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return filelock.FileLock(uri.removeprefix("sqlite:///") + ".lock")


def _filter(tags: dict[str, str]) -> str:
    """MLflow's filter string for runs carrying all ``tags`` (``mlflow.parentRunId`` included)."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


class RunLogger:
    """Logs metrics of one run; ``after`` drops epochs the run already holds (a resumed stage)."""

    def __init__(self, tracker: Tracker, run_id: str, after: int = 0) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.after = after

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.after:
            self.tracker.log_metrics(self.run_id, metrics, step)


class Tracker:
    """One MLflow experiment: runs, params, tags, metrics and artifacts."""

    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        uri = absolute_uri(uri)  # MLflow caches stores by URI: a relative sqlite path would outlive a chdir
        check_reachable(uri)
        self.uri = uri
        # The first access to a new sqlite store creates its schema, and a missing experiment is created:
        # processes started together (two `kdray train`, a search's trials) would race at both, so they
        # take turns on a lock file beside the store.
        with _first_use_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, tags=KIND)

    # --- finding runs --------------------------------------------------------------------------------

    def runs(self, tags: dict[str, str], newest_first: bool = False, limit: int = 10000) -> list[Any]:
        """Runs of this experiment carrying all ``tags``, oldest first unless ``newest_first``."""
        order = "DESC" if newest_first else "ASC"
        return list(
            self.client.search_runs(
                [self.experiment_id], _filter(tags), max_results=limit, order_by=[f"attributes.start_time {order}"]
            )
        )

    def find_unfinished(self, name: str, tags: dict[str, str]) -> Any | None:
        """The newest run called ``name`` with these tags that did not finish (killed, failed, or still
        RUNNING because its driver died): the run a rerun continues."""
        for run in self.runs(tags, newest_first=True, limit=20):
            if run.info.run_name == name:
                return run if run.info.status != "FINISHED" else None
        return None

    def runs_under(self, parent_id: str, role: str | None = None) -> list[Any]:
        """A parent's child runs (with tag ``kdray.role`` = ``role`` if given), oldest first."""
        return self.runs({tag.PARENT_RUN_ID: parent_id, **({tag.ROLE: role} if role else {})})

    def children(self, parent_id: str) -> dict[str, Any]:
        """A parent's child runs by stage key (tag ``kdray.model_key``)."""
        runs = self.runs_under(parent_id)
        return {run.data.tags[tag.MODEL_KEY]: run for run in runs if tag.MODEL_KEY in run.data.tags}

    def has_run(self, run_id: str) -> bool:
        """Whether this tracking store holds run ``run_id`` (a model store can outlive, or be shared across,
        tracking stores: a stored model's source run may be elsewhere)."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def tags(self, run_id: str) -> dict[str, str]:
        """A run's tags (none for an empty id)."""
        return dict(self.client.get_run(run_id).data.tags) if run_id else {}

    def params(self, run_id: str) -> dict[str, str]:
        """A run's params."""
        return dict(self.client.get_run(run_id).data.params)

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric a run holds."""
        return dict(self.client.get_run(run_id).data.metrics)

    def metric_history(self, run_id: str, metric: str) -> list[Any]:
        """Every logged value of ``metric`` in step order."""
        return sorted(self.client.get_metric_history(run_id, metric), key=lambda m: m.step)

    def logged_until(self, run_id: str, metric: str = "val/acc") -> int:
        """The last epoch whose metrics a run already holds (0 for a new run)."""
        return max((m.step for m in self.client.get_metric_history(run_id, metric)), default=0)

    # --- writing -------------------------------------------------------------------------------------

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        if parent_id is not None:
            tags = {**tags, tag.PARENT_RUN_ID: parent_id}
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def rename(self, run_id: str, name: str) -> None:
        self.client.update_run(run_id, name=name)

    def delete_tag(self, run_id: str, key: str) -> None:
        """Remove ``key`` from a run if it is there."""
        if key in self.tags(run_id):
            self.client.delete_tag(run_id, key)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def fail(self, run_id: str, error: BaseException) -> None:
        """End a run FAILED (KILLED on Ctrl-C) with the error as its ``kdray.error``; a
        broken tracking store is logged, never raised: it must not hide ``error``."""
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        try:
            self.set_tags(run_id, {tag.ERROR: f"{type(error).__name__}: {error}"[:5000]})
            self.end_run(run_id, status)
        except Exception as tracking_error:
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, tracking_error)

    @contextlib.contextmanager
    def run(self, run_id: str, finish: bool = True) -> Iterator[str]:
        """Run ``run_id`` for the block: whatever raises inside ends it FAILED or KILLED (``fail``) and goes on
        up; a block that returns ends it FINISHED, unless ``finish=False`` (the block hands the run on, or
        another process ends it). So no run is left RUNNING by a failure of kdray's."""
        try:
            yield run_id
        except BaseException as error:
            self.fail(run_id, error)
            raise
        if finish:
            self.end_run(run_id)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()])

    def continuing_logger(self, run_id: str) -> RunLogger:
        """A logger for a run that may already hold epochs (a resumed stage): those are not logged again."""
        return RunLogger(self, run_id, self.logged_until(run_id))

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_artifact(self, run_id: str, file: Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(file), folder)

    def log_model(self, run_id: str, model: Any, image_shape: tuple[int, int, int], name: str = "model") -> str:
        """Log ``model`` (float [0, 1] NCHW images -> logits) as an MLflow model of run ``run_id``, with its
        signature and a one-image input example; returns its model id (``models:/<id>`` loads it).

        Pickled (cloudpickle), not MLflow 3's default ``pt2``: a pickled module loads back for every
        architecture kdray trains (torch.export needs a traceable forward, which a user's model need not
        have); loading needs kdray (and a user's model package) importable, as training did.

        The LoggedModel is created here, in this tracker's experiment (the run's): left to
        ``log_model``, MLflow 3.17 files it under the process's current experiment, "Default", where
        the experiment's Models tab and ``search_logged_models`` never find it."""
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        example = np.random.default_rng(0).random((1, *image_shape), dtype=np.float32)
        model = model.cpu().eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(example)).numpy()
        versions = {
            "torch": torch.__version__,
            "torchvision": metadata.version("torchvision"),
            "kdray": kdray.__version__,
        }
        requirements = [f"{package}=={version.split('+')[0]}" for package, version in versions.items()]
        mlflow.set_tracking_uri(self.uri)
        quiet = logging.getLogger("mlflow.pytorch")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its advice to use pt2 is answered in the docstring above
        try:
            logged = mlflow.initialize_logged_model(
                name=name, source_run_id=run_id, experiment_id=self.experiment_id, params=self.params(run_id)
            )
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                run_id=run_id,
                model_id=logged.model_id,
                serialization_format="pickle",
                signature=infer_signature(example, logits),
                input_example=example,
                pip_requirements=requirements,
            )
        finally:
            quiet.setLevel(level)
        return info.model_id

    def register_model(self, model_id: str, name: str) -> str:
        """Register logged model ``model_id`` as a new version of ``name``; returns the version."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        return str(mlflow.register_model(f"models:/{model_id}", name).version)

    def tag_model_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)


class NullTracker(Tracker):
    """Records nothing and finds nothing: for code that runs without a tracking store."""

    def __init__(self) -> None:
        self.uri = ""
        self.experiment_id = ""

    def runs(self, tags: dict[str, str], newest_first: bool = False, limit: int = 10000) -> list[Any]:
        return []

    def params(self, run_id: str) -> dict[str, str]:
        return {}

    def has_run(self, run_id: str) -> bool:
        return True  # nothing is recorded here, so no stored model's run is missing from it

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        return {}

    def metric_history(self, run_id: str, metric: str) -> list[Any]:
        return []

    def logged_until(self, run_id: str, metric: str = "val/acc") -> int:
        return 0

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        return ""

    def reopen(self, run_id: str) -> None:
        return None

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        return None

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        return None

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        return None

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        return None

    def log_text(self, run_id: str, text: str, path: str) -> None:
        return None

    def log_artifact(self, run_id: str, file: Path, folder: str | None = None) -> None:
        return None

    def log_model(self, run_id: str, model: Any, image_shape: tuple[int, int, int], name: str = "model") -> str:
        return ""

    def register_model(self, model_id: str, name: str) -> str:
        return ""


def find_search_run(uri: str, name: str) -> tuple[Any, str] | None:
    """The newest search run called ``name`` in any experiment of the store at ``uri``, and its experiment's name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        _filter({tag.ROLE: "search", tag.SEARCH_NAME: name}),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    return runs[0], client.get_experiment(runs[0].info.experiment_id).name


def download_text(uri: str, run_id: str, path: str) -> str:
    """The text of artifact ``path`` of run ``run_id``."""
    import tempfile

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as folder:
        return Path(MlflowClient(tracking_uri=uri).download_artifacts(run_id, path, folder)).read_text()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"method": {"temperature": 4}}`` -> ``{"method.temperature": 4}`` (MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
