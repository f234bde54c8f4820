"""A Ray Train worker's memory on one image folder, in memory and streamed.

    python benchmarks/stream_memory.py FOLDER [section.field=value ...]

Trains the student for one epoch on one Ray Train worker twice, with ``data.loader=memory`` and
``data.loader=stream``, each into a throwaway store and MLflow file, and prints what the worker's
last epoch recorded: its own (private) memory and its peak resident memory, in MiB, beside the size
of the decoded training images. Resident memory counts the pages of Ray's object store a streaming
worker has read (the node's, shared); private memory is what the worker itself holds.
"""

from __future__ import annotations

import sys
import tempfile

from mlflow import MlflowClient

from kdray.data import load_dataset
from kdray.resolve import load_config
from kdray.run import run_experiment


def main(folder: str, *overrides: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        base = [
            "data.name=imagefolder", f"data.root={folder}", "scaling.num_workers=1", "scaling.use_gpu=false",
            "train.epochs=1", "method.name=none", f"tracking.uri=sqlite:///{scratch}/mlflow.db",
            f"scaling.storage_path={scratch}/ray", *overrides,
        ]  # fmt: skip
        for loader in ("memory", "stream"):
            cfg = load_config(None, [*base, f"data.loader={loader}", f"store.path={scratch}/store-{loader}"])
            if loader == "memory":
                train = load_dataset(cfg.data).train
                print(f"decoded training images: {len(train) * train.images[0].numel() / 2**20:.0f} MiB")
            outcome = run_experiment(cfg).student
            metrics = MlflowClient(cfg.tracking.uri).get_run(outcome.run_id).data.metrics
            print(
                f"{loader:6s}  private {metrics['private_mb']:7.0f} MiB  peak resident {metrics['peak_rss_mb']:7.0f} "
                f"MiB  {metrics['images_per_s']:6.0f} img/s  val_acc {metrics['val/acc']:.4f}"
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
