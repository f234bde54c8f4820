"""What a student costs to run, measured rather than guessed: its parameters, its multiply-accumulates, and its
latency and throughput as an exported model on a stated CPU.

- **MACs** come from PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass at batch 1
  (it counts 2 FLOPs per multiply-accumulate of convolutions and matrix products: MACs = FLOPs / 2; element-wise
  work, BatchNorm at inference included, is not counted, as in the papers' tables).
- **Latency** is that of the student exported with TorchScript (``torch.jit.trace`` then ``torch.jit.freeze``,
  what a CPU deployment runs), in inference mode, on ``cost.threads`` threads: ``cost.warmup`` runs first, not
  counted, then the median of ``cost.repeats`` timed runs at batch 1 (``latency_ms``, with its 10th and 90th
  percentiles) and at the throughput batch (``throughput``, images/s). Other work on the machine stretches the
  slow tail first: a round whose 90th percentile is over ``NOISY`` times its median is timed again, up to
  ``ROUNDS`` rounds, the least disturbed (lowest median) is kept, and one still disturbed is named in a warning.
- **Once per architecture.** A measurement is kept in ``<data.cache_dir>/costs/<key>.json``, the key hashing
  what decides it (the architecture and its code version, the input shape, batch, threads, repeats, torch's
  version and the CPU's model name), and measured under a file lock, so concurrent trials of one architecture on
  one machine measure it once. The target is the machine that measures: the trial's own, or a node offering
  ``search.cost.resources`` (a Ray task asks for them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock
import torch

from kdray.models import ModelInfo, build_model, code_version, parameter_count
from kdray.schema.search import CostConfig


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    latency_ms: float  # median at batch 1
    latency_p10_ms: float
    latency_p90_ms: float
    throughput: float  # images/s at ``batch``, median
    batch: int
    threads: int
    target: str  # the CPU that measured it

    def metrics(self) -> dict[str, float]:
        """What a trial logs and a search optimises (``search.objectives``, ``search.constraints``)."""
        return {
            "params": float(self.params),
            "macs": float(self.macs),
            "latency_ms": self.latency_ms,
            "latency_p10_ms": self.latency_p10_ms,
            "latency_p90_ms": self.latency_p90_ms,
            "throughput": self.throughput,
        }


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (the target a latency belongs to)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def count_macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() // 2


log = logging.getLogger(__name__)

NOISY = 1.5  # a 90th percentile above this many medians: the round was disturbed by other work
ROUNDS = 3


def _timed(model: Any, batch: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` runs after ``warmup`` untimed ones."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(batch)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - started)
    return times


def spread(times: list[float]) -> float:
    """The 90th percentile over the median: about 1.1 on a quiet machine, several times that beside a training."""
    return statistics.quantiles(times, n=10)[-1] / statistics.median(times)


def least_disturbed(run: Callable[[], list[float]], name: str) -> list[float]:
    """The times of the round of ``run`` with the lowest median, stopping at the first quiet one (``NOISY``);
    a warning names ``name`` when none was quiet."""
    rounds: list[list[float]] = []
    while len(rounds) < ROUNDS and (not rounds or spread(rounds[-1]) > NOISY):
        rounds.append(run())
    best = min(rounds, key=statistics.median)
    if spread(best) > NOISY:
        log.warning(
            "cost of %s: latency disturbed by other work on this machine in %d rounds (90th percentile %.1fx the "
            "median); it is kept for this machine: remove it from <data.cache_dir>/costs to measure it again",
            name, len(rounds), spread(best),
        )  # fmt: skip
    return best


def measure(name: str, info: ModelInfo, cost: CostConfig) -> Cost:
    """Build ``name`` (weights do not change its cost), export it and time it on this machine."""
    torch.manual_seed(0)
    model = build_model(name, info).eval()
    example = torch.randn(1, info.in_channels, info.image_size, info.image_size)
    macs = count_macs(model, example)
    threads = torch.get_num_threads()
    torch.set_num_threads(cost.threads)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but it is what `kdray export` writes and what a
            # CPU deployment without an ONNX runtime runs: the student is measured as it is shipped.
            warnings.simplefilter("ignore", FutureWarning)
            exported = torch.jit.freeze(torch.jit.trace(model, example))
        single = least_disturbed(lambda: _timed(exported, example, cost.warmup, cost.repeats), name)
        batch = torch.randn(cost.batch, *example.shape[1:])
        batched = _timed(exported, batch, cost.warmup, cost.repeats)
    finally:
        torch.set_num_threads(threads)
    deciles = statistics.quantiles(single, n=10)
    return Cost(
        params=parameter_count(model),
        macs=macs,
        latency_ms=statistics.median(single) * 1000,
        latency_p10_ms=deciles[0] * 1000,
        latency_p90_ms=deciles[-1] * 1000,
        throughput=cost.batch / statistics.median(batched),
        batch=cost.batch,
        threads=cost.threads,
        target=cpu_name(),
    )


def cost_key(name: str, info: ModelInfo, cost: CostConfig) -> str:
    identity = {
        "model": name, "code": code_version(name), "info": asdict(info), "batch": cost.batch, "threads": cost.threads,
        "repeats": cost.repeats, "warmup": cost.warmup, "torch": torch.__version__, "target": cpu_name(),
    }  # fmt: skip
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=12).hexdigest()


def cached_cost(name: str, info: ModelInfo, cost: CostConfig, cache_dir: str | Path) -> tuple[Cost, bool]:
    """The cost of ``name`` on this machine, and whether it was measured now (False: read back)."""
    folder = Path(cache_dir) / "costs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cost_key(name, info, cost)}.json"
    with filelock.FileLock(f"{path}.lock"):
        if path.is_file():
            try:
                return Cost(**json.loads(path.read_text())), False
            except (ValueError, TypeError):
                pass  # unreadable (an older layout, or damaged): measured again below
        measured = measure(name, info, cost)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(asdict(measured)))
        partial.replace(path)
    return measured, True


def cost_on_target(name: str, info: ModelInfo, cost: CostConfig, cache_dir: str | Path) -> tuple[Cost, bool]:
    """``cached_cost`` here, or on a node offering ``cost.resources`` (a Ray task that asks for them)."""
    if not cost.resources:
        return cached_cost(name, info, cost, cache_dir)
    import ray

    task = ray.remote(cached_cost).options(num_cpus=cost.threads, resources=dict(cost.resources))
    return ray.get(task.remote(name, info, cost, cache_dir))
