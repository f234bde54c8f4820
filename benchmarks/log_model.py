"""Seconds to log one stage as an MLflow model (what every stored stage pays once), per architecture.

    python benchmarks/log_model.py

Logs a freshly built ``Classifier`` three times per architecture into a throwaway sqlite store and
prints each call's wall time; the first call of the process includes importing ``mlflow.pytorch``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from kdray.models import ModelInfo, build_model
from kdray.models.deploy import Classifier
from kdray.tracking import Tracker

CASES = {"resnet8": ModelInfo(10, 1, 8), "resnet56": ModelInfo(100, 3, 32), "resnet32x4": ModelInfo(100, 3, 32)}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        tracker = Tracker(f"sqlite:///{Path(folder) / 'mlflow.db'}", "log-model-cost")
        for name, info in CASES.items():
            shape = (info.in_channels, info.image_size, info.image_size)
            model = Classifier(build_model(name, info), [0.5] * shape[0], [0.25] * shape[0], image_shape=shape)
            run = tracker.start_run(name, {})
            seconds = []
            for _ in range(3):
                started = time.perf_counter()
                tracker.log_model(run, model, shape)
                seconds.append(time.perf_counter() - started)
            print(f"{name:<11} {' '.join(f'{s:6.2f}s' for s in seconds)}")


if __name__ == "__main__":
    main()
