"""``kdray bench``: each measurement runs for real (tiny models) and prints one JSON line with its numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--teacher", "plane4", "--student", "plane2", "--batch-size", "16", "--steps", "2", "--rounds", "1"]


def bench(*args: str, cwd: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "KDRAY_STORE_PATH")}
    done = subprocess.run(
        [sys.executable, "-m", "kdray", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]  # stdout holds nothing but the JSON lines


def test_step_and_cache_measurements(workdir: Path) -> None:
    step, cache = bench(*TINY, "--only", "step,cache", "--threads", "1", cwd=workdir)
    assert step["measurement"] == "step" and cache["measurement"] == "cache"
    assert step["kdray_images_per_s"] > 0 and step["loop_images_per_s"] > 0
    assert step["ratio"] == pytest.approx(step["kdray_images_per_s"] / step["loop_images_per_s"], rel=1e-2)  # 1 round
    assert step["threads"] == 1 and step["options"]["teacher"] == "plane4"
    images = 2 * 16
    assert cache["student_alone"]["teacher_images"] == 0
    assert cache["cache_off"]["teacher_images"] == images
    assert cache["cache_cold"]["teacher_images"] >= images - 2  # a 2nd epoch over 162 views hits few rows
    assert cache["cache_warm"] == {**cache["cache_warm"], "teacher_images": 0, "hit_rate": 1.0}
    assert cache["warm_over_alone"] > 0


def test_search_and_trial_measurements_count_teacher_work(workdir: Path) -> None:
    search, trials = bench(
        *TINY, "--only", "search,trials", "--search-trials", "2", "-o", "train.batch_size=64", cwd=workdir
    )
    on, off = search["store_and_cache_on"], search["store_and_cache_off"]
    assert on["teachers_trained"] == 1 and off["teachers_trained"] == 2  # one per trial without the store
    assert 0 < on["teacher_forward_images"] < off["teacher_forward_images"]
    assert search["wall_ratio_on_over_off"] > 0
    for mode in ("in_process", "ray_train_1_worker"):
        assert trials[mode]["per_trial_s"] > trials[mode]["training_s"] > 0
    assert [p.name for p in workdir.iterdir()] == ["cache"], "the bench leaves nothing but the data cache here"


def test_bad_options_fail_in_one_line_before_any_work(workdir: Path) -> None:
    for args, message in [
        (["--only", "step,speed"], "--only: unknown measurement ['speed']"),
        (["--teacher", "resnet9000"], "--teacher: unknown model 'resnet9000'"),
        (["--steps", "0"], "--steps: 0 is too small"),
        (["-o", "train.epochs=0"], "train.epochs"),
    ]:
        done = subprocess.run([sys.executable, "-m", "kdray", "bench", *args], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
