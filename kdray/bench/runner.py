"""Runs the measurements ``kdray bench`` is asked for, one JSON line each."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict

import torch

from kdray.bench.data import measure_data
from kdray.bench.options import MEASUREMENTS, BenchOptions
from kdray.bench.searches import measure_search, measure_trials
from kdray.bench.training import measure_cache, measure_step
from kdray.distributed import use_threads

log = logging.getLogger(__name__)


def run_bench(
    options: BenchOptions, only: tuple[str, ...] = MEASUREMENTS, emit: Callable[[dict], None] | None = None
) -> list[dict]:
    """Run the chosen measurements in order; each result goes to ``emit`` (stdout JSON) as it is done."""
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
    return f"cpu: {platform.processor() or platform.machine()}"
