"""Train every method on one experiment with the same budget and print a Markdown table.

    python benchmarks/compare_methods.py experiments/cifar10_cpu.yaml \
        data.root=../shared/data/cifar10-train-jpg.tar.gz data.limit_train=20000 teacher.epochs=4 train.epochs=4

Every row is an ordinary `kdray train` run (same teacher from the model store, same data, epochs,
optimiser and seed), so all of them are in MLflow too. Each row's overrides are listed in it.
"""

from __future__ import annotations

import logging
import sys
import time

from kdray.config import load_config
from kdray.run import run_experiment

VARIANTS: list[list[str]] = [
    ["method.name=none"],
    ["method.name=kd"],
    ["method.name=triplet"],
    ["method.name=feature_mixup"],
    ["method.name=stkd"],
    ["method.name=takd", "assistants.depth=1"],
    ["method.name=dgkd", "assistants.depth=1"],
    ["method.name=pacemaker", "student.onthefly=true"],
    ["method.name=kd", "student.onthefly=true"],
    ["method.name=none", "student.onthefly=true"],
    ["method.name=online_branch"],
    ["method.name=online_branch", "method.ffm=false", "method.cd_weight=0"],
]


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    path, overrides = argv[0], argv[1:]
    print("| overrides | student val acc | stages trained / reused | wall s |")
    print("| --- | --- | --- | --- |")
    for variant in VARIANTS:
        cfg = load_config(path, [*overrides, *variant, "tracking.experiment=kdray-compare-methods"])
        started = time.perf_counter()
        result = run_experiment(cfg)
        trained = sum(not stage.reused for stage in result.stages)
        print(
            f"| {' '.join(variant)} | {result.student.metrics['val/acc']:.4f} | "
            f"{trained} / {len(result.stages) - trained} | {time.perf_counter() - started:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
