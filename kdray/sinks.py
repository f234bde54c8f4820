"""Where a training stage's epochs go: one interface, four places.

``engine.fit`` calls ``restore`` once, ``end_epoch`` after every epoch and ``end_stage`` once the model
is final. Every sink but ``MemorySink`` logs each epoch's metrics to the stage's MLflow run and hands the
finished model to ``store`` (which writes the model store and closes the run); they differ only in where the
training state of an unfinished stage is kept and who hears about each epoch:

- ``LocalSink``: a file under the stage's checkpoint folder (in-process ``kdray train`` stages and the
  guides a search trial trains), replaced atomically every ``checkpoint_every`` epochs; ``BucketSink`` the
  same as an object, when ``scaling.storage_path`` is a bucket;
- ``RayTrainSink``: Ray Train reports, with the state as a Ray checkpoint when due (``FailureConfig``
  restarts and a rerun restore it);
- ``TuneSink``: Ray Tune reports from a trial that trains in its own process (the scheduler reads the
  metrics, ``Tuner.restore`` brings the checkpoint back);
- ``MemorySink``: each epoch's metrics in memory, nothing on disk or in MLflow (benchmarks, tests of the loop).

The model is stored in ``end_stage``, before the last epoch is reported, so a report that ends the
process (a scheduler stopping the trial) always comes after the model is safe.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdray import run_storage
from kdray.distributed import WorkerContext
from kdray.engine import FitResult
from kdray.tracking import MetricLogger

log = logging.getLogger(__name__)

StoreResult = Callable[[FitResult], None]
# What torch.load raises on a truncated, emptied or overwritten checkpoint file
UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError)


def read_state(path: str | Path | io.BytesIO, device: torch.device) -> dict[str, Any] | None:
    """A training state saved by ``keep``, or None (with a warning naming the file) when it cannot be read:
    the stage then starts from its first epoch, with the same seed, rather than failing on every rerun."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except UNREADABLE as error:
        log.warning("checkpoint %s is unreadable (%s: %s); training this stage from its first epoch", path,
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")  # fmt: skip
        return None


class StageSink:
    """Metrics to ``logger`` every epoch, the model to ``store`` at the end; subclasses keep the state."""

    def __init__(
        self, logger: MetricLogger, store: StoreResult | None, every: int, epochs: int, device: torch.device
    ) -> None:
        self.logger = logger
        self.store = store
        self.every = every
        self.epochs = epochs
        self.device = device
        self.resumed_from: int | None = None
        self.logged = 0  # the last epoch given to the logger

    def restore(self) -> dict[str, Any] | None:
        """The last saved state, its epochs replayed to the logger (which skips what the run holds)."""
        state = self.load()
        if state is not None:
            self.resumed_from = state["epoch"]
            for epoch, metrics in enumerate(state["history"], start=1):
                self._log(epoch, metrics)
        return state

    def end_epoch(self, epoch: int, metrics: dict[str, float], state: Callable[[], dict[str, Any]]) -> None:
        self._log(epoch, metrics)
        # After the last epoch the stored model replaces the training state.
        self.keep(epoch, metrics, state if epoch % self.every == 0 and epoch < self.epochs else None)

    def end_stage(self, result: FitResult) -> None:
        """The last epoch's metrics, then the model. Storing the model ends the stage's run FINISHED, and the
        last epoch's ``end_epoch`` comes after it (``fit``): a process killed between the two left a finished run
        without its last epoch, and a resumed search reported the epoch before's accuracy as the trial's."""
        self._log(len(result.history), result.history[-1])
        if self.store is not None:
            self.store(result)

    def _log(self, epoch: int, metrics: dict[str, float]) -> None:
        """Each epoch once, in order (the last one reaches both ``end_stage`` and ``end_epoch``)."""
        if epoch > self.logged:
            self.logger.log_metrics(metrics, step=epoch)
            self.logged = epoch

    def load(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def keep(self, epoch: int, metrics: dict[str, float], state: Callable[[], dict[str, Any]] | None) -> None:
        raise NotImplementedError


class LocalSink(StageSink):
    """The training state in ``folder/state.pt``, written next to it and renamed over it (a kill mid-write
    keeps the previous one); the folder goes once the model is stored."""

    def __init__(
        self,
        folder: Path,
        logger: MetricLogger,
        store: StoreResult | None,
        every: int,
        epochs: int,
        device: torch.device,
    ) -> None:
        super().__init__(logger, store, every, epochs, device)
        self.folder = folder
        self.file = folder / "state.pt"

    def load(self) -> dict[str, Any] | None:
        if not self.file.exists():
            return None
        state = read_state(self.file, self.device)
        if state is None:  # kept for a post-mortem, out of the way of the next checkpoint
            os.replace(self.file, self.file.with_name(f"state.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.pt"))
        return state

    def keep(self, epoch: int, metrics: dict[str, float], state: Callable[[], dict[str, Any]] | None) -> None:
        if state is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.file.with_suffix(f".{os.getpid()}.partial")
        torch.save(state(), partial)
        os.replace(partial, self.file)

    def end_stage(self, result: FitResult) -> None:
        super().end_stage(result)
        shutil.rmtree(self.folder, ignore_errors=True)


class BucketSink(StageSink):
    """``LocalSink`` on a bucket: the training state is the object ``folder/state.pt``, uploaded whole each time
    (a reader gets the previous state or the new one); the folder goes once the model is stored."""

    def __init__(
        self, folder: str, logger: MetricLogger, store: StoreResult | None, every: int, epochs: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        super().__init__(logger, store, every, epochs, device)
        self.folder = folder
        self.file = run_storage.join(folder, "state.pt")

    def load(self) -> dict[str, Any] | None:
        if not run_storage.exists(self.file):
            return None
        return read_state(io.BytesIO(run_storage.read_bytes(self.file)), self.device)

    def keep(self, epoch: int, metrics: dict[str, float], state: Callable[[], dict[str, Any]] | None) -> None:
        if state is None:
            return
        buffer = io.BytesIO()
        torch.save(state(), buffer)
        run_storage.write_bytes(self.file, buffer.getvalue())

    def end_stage(self, result: FitResult) -> None:
        super().end_stage(result)
        run_storage.remove_folder(self.folder)


class RayTrainSink(StageSink):
    """Every epoch a Ray Train report (``epoch`` and the metrics); when due, the state as its checkpoint.

    In data-parallel runs the chief's state is everyone's (DDP keeps the replicas equal). With branch
    parallelism each worker owns another branch (``every_rank``), so each writes ``state-<rank>.pt`` and
    Ray merges the workers' files into one checkpoint folder.
    """

    def __init__(
        self,
        ctx: WorkerContext,
        logger: MetricLogger,
        store: StoreResult | None,
        every: int,
        epochs: int,
        every_rank: bool = False,
    ) -> None:
        super().__init__(logger, store, every, epochs, ctx.device)
        self.writes = every_rank or ctx.is_chief
        self.file = f"state-{ctx.rank}.pt" if every_rank else "state.pt"

    @staticmethod
    def api() -> Any:
        import ray.train

        return ray.train

    def load(self) -> dict[str, Any] | None:
        checkpoint = self.api().get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            path = os.path.join(folder, self.file)
            if not os.path.exists(path):
                return None
            return read_state(path, self.device)

    def keep(self, epoch: int, metrics: dict[str, float], state: Callable[[], dict[str, Any]] | None) -> None:
        ray = self.api()
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if state is not None and self.writes:
                torch.save(state(), os.path.join(folder, self.file))
                checkpoint = ray.Checkpoint.from_directory(folder)
            ray.report({**metrics, "epoch": epoch}, checkpoint=checkpoint)


class TuneSink(RayTrainSink):
    """The same reports and checkpoints, to Ray Tune: a search trial training in its own process."""

    @staticmethod
    def api() -> Any:
        import ray.tune

        return ray.tune


class MemorySink(StageSink):
    """Keeps everything in memory: each epoch's metrics in ``history``, nothing on disk or in MLflow (the
    benchmarks, and tests of the loop itself)."""

    def __init__(self) -> None:
        super().__init__(self, None, 1, 0, torch.device("cpu"))
        self.history: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.history.append(metrics)

    def load(self) -> dict[str, Any] | None:
        return None

    def keep(self, epoch: int, metrics: dict[str, float], state: Callable[[], dict[str, Any]] | None) -> None:
        return None
