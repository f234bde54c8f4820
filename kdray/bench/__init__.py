"""``kdray bench``: kdray's performance claims, measured. One JSON line per measurement on stdout.

- ``step``: images/s of kdray's KD training step against a hand-written PyTorch loop doing the same
  math (``kdray.bench.loop``), alternated in one process; the ratio is kdray's overhead.
- ``cache``: one KD epoch with the guide-output cache off, cold and warm, beside the student trained
  alone (the floor: what KD costs when the teacher costs nothing).
- ``search``: a small search with the model store and the cache on, then off (every trial trains its
  own teacher and runs it every step): wall time and teacher forward passes.
- ``trials``: the fixed cost of one search trial, in-process and as a 1-worker Ray Train run.
- ``data``: decode + augment images/s per core of the streaming path against a plain ``DataLoader``
  (``kdray.bench.data``), and with ``--data-root`` an epoch in memory vs streamed.

Models for ``step`` and ``cache`` have random weights on random images: speed does not depend on
either. Searches use kdray's defaults (digits) unless overridden with ``-o key=value``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from kdray.data import Dataset, Split
from kdray.distributed import use_threads

log = logging.getLogger(__name__)

MEASUREMENTS = ("step", "cache", "search", "trials", "data")


@dataclass(frozen=True)
class BenchOptions:
    teacher: str = "resnet56"
    student: str = "resnet8"
    batch_size: int = 128
    device: str = "cpu"
    threads: int | None = None
    steps: int = 8  # training steps per epoch in ``step`` and ``cache``
    rounds: int = 10  # alternations of kdray and the hand-written loop in ``step``
    image_size: int = 32
    classes: int = 10
    search_trials: int = 8
    overrides: tuple[str, ...] = field(default_factory=tuple)  # config overrides of ``search`` and ``trials``
    data_root: str | None = None  # an image folder for ``data``'s memory-vs-stream epoch


def synthetic_dataset(images: int, options: BenchOptions, seed: int = 0) -> Dataset:
    """Random uint8 RGB images in memory (CIFAR-shaped by default), and a small validation split."""
    generator = torch.Generator().manual_seed(seed)
    size, classes = options.image_size, options.classes

    def split(count: int) -> Split:
        pixels = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        return Split(pixels, torch.randint(0, classes, (count,), generator=generator))

    names = [str(label) for label in range(classes)]
    return Dataset("synthetic", names, split(images), split(options.batch_size), None, (0.5,) * 3, (0.25,) * 3)


def run_bench(
    options: BenchOptions, only: tuple[str, ...] = MEASUREMENTS, emit: Callable[[dict], None] | None = None
) -> list[dict]:
    """Run the chosen measurements in order; each result goes to ``emit`` (stdout JSON) as it is done."""
    from kdray.bench.data import measure_data
    from kdray.bench.searches import measure_search, measure_trials
    from kdray.bench.training import measure_cache, measure_step

    use_threads(options.threads)
    runners = {
        "step": measure_step, "cache": measure_cache, "search": measure_search, "trials": measure_trials,
        "data": measure_data,
    }  # fmt: skip
    stdout = sys.stdout
    emit = emit or (lambda result: print(json.dumps(result), file=stdout, flush=True))
    machine = {"device": device_name(options.device), "threads": torch.get_num_threads()}
    results = []
    for name in only:
        log.info("bench: %s ...", name)
        with contextlib.redirect_stdout(sys.stderr):  # Tune's tables; stdout carries only the JSON lines
            measured = runners[name](options)
        result = {"measurement": name, **measured, **machine, "options": asdict(options)}
        emit(result)
        results.append(result)
    return results


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu: {platform.processor() or platform.machine()}"
