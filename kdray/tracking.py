"""MLflow tracking through ``MlflowClient`` with explicit run ids (no global active run).

The driver creates the runs (a parent per invocation, a child per stage); whoever trains a stage
logs its per-epoch metrics to the child's id. Explicit ids work the same in-process and inside a Ray
worker, where a global "active run" would not exist.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from kdray.config import ConfigError


class MlflowRunLogger:
    """Logs metrics of one run, by id."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()])


class SkipLogged:
    """Drops epochs MLflow already holds: after a restore, the history continues without repeated steps."""

    def __init__(self, inner: MlflowRunLogger, logged_until: int) -> None:
        self.inner = inner
        self.logged_until = logged_until

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.logged_until:
            self.inner.log_metrics(metrics, step)


def logged_until(client: MlflowClient, run_id: str, metric: str = "val/acc") -> int:
    """The last epoch whose metrics a run already holds (0 for a new run)."""
    return max((m.step for m in client.get_metric_history(run_id, metric)), default=0)


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
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"tracking.uri: folder {folder} of the sqlite store does not exist; create it first")


# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; kdray's are training runs.
KIND = {"mlflow.experimentKind": "custom_model_development"}


class Tracking:
    """The driver's side: experiment, runs, params, tags and artifacts."""

    def __init__(self, uri: str, experiment: str) -> None:
        check_reachable(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, tags=KIND)

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        if parent_id is not None:
            tags = {**tags, "mlflow.parentRunId": parent_id}
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def find_unfinished(self, name: str, tags: dict[str, str]) -> Run | None:
        """The newest run called ``name`` with these tags that did not finish (killed, failed, or still
        RUNNING because its driver died): the run a rerun continues."""
        conditions = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        runs = self.client.search_runs(
            [self.experiment_id], " and ".join(conditions), order_by=["attributes.start_time DESC"], max_results=20
        )
        for run in runs:
            if run.info.run_name == name:
                return run if run.info.status != "FINISHED" else None
        return None

    def runs_under(self, parent_id: str, role: str | None = None) -> list[Run]:
        """A parent's child runs (with tag ``kdray.role`` = ``role`` if given), oldest first."""
        condition = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        if role is not None:
            condition += f" and tags.`kdray.role` = '{role}'"
        runs = self.client.search_runs(
            [self.experiment_id], condition, max_results=10000, order_by=["attributes.start_time ASC"]
        )
        return list(runs)

    def children(self, parent_id: str) -> dict[str, Run]:
        """A parent's child runs by stage key (tag ``kdray.model_key``)."""
        runs = self.runs_under(parent_id)
        return {run.data.tags["kdray.model_key"]: run for run in runs if "kdray.model_key" in run.data.tags}

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def logger(self, run_id: str) -> MlflowRunLogger:
        return MlflowRunLogger(self.client, run_id)

    def continuing_logger(self, run_id: str) -> SkipLogged:
        """A logger for a run that may already hold epochs (a resumed stage): those are not logged again."""
        return SkipLogged(self.logger(run_id), logged_until(self.client, run_id))

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_artifact(self, run_id: str, file: Path) -> None:
        self.client.log_artifact(run_id, str(file))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


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
