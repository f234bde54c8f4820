"""Every experiment file passes `kdray validate` (config and search space).

The command runs in this process (``kdray.cli.main``): a subprocess per file would spend most of the
test importing torch; tests/test_cli.py covers the command as a separate process."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kdray.cli import main

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "experiments").glob("*.yaml"))
# Files whose data is given on the command line (the README says how).
ROOT_ON_COMMAND_LINE = {
    "cifar10_cpu.yaml",
    "compare_cifar10_cpu.yaml",
    "feature_search_cifar10_cpu.yaml",
    "kd_imagenet_resnet34_resnet18.yaml",
    "pareto_cifar10_cpu.yaml",
    "takd_cifar10_plain_table1.yaml",
}


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def validate(capsys: pytest.CaptureFixture[str]) -> Callable[..., Done]:
    def run(path: Path, *overrides: str) -> Done:
        code = main(["validate", str(path), *overrides])
        out = capsys.readouterr()
        return Done(code, out.out, out.err)

    return run


def test_the_paper_settings_are_all_there() -> None:
    names = {path.stem for path in FILES}
    expected = {
        "quickstart",
        "cifar10_cpu",
        "triplet_cifar10",
        "feature_mixup_cifar10",
        "stkd_cifar100",
        "takd_cifar100_plain",
        "takd_cifar100_resnet",
        "dgkd_cifar100_plain",
        "dgkd_cifar100_resnet",
        "pacemaker_cifar100",
        "online_branch_cifar100",
        "kd_cifar100_resnet56_resnet20",
        "kd_cifar100_resnet32x4_resnet8x4",
        "kd_cifar100_wrn40_2_wrn16_2",
        "kd_imagenet_resnet34_resnet18",
        "logit_baselines_cifar100",
        *REPDISTILLER_PAIRS,
    }
    assert expected <= names, sorted(expected - names)


REPDISTILLER_PAIRS = [
    f"repdistiller_cifar100_{pair}"
    for pair in ("resnet56_resnet20", "wrn402_wrn162", "resnet32x4_resnet8x4", "vgg13_vgg8",
                 "resnet32x4_shufflenetv2", "vgg13_mobilenetv2")
]  # fmt: skip


@pytest.mark.parametrize("stem", REPDISTILLER_PAIRS)
def test_repdistiller_benchmark_files_quote_every_method_and_search_each_once(stem: str) -> None:
    text = (REPO / "experiments" / f"{stem}.yaml").read_text()
    header, raw = text.split("\ndata:")[0], yaml.safe_load(text)
    for method in ("KD", "FitNet", "AT", "SP", "VID", "RKD", "PKT", "CRD", "ReviewKD", "DKD"):
        assert re.search(rf"\b{method} \d\d\.\d\d\b", header), method
    assert raw["train"]["epochs"] == 240 and raw["train"]["milestones"] == [150, 180, 210]
    methods = raw["search"]["space"]["method.name"]["values"]
    assert {"fitnet", "at", "sp", "vid", "rkd", "pkt", "crd", "reviewkd"} <= set(methods)
    assert raw["search"]["num_samples"] == len(methods) and raw["search"]["scheduler"]["name"] == "none"


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_experiment_validates(path: Path, tmp_path: Path, validate: Callable[..., Done]) -> None:
    overrides = [f"data.root={tmp_path}"] if path.name in ROOT_ON_COMMAND_LINE else []
    done = validate(path, *overrides)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    raw = yaml.safe_load(path.read_text())
    assert resolved["method"]["name"] == raw["method"]["name"]
    header = path.read_text().split("\ndata:")[0]
    if path.stem == "takd_cifar10_plain_table1":  # a paper's recipe, sized to run on this project's CPUs
        assert re.search(r"\b20\d\d\b", header) and "Reported" in header
    elif path.stem not in {
        "quickstart",
        "cifar10_cpu",
        "compare_cifar10_cpu",
        "feature_search_cifar10_cpu",
        "pareto_quickstart",
        "pareto_cifar10_cpu",
    }:  # fmt: skip  (kdray's own settings; the others are papers')
        assert re.search(r"\b20\d\d\b", header), "a paper file cites its paper (authors, venue, year)"
        assert "Reported" in header, "a paper file states the reported numbers, or that none are known"
        assert resolved["scaling"]["use_gpu"] is True and resolved["scaling"]["num_workers"] >= 1


def test_validate_refuses_a_search_space_tune_would_refuse(tmp_path: Path, validate: Callable[..., Done]) -> None:
    """`kdray validate` checks the search section too, so a bad range fails before a cluster job."""
    raw = yaml.safe_load((REPO / "experiments" / "triplet_cifar10.yaml").read_text())
    raw["search"]["space"]["method.margin"]["high"] = 500  # the margin field allows at most 100
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    done = validate(bad)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("kdray: config error: search.space.method.margin: 500")
