"""Train every method × seed on one experiment at the same budget and print a Markdown table of mean ± std.

    python benchmarks/compare_methods.py experiments/compare_cifar10_cpu.yaml --seeds 0,1,2 \
        data.root=../shared/data/cifar10-train-jpg.tar.gz

Every cell is an ordinary `kdray train` run (so all of them are in MLflow too) with `train.seed` set to
the seed; the experiment file fixes `teacher.seed`, so one teacher is trained once and reused by every
row and seed. Each row reports validation and test accuracy at the last epoch and at the epoch with the
best validation accuracy (chosen on validation, never on test), which needs a test split evaluated every
epoch (`data.test_fraction`, `train.test_each_epoch`). Trained models stay in the model store: run the
same command again (after an interruption, or with more seeds) and finished cells are read back, not
retrained. `--json FILE` keeps every cell's numbers as they come.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdray.resolve import load_config
from kdray.run import run_experiment
from kdray.schema import ExperimentConfig


@dataclass(frozen=True)
class Row:
    label: str
    overrides: tuple[str, ...]


ROWS: list[Row] = [
    Row("student alone", ("method.name=none",)),
    Row("kd", ("method.name=kd",)),
    Row("kd + LS", ("method.name=kd", "method.logit_standardization=true")),
    Row(
        "kd + LS, authors' recipe",  # sunshangquan/logit-standardization-KD: --base-temp 2 --kd-weight 9
        (
            "method.name=kd",
            "method.logit_standardization=true",
            "method.temperature=2",
            "method.ce_weight=0.1",
            "method.kd_weight=9",
        ),
    ),
    Row("dkd", ("method.name=dkd",)),
    Row("dkd + LS", ("method.name=dkd", "method.logit_standardization=true")),
    Row(
        "dkd + LS, authors' recipe",  # the same flags on DKD: alpha 1 x 9, beta 8 x 9, T 2 (docs/methods.md)
        (
            "method.name=dkd",
            "method.logit_standardization=true",
            "method.temperature=2",
            "method.alpha=9",
            "method.beta=72",
        ),
    ),  # fmt: skip
    Row("dist", ("method.name=dist",)),
    # Recipe details scaled to an 8-epoch budget: DKD's warm-up is 20 of 240 epochs in its
    # paper, 1 of 8 here; DIST's ImageNet setting (beta = gamma = 1, tau = 1) is its authors' other recipe.
    Row("dkd, warm-up scaled (1 epoch)", ("method.name=dkd", "method.warmup_epochs=1")),
    Row(
        "dist, ImageNet recipe (τ 1, β = γ = 1)",
        ("method.name=dist", "method.temperature=1", "method.beta=1", "method.gamma=1"),
    ),
    Row("triplet", ("method.name=triplet",)),
    Row("feature_mixup", ("method.name=feature_mixup",)),
    Row("stkd", ("method.name=stkd",)),
    Row("takd, 1 assistant", ("method.name=takd", "assistants.depth=1")),
    Row("dgkd, 1 assistant", ("method.name=dgkd", "assistants.depth=1")),
    Row("online_branch", ("method.name=online_branch",)),
    Row("dml", ("method.name=dml",)),
    Row("student alone, 1x3", ("method.name=none", "student.onthefly=true")),
    Row("kd, 1x3", ("method.name=kd", "student.onthefly=true")),
    Row("pacemaker, 1x3", ("method.name=pacemaker", "student.onthefly=true")),
    *(Row(name, (f"method.name={name}",)) for name in ("fitnet", "at", "sp", "rkd", "pkt", "vid", "crd", "reviewkd")),
]

COLUMNS = ("val/acc", "test/acc", "best_epoch/val/acc", "best_epoch/test/acc", "best_epoch")

# The papers' claims the table checks, each "higher ≥ lower" on the same seed: DGKD ≥ TAKD ≥ KD (Son et al.
# 2021), STKD > KD (Zhao et al. 2021), triplet > KD (Oki et al. 2020).
ORDERINGS: list[tuple[str, str]] = [
    ("dgkd, 1 assistant", "takd, 1 assistant"),
    ("takd, 1 assistant", "kd"),
    ("stkd", "kd"),
    ("triplet", "kd"),
]


@dataclass
class Cells:
    """One row's finished cells: seed -> the student's final metrics."""

    by_seed: dict[int, dict[str, float]] = field(default_factory=dict)

    def mean_std(self, name: str) -> str:
        values = [metrics[name] for metrics in self.by_seed.values() if name in metrics]
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.4f}" if name != "best_epoch" else f"{values[0]:.0f}"
        mean, std = statistics.mean(values), statistics.stdev(values)
        return f"{mean:.1f} ± {std:.1f}" if name == "best_epoch" else f"{mean:.4f} ± {std:.4f}"


def table(rows: list[Row], cells: dict[str, Cells]) -> str:
    """The Markdown table: mean ± sample std over the seeds each row finished."""
    lines = [
        "| method | seeds | val acc, last | test acc, last | val acc, best-val epoch | test acc, best-val epoch "
        "| best-val epoch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        got = cells[row.label]
        values = " | ".join(got.mean_std(name) for name in COLUMNS)
        lines.append(f"| {row.label} | {len(got.by_seed)} | {values} |")
    return "\n".join(lines)


def orderings(cells: dict[str, Cells], metric: str = "test/acc") -> str:
    """For each claimed ordering, on how many shared seeds it holds and the mean paired difference: seeds
    are paired (same seed, same split, same teacher), so the difference is read per seed, not from means."""
    lines = []
    for higher, lower in ORDERINGS:
        if higher not in cells or lower not in cells:
            continue
        a, b = cells[higher].by_seed, cells[lower].by_seed
        shared = sorted(seed for seed in a if seed in b and metric in a[seed] and metric in b[seed])
        if not shared:
            continue
        gaps = [a[seed][metric] - b[seed][metric] for seed in shared]
        held = sum(gap >= 0 for gap in gaps)
        lines.append(
            f"- {higher} ≥ {lower} ({metric}, last epoch): holds on {held}/{len(shared)} seeds, mean difference "
            f"{statistics.mean(gaps):+.4f} ({', '.join(f'{gap:+.4f}' for gap in gaps)})"
        )
    return "\n".join(lines)


def head_commit() -> str:
    found = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=Path(__file__).parent
    )
    return found.stdout.strip() or "unknown"


def budget(cfg: ExperimentConfig, teacher: dict[str, float], commit: str) -> str:
    """One paragraph naming what every cell shares: data, models, recipe, the teacher's accuracy, the commit."""
    data, train = cfg.data, cfg.train
    return (
        f"Data {data.name} ({data.root}), {data.limit_train or 'all'} training images, validation "
        f"{data.val_fraction:.0%} and test {data.test_fraction or 0:.0%} of train held out (stratified, split seed "
        f"{data.split_seed}). Teacher {cfg.teacher.name}, {cfg.teacher.epochs or train.epochs} epochs, seed "
        f"{cfg.teacher.seed}: val {teacher.get('val/acc', float('nan')):.4f}, test "
        f"{teacher.get('test/acc', float('nan')):.4f}. Student {cfg.student.name}, {train.epochs} epochs, batch "
        f"{train.batch_size}, {train.optimizer} lr {train.lr} {train.schedule}, weight decay {train.weight_decay}; "
        f"every method at its defaults. Commit {commit}."
    )


