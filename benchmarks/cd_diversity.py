"""Does Classifier Diversification act? online_branch with and without CD, same budget, several seeds.

    python benchmarks/cd_diversity.py experiments/cifar10_cpu.yaml \
        data.root=../shared/data/cifar10-train-jpg.tar.gz data.limit_train=10000 train.epochs=6 \
        --weights 0,1,10 --seeds 0,1,2

Every run is an ordinary `kdray train` (in MLflow too, experiment kdray-cd-diversity). For each CD
weight it prints, over the seeds (mean ± std), what online ensembles are about: the classifiers'
similarity (the cosine CD, 0 = orthogonal), the branches' mean pairwise disagreement on validation
images, the mean branch accuracy and the ensemble's accuracy.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from kdray.resolve import load_config
from kdray.run import run_experiment

COLUMNS = ("classifier_similarity", "disagreement", "acc_branch_mean", "acc_ensemble")


def measure(path: str, overrides: list[str], weight: float, seed: int) -> dict[str, float]:
    cfg = load_config(
        path,
        [
            *overrides,
            "method.name=online_branch",
            f"method.cd_weight={weight}",
            f"train.seed={seed}",
            "tracking.experiment=kdray-cd-diversity",
            f"tracking.run_name=cd{weight}-seed{seed}",
        ],
    )
    metrics = run_experiment(cfg).student.metrics
    branches = [value for key, value in metrics.items() if key.startswith("val/acc_branch")]
    return {
        "classifier_similarity": metrics["val/classifier_similarity"],
        "disagreement": metrics["val/disagreement"],
        "acc_branch_mean": statistics.mean(branches),
        "acc_ensemble": metrics["val/acc_ensemble"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--weights", default="0,1", help="CD weights to compare (comma-separated)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (comma-separated)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("| cd_weight | " + " | ".join(COLUMNS) + " | wall s |")
    print("| --- |" + " --- |" * (len(COLUMNS) + 1))
    for weight in (float(w) for w in args.weights.split(",")):
        started = time.perf_counter()
        rows = [measure(args.file, args.overrides, weight, int(seed)) for seed in args.seeds.split(",")]
        cells = []
        for column in COLUMNS:
            values = [row[column] for row in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        print(f"| {weight:g} | " + " | ".join(cells) + f" | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
