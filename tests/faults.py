"""Fault injection for tests: wrappers that tests install around kdray's own functions.

kdray's code has no test hooks. A test that needs a worker to die swaps the function Ray Train runs
on every worker (``kdray.launch.stage_worker``, looked up when a stage starts) for a wrapper built
here; cloudpickle ships the wrapper by value, so the workers need not import this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kdray.launch


def kill_last_worker_after(epoch: int, marker: Path) -> Callable[[dict[str, Any]], None]:
    """kdray's Ray Train worker, except that the last worker kills its own process once, right after
    reporting ``epoch`` (``marker`` records that it happened, so the restarted group runs on)."""
    stage_worker = kdray.launch.stage_worker

    def worker(config: dict[str, Any]) -> None:
        import ray.train

        from kdray.sinks import RayTrainSink

        keep = RayTrainSink.keep

        def keep_then_die(self: RayTrainSink, at: int, metrics: dict[str, float], state: Any) -> None:
            keep(self, at, metrics, state)
            context = ray.train.get_context()
            if at == epoch and context.get_world_rank() == context.get_world_size() - 1 and not marker.exists():
                marker.touch()
                os._exit(1)

        RayTrainSink.keep = keep_then_die  # this worker process only
        stage_worker(config)

    return worker


def install_worker_fault(monkeypatch: pytest.MonkeyPatch, epoch: int, marker: Path) -> None:
    """Make the next Ray Train stages of this test lose their last worker once, after ``epoch``."""
    monkeypatch.setattr(kdray.launch, "stage_worker", kill_last_worker_after(epoch, marker))


def zero_in_place(path: Path, start_fraction: float = 0.5) -> None:
    """Overwrite the second part of a file with zeros, keeping its size (silent damage: bit rot, a bad copy)."""
    size = path.stat().st_size
    start = int(size * start_fraction)
    with path.open("r+b") as handle:
        handle.seek(start)
        handle.write(bytes(size - start))


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut a file short (a copy or a write interrupted part-way)."""
    with path.open("r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep_fraction))