def print_kept(file: Path | None, base: ExperimentConfig, rows: list[Row], seeds: list[int]) -> None:
    """The budget and table of the cells a ``--json`` file holds (of ``rows`` and ``seeds``)."""
    if file is None or not file.exists():
        raise SystemExit("--table-only: needs --json FILE written by an earlier run")
    kept = json.loads(file.read_text())
    cells = {row.label: Cells() for row in rows}
    for label, by_seed in kept["cells"].items():
        if label in cells:
            cells[label].by_seed = {int(seed): metrics for seed, metrics in by_seed.items() if int(seed) in seeds}
    print(budget(base, kept["teacher"], kept.get("commit", "unknown")), "\n")
    print(table(rows, cells), "\n")
    print(orderings(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every cell")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (default 0,1,2)")
    parser.add_argument(
        "--only", action="append", default=[], help="a row label to run (repeat for several; default: all)"
    )
    parser.add_argument("--json", type=Path, help="write every finished cell here as it comes")
    parser.add_argument("--table-only", action="store_true", help="print the table of the --json file; train nothing")
    args = parser.parse_intermixed_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    wanted = set(args.only)  # labels hold commas ("takd, 1 assistant"): one per --only
    unknown = wanted - {row.label for row in ROWS}
    if unknown:
        raise SystemExit(f"--only: unknown row {sorted(unknown)}; rows: {', '.join(row.label for row in ROWS)}")
    rows = [row for row in ROWS if not wanted or row.label in wanted]
    cells = {row.label: Cells() for row in rows}
    base = load_config(args.experiment, [*args.overrides, "train.test_each_epoch=true"])
    if args.table_only:  # an interrupted or running table, as far as it got
        print_kept(args.json, base, rows, seeds)
        return
    if base.teacher.seed is None:
        raise SystemExit("teacher.seed: set it (e.g. teacher.seed=0) so every seed's student learns from one teacher")
    if base.data.test_fraction is None and base.data.name == "imagefolder":
        print("note: no data.test_fraction: test columns stay empty unless the folder has a test split")
    teacher: dict[str, float] = {}
    commit = head_commit()
    for seed in seeds:  # seed-major: an interrupted run has whole seeds of every row
        for row in rows:
            cfg = load_config(
                args.experiment,
                [*args.overrides, *row.overrides, f"train.seed={seed}", "train.test_each_epoch=true"],
            )
            started = time.perf_counter()
            result = run_experiment(cfg)
            teacher = teacher or next((s.metrics for s in result.stages if s.plan.role == "teacher"), {})
            metrics = dict(result.student.metrics)
            cells[row.label].by_seed[seed] = metrics
            test = metrics.get("test/acc", float("nan"))
            took = time.perf_counter() - started
            print(f"{row.label} seed {seed}: val {metrics['val/acc']:.4f} test {test:.4f} ({took:.0f} s)", flush=True)
            if args.json:
                dump = {label: got.by_seed for label, got in cells.items()}
                args.json.write_text(json.dumps({"teacher": teacher, "cells": dump, "commit": commit}, indent=1))
    print()
    print(budget(base, teacher, commit))
    print()
    print(table(rows, cells))
    print()
    print(orderings(cells))


if __name__ == "__main__":
    main()
