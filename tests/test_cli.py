"""The command line as a user runs it: a separate process, exit codes, one-line errors."""

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def kdray(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdray", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_validate_prints_the_resolved_config() -> None:
    done = kdray("validate", str(REPO / "experiments" / "quickstart.yaml"), "method.temperature=7")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["method"] == {"name": "kd", "temperature": 7.0, "alpha": 0.9}
    assert resolved["tracking"]["uri"]  # resolved, not null


def test_validate_error_is_one_line_and_exit_2() -> None:
    done = kdray("validate", str(REPO / "experiments" / "quickstart.yaml"), "method.temperature=-4")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "kdray: config error: method.temperature: Input should be greater than 0 (got -4)"
    ]


def test_train_refuses_bad_config_before_any_work(tmp_path: Path) -> None:
    done = kdray("train", str(REPO / "experiments" / "quickstart.yaml"), "student.name=resnet7", cwd=tmp_path)
    assert done.returncode == 2
    assert "student.name: unknown model 'resnet7'" in done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".kdray").exists()


def test_listings() -> None:
    methods = kdray("methods")
    assert methods.returncode == 0
    assert "method.temperature = 4.0" in methods.stdout and methods.stdout.startswith("none:")
    listed = {line.split(":")[0] for line in methods.stdout.splitlines() if not line.startswith(" ")}
    assert listed == {
        *("none", "kd", "triplet", "feature_mixup", "stkd", "takd", "dgkd", "pacemaker", "online_branch", "dml")
    }
    assert "method.margin = 5.0" in methods.stdout and "method.drop_num = 1" in methods.stdout
    models = kdray("models")
    assert "resnet32x4" in models.stdout and "wrn_40_2" in models.stdout and "plane10" in models.stdout
    datasets = kdray("datasets")
    assert {"digits", "cifar10", "cifar100", "imagefolder"} <= {
        line.split()[0] for line in datasets.stdout.splitlines()
    }


def test_ui_refuses_a_store_that_does_not_exist(tmp_path: Path) -> None:
    """A mistyped store would otherwise open as a new, empty one."""
    done = kdray("ui", "--tracking-uri", f"sqlite:///{tmp_path}/nothing.db", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"kdray: config error: --tracking-uri: no MLflow store at {tmp_path}/nothing.db; run kdray train or "
        "kdray tune first, or point --tracking-uri at the store (sqlite:///path/mlflow.db)"
    ]
    assert not (tmp_path / "nothing.db").exists()
