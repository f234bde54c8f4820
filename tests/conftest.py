"""Shared fixtures: every test runs in its own folder, so MLflow stores and model stores never mix."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image
from torch import nn

from kdray.build import build_stage
from kdray.data import Dataset
from kdray.distributed import local_context
from kdray.engine import FitResult, fit
from kdray.ray_session import ray_init_options
from kdray.schema import ExperimentConfig
from kdray.sinks import MemorySink
from kdray.stages import StagePlan
from tests.servers import MlflowServer, Postgres, S3Server

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
# Two CPU workers of one thread each, small batches: what every Ray test trains with.
TWO_CPU_WORKERS = ["scaling.num_workers=2", "scaling.use_gpu=false", "scaling.threads=1", "train.batch_size=32"]


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[None]:
    """Shuts down, at the end of the session, the Ray instance ``local_ray`` started."""
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(_ray_session: None) -> None:
    """One local Ray instance of 2 CPUs for the whole session (started by the first test that needs it,
    again after a test that brought up its own cluster), with kdray's job options and the dashboard,
    which Ray Train needs to free the workers of a trial stopped by ASHA."""
    if not ray.is_initialized():
        options = ray_init_options()
        # tests/user_models.py stands for a user's own package, installed on every node of their cluster
        env = options.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, **options)


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """An MLflow tracking server on a PostgreSQL database, both real and on loopback, for the whole session
    (about 30 s to start: initdb, then MLflow's migrations)."""
    database = Postgres().start()
    try:
        server = MlflowServer(database.uri, tmp_path_factory.mktemp("tracking-server")).start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        database.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3-protocol server (moto) on loopback with one bucket, for the whole session."""
    server = S3Server(tmp_path_factory.mktemp("s3-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store, created (and migrated, ~3 s) once per session."""
    from mlflow.tracking import MlflowClient

    database = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{database}").search_experiments()
    return database


@pytest.fixture
def bare_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run inside a fresh, empty folder with its own data cache; no MLFLOW_TRACKING_URI or KDRAY_* path leaks in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for variable in ("MLFLOW_TRACKING_URI", "KDRAY_STORAGE_PATH", "KDRAY_STORE_PATH"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


@pytest.fixture
def workdir(bare_workdir: Path, mlflow_template: Path) -> Path:
    """``bare_workdir`` holding an empty MLflow store at the default ``./mlflow.db`` (a copy of the template)."""
    shutil.copy(mlflow_template, bare_workdir / "mlflow.db")
    return bare_workdir


def fit_stage(
    cfg: ExperimentConfig,
    plan: StagePlan,
    data: Dataset,
    guides: Sequence[nn.Module] = (),
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[FitResult, MemorySink]:
    """Build and train one stage in this process, keeping its epochs in memory (no store, no MLflow)."""
    sink = MemorySink()
    return fit(build_stage(cfg, plan, data, list(guides), local_context(False), wrap), sink), sink


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_image_folder(
    root: Path, splits: dict[str, int], classes: tuple[str, ...] = ("cat", "dog", "eel"), size: int = 8, seed: int = 0
) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Write ``splits[name]`` PNG images per class under ``root/<split>/<class>/``; return what was written."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[np.ndarray, int]]] = {}
    for split, per_class in splits.items():
        written[split] = []
        for label, name in enumerate(classes):
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                write_png(root / split / name / f"{i:03d}.png", pixels)
                written[split].append((pixels, label))
    return written


def tar_folder(folder: Path, archive: Path, top: str = "data") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=top)
    return archive


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def process_tree(root: int, naming: str = "") -> set[int]:
    """``root``, its descendants, and (with ``naming``) every process whose command line contains it, with
    theirs: what a command left running, read from Linux's /proc."""
    children: dict[int, list[int]] = {}
    found = {root}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if naming and naming in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry))
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a parent that does not reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts the session's Ray instance belongs to the integration tier whether or not it says so,
    so the quick tier (``-m "not slow and not integration"``) never waits on Ray."""
    for item in items:
        if "local_ray" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
