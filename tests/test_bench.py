"""``kdray bench``: each measurement runs for real (tiny models) and prints one JSON line with its numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from kdray.bench.options import BenchOptions
from kdray.bench.searches import measure_search, measure_trials
from kdray.bench.training import median_interval
from kdray.cli import main

TINY_SEARCH = ("train.batch_size=64",)
TINY = ["--teacher", "plane4", "--student", "plane2", "--batch-size", "16", "--steps", "2", "--rounds", "1"]


@pytest.mark.integration
def test_step_and_cache_measurements(bare_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:  # in this process: `--threads 1` sets torch's thread count, given back afterwards
        assert main(["bench", *TINY, "--rounds", "3", "--only", "step,cache", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    step, cache = (json.loads(line) for line in capsys.readouterr().out.splitlines())  # stdout: JSON lines only
    assert step["measurement"] == "step" and cache["measurement"] == "cache"
    rounds = step["rounds"]
    assert len(rounds["kdray"]) == len(rounds["loop"]) == 3
    assert step["kdray_images_per_s"] == pytest.approx(statistics.median(rounds["kdray"]), abs=0.1)
    # the ratio is the median of the rounds' own ratios, not the ratio of the medians
    per_round = [k / loop for k, loop in zip(rounds["kdray"], rounds["loop"], strict=True)]
    assert step["ratio"] == pytest.approx(statistics.median(per_round), abs=2e-3)
    low, high = step["ratio_ci95"]
    assert min(per_round) - 1e-3 <= low <= step["ratio"] <= high <= max(per_round) + 1e-3
    assert step["verdict"] == ("meets" if low >= 0.97 else "misses" if high < 0.97 else "unresolved")
    assert step["threads"] == 1 and step["options"]["teacher"] == "plane4"
    images = 2 * 16
    assert cache["student_alone"]["teacher_images"] == 0
    assert cache["cache_off"]["teacher_images"] == images
    assert cache["cache_cold"]["teacher_images"] >= images - 2  # a 2nd epoch over 162 views hits few rows
    assert cache["cache_warm"] == {**cache["cache_warm"], "teacher_images": 0, "hit_rate": 1.0}
    for variant in ("warm", "cold", "off"):
        expected = cache[f"cache_{variant}"]["epoch_s"] / cache["student_alone"]["epoch_s"]
        assert cache[f"{variant}_over_alone"] == pytest.approx(expected, abs=2e-3)


@pytest.mark.slow
def test_search_and_trial_measurements_count_teacher_work(local_ray: None, bare_workdir: Path) -> None:
    """In this process and in-process trials only (1-worker Ray Train trials are timed by `kdray bench`; their
    overhead is what tests/test_search_ray_train.py's trials pay): the measurements' logic, not their speed."""
    options = BenchOptions(teacher="plane4", student="plane2", batch_size=16, search_trials=2, overrides=TINY_SEARCH)
    search = measure_search(options)
    trials = measure_trials(options, counts=(1, 2), modes=("in_process",))
    on, off = search["store_and_cache_on"], search["store_and_cache_off"]
    assert on["teachers_trained"] == 1 and off["teachers_trained"] == 2  # one per trial without the store
    assert 0 < on["teacher_forward_images"] < off["teacher_forward_images"]
    # shared guides first with the store on; with it off every trial trains its own teacher
    assert on["shared_guides_s"] > 0 and off["shared_guides_s"] == 0
    assert 0 < on["utilisation"] <= 1 and 0 < off["utilisation"] <= 1 and on["slots"] == off["slots"] >= 1
    assert search["wall_ratio_on_over_off"] == pytest.approx(on["wall_s"] / off["wall_s"], abs=2e-3)
    in_process = trials["in_process"]  # the second trial's cost, less its training epochs (read from MLflow)
    assert in_process["training_s"] > 0 and trials["trials"] == [1, 2]
    assert in_process["overhead_s"] == pytest.approx(in_process["per_trial_s"] - in_process["training_s"], abs=0.02)
    # nothing but caches ($XDG_CACHE_HOME: matplotlib's font list when a report draws plots) is left here
    assert {p.name for p in bare_workdir.iterdir()} <= {"cache"}, "the bench leaves its runs and stores here"


def test_the_step_ratio_interval_narrows_with_rounds_and_resolves_a_clear_gap() -> None:
    assert median_interval([0.9]) == (0.9, 0.9)
    assert median_interval([1.0] * 6) == (1.0, 1.0)
    spread = [0.85, 1.15, 0.9, 1.1, 0.95, 1.05]  # +-15% round to round, median 1.0
    low, high = median_interval(spread)
    assert 0.85 <= low < 1.0 < high <= 1.15
    low_many, high_many = median_interval(spread * 8)  # 8x the rounds, the same spread: a narrower interval
    assert low < low_many < 1.0 < high_many < high
    assert median_interval([0.90, 0.91, 0.92, 0.91, 0.90, 0.92])[1] < 0.97  # a clear gap below the target


def test_bad_options_fail_in_one_line_before_any_work(bare_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in [
        (["--only", "step,speed"], "--only: unknown measurement ['speed']"),
        (["--teacher", "resnet9000"], "--teacher: unknown model 'resnet9000'"),
        (["--steps", "0"], "--steps: 0 is too small"),
        (["-o", "train.epochs=0"], "train.epochs"),
    ]:
        assert main(["bench", *args]) == 2
        out, err = capsys.readouterr()
        assert out == "" and message in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in bare_workdir.iterdir()] == []  # refused before any work


@pytest.mark.slow
def test_data_measurement_compares_the_stream_with_a_plain_loader(
    local_ray: None, bare_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdray.bench.data

    monkeypatch.setattr(kdray.bench.data, "FOLDERS", ((24, 96), (12, 96)))
    result = kdray.bench.data.measure_data(BenchOptions(student="plane2", batch_size=16, rounds=2))
    for side in (24, 12):
        measured = result[f"jpeg{side}"]
        assert measured["images"] == 86 and measured["scan_s"] > 0  # 96 written, one per class held out for val
        rounds = measured["rounds"]
        per_round = [s / p for s, p in zip(rounds["stream"], rounds["plain"], strict=True)]
        assert len(per_round) == 2 and measured["stream_over_plain"] == pytest.approx(
            statistics.median(per_round), abs=2e-3
        )
        per_core = statistics.median(rounds["stream"]) / result["cores"]
        assert measured["stream_images_per_s_per_core"] == pytest.approx(per_core, abs=0.1)
    assert "epoch" not in result and result["cores"] >= 1
