"""A reproduction's per-epoch history as CSV, from the log ``kdray train`` printed (one log per column).

    python scripts/log_history.py docs/reproductions/takd_cifar10_plain/kd.log --train-images 40000 > kd.csv

Each epoch line (``role model epoch N/E loss L val_acc A R img/s lr X``) becomes a row; the summary table at
the end of the log gives each finished stage's final validation and test accuracy (``final`` rows). The
header comments name the command of the column, the commit that first committed the log, and the training
time per stage estimated from the logged throughput (training images / images per second, evaluation not
counted), since the logs carry no clock.
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from pathlib import Path

EPOCH = re.compile(
    r"^(?P<role>\S+)\s+(?P<model>\S+)\s+epoch\s+(?P<epoch>\d+)/(?P<epochs>\d+)\s+loss (?P<loss>\S+)\s+"
    r"val_acc (?P<val>\S+)\s+(?P<rate>\d+) img/s\s+lr (?P<lr>\S+)"
)
FINAL = re.compile(
    r"^(?P<role>\S+)\s+(?P<model>\S+)\s+(?P<key>[0-9a-f]{24})\s+(?P<source>\S+)\s+(?P<val>\S+)\s+(?P<test>\S+)$"
)


def first_commit(log: Path) -> str:
    """The commit that first added ``log`` to the repository ('' outside a checkout)."""
    done = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", str(log)], capture_output=True, text=True, check=False
    )
    return done.stdout.split()[-1] if done.stdout.split() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--train-images", type=int, required=True, help="training images per epoch")
    args = parser.parse_args()
    lines = args.log.read_text().splitlines()
    command = next((line.removeprefix("== ") for line in lines if line.startswith("== ")), "")
    rows, seconds = [], {}
    for line in lines:
        if match := EPOCH.match(line):
            stage = (match["role"], match["model"])
            seconds[stage] = seconds.get(stage, 0.0) + args.train_images / int(match["rate"])
            rows.append([*stage, match["epoch"], match["loss"], match["val"], "", match["rate"], match["lr"]])
        elif (match := FINAL.match(line)) and match["source"] in ("trained", "reused", "given"):
            rows.append([match["role"], match["model"], "final", "", match["val"], match["test"], "", ""])
    print(f"# {args.log.name}: {command}")
    print(f"# scripts/reproduce_takd_table1.sh; log first committed in {first_commit(args.log) or 'no commit'}")
    for (role, model), total in seconds.items():
        print(f"# {role} {model}: about {total / 3600:.1f} h of training (from the logged images/s)")
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["role", "model", "epoch", "train_loss", "val_acc", "test_acc", "images_per_s", "lr"])
    writer.writerows(rows)


if __name__ == "__main__":
    main()
