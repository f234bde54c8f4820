"""Ray Data as kdray uses it: rows in a fixed order, a function over batches of them on CPU tasks.

Both the scan of a folder (``kdray.data.scan``) and the per-epoch reading of a streamed split
(``kdray.data.stream``) are the same shape of work: a table of file paths, a function that reads a
batch of them, results wanted in the table's order. Ray Data runs the function on tasks wherever the
cluster has CPUs (CPU-only nodes included), streams the results with bounded memory, and keeps their
order when ``preserve_order`` is set, which makes a streamed epoch repeat exactly from its seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from kdray.ray_session import connect_ray

Batch = dict[str, np.ndarray]


def ordered_map(
    table: pa.Table,
    fn: Callable[..., Batch],
    fn_kwargs: dict[str, Any],
    batch_size: int,
    rows_per_task: int,
    cpus_per_task: float,
    prefetch_batches: int = 2,
) -> Iterator[Batch]:
    """``fn`` over ``table`` in tasks of ``rows_per_task`` rows, yielded as numpy batches of ``batch_size``
    rows (the last may be shorter) in the table's order."""
    connect()
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # again: importing Ray Data configures its loggers
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    tasks = max(1, math.ceil(len(table) / rows_per_task))
    dataset = ray.data.from_arrow(table, override_num_blocks=tasks).map_batches(
        fn, fn_kwargs=fn_kwargs, batch_size=None, batch_format="numpy", num_cpus=cpus_per_task
    )
    yield from dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches)


def connect() -> None:
    """Join (or start) kdray's Ray instance, with Ray Data's per-dataset log lines kept out of kdray's output."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # before its import, which warns about progress bars
    import ray

    if not ray.is_initialized():
        connect_ray()
