"""The command line: exit codes, one-line errors, listings. Commands run in this process through
``kdray.cli.main`` (a new interpreter costs seconds of imports); one test runs the installed entry point
as a user does, in its own process."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from kdray import __version__
from kdray.cli import main
from kdray.models import ModelInfo, build_model
from kdray.store import ModelStore
from tests.faults import zero_in_place

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")


def kdray(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``kdray ARGS`` in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_entry_point_runs_in_its_own_process_and_errors_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kdray", "validate", QUICKSTART, "method.temperature=-4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "kdray: config error: method.temperature: Input should be greater than 0 (got -4)"
    ]


def test_validate_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = kdray(capsys, "validate", QUICKSTART, "method.temperature=7")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["method"] == {
        **{"name": "kd", "temperature": 7.0, "alpha": 0.9, "ce_weight": None, "kd_weight": None},
        **{"logit_standardization": False, "kl_reduction": "batchmean"},  # every default, written out
    }
    assert resolved["tracking"]["uri"].startswith("sqlite:////")  # resolved to an absolute path
    assert Path(resolved["store"]["path"]).is_absolute() and Path(resolved["scaling"]["storage_path"]).is_absolute()


def test_train_refuses_bad_config_before_any_work(bare_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = kdray(capsys, "train", QUICKSTART, "student.name=resnet7")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("kdray: config error: student.name: unknown model 'resnet7'")
    assert not (bare_workdir / "mlflow.db").exists() and not (bare_workdir / ".kdray").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # /sys refuses writes even to root (tests may run as root, where permission bits do not bind)
        ("store.path=/sys/kdray-store", "store.path: cannot write in /sys/kdray-store ("),
        ("scaling.storage_path=/sys/kdray-ray", "scaling.storage_path: cannot write in /sys/kdray-ray"),
        ("tracking.uri=sqlite:////sys/mlflow.db", "tracking.uri: cannot write in /sys (Permission denied)"),
    ],
)
def test_unwritable_places_are_refused_before_any_work(
    bare_workdir: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    for command in ("train", "tune"):
        code, _, err = kdray(capsys, command, QUICKSTART, override)
        assert code == 2 and err.strip().splitlines()[-1].startswith(f"kdray: config error: {expected}"), err
    assert not (bare_workdir / "mlflow.db").exists()


def test_listings(capsys: pytest.CaptureFixture[str]) -> None:
    code, methods, _ = kdray(capsys, "methods")
    assert code == 0
    assert "method.temperature = 4.0" in methods and methods.startswith("none:")
    listed = {line.split(":")[0] for line in methods.splitlines() if not line.startswith(" ")}
    assert listed == {
        *("none", "kd", "dkd", "dist", "triplet", "feature_mixup", "stkd", "takd", "dgkd", "pacemaker"),
        *("online_branch", "dml"),
    }
    assert "method.margin = 5.0" in methods and "method.drop_num = 1" in methods
    _, models, _ = kdray(capsys, "models")
    assert "resnet32x4" in models and "wrn_40_2" in models and "plane10" in models
    _, datasets, _ = kdray(capsys, "datasets")
    assert {"digits", "cifar10", "cifar100", "imagefolder"} <= {line.split()[0] for line in datasets.splitlines()}


def test_ui_refuses_a_store_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped store would otherwise open as a new, empty one."""
    code, _, err = kdray(capsys, "ui", "--tracking-uri", f"sqlite:///{tmp_path}/nothing.db")
    assert code == 2
    assert err.strip().splitlines() == [
        f"kdray: config error: --tracking-uri: no MLflow store at {tmp_path}/nothing.db; run kdray train or "
        "kdray tune first, or point --tracking-uri at the store (sqlite:///path/mlflow.db)"
    ]
    assert not (tmp_path / "nothing.db").exists()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"kdray {__version__}"


def test_a_listing_whose_reader_stops_early_ends_quietly() -> None:
    """`kdray methods | head`: the reader is gone before kdray writes (its end of the pipe closed at once)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kdray", "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # type: ignore[union-attr]
    errors = process.stderr.read().decode()  # type: ignore[union-attr]
    assert process.wait(timeout=300) == 0 and errors == "", errors[-2000:]


def test_report_refuses_a_store_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = kdray(capsys, "report", "some-search", "--tracking-uri", f"sqlite:///{tmp_path}/nothing.db")
    assert code == 2 and f"--tracking-uri: no MLflow store at {tmp_path}/nothing.db" in err
    assert not (tmp_path / "nothing.db").exists()  # no empty store left behind


def test_store_verify_lists_damage_and_repair_moves_it_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ModelStore(tmp_path / "store")
    for key in ("good", "bad"):
        store.save(key, build_model("plane2", ModelInfo(10, 1, 8)).state_dict(), "", {"model": {"name": "plane2"}})
    zero_in_place(store.root / "bad" / "model.pt")
    assert main(["store", "verify", "--store", str(store.root)]) == 1  # damage found and left: a script notices
    shown = capsys.readouterr().out
    assert "ok       good" in shown and "damaged  bad  " in shown and "differs from what was stored" in shown
    assert "2 entries in" in shown and "1 intact, 1 damaged, left in place" in shown
    assert (store.root / "bad").exists()
    assert main(["store", "verify", "--store", str(store.root), "--repair"]) == 0
    assert "moved    bad" in capsys.readouterr().out and store.keys() == ["good"]
    assert main(["store", "verify", "--store", str(store.root)]) == 0
    assert "1 entries in" in capsys.readouterr().out
    assert main(["store", "verify", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no model store there" in capsys.readouterr().err


def test_resume_takes_a_name_never_a_path(bare_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--resume` loads Tune's pickles from the search's folder: a path there would load them from anywhere."""
    assert main(["tune", "--resume", "../../elsewhere"]) == 2
    assert "kdray: config error: --resume: '../../elsewhere' is not a plain name" in capsys.readouterr().err


def test_ctrl_c_ends_in_one_line_and_the_run_is_marked_killed(workdir: Path) -> None:
    """SIGINT (Ctrl-C) in the middle of training: one line on stderr, no traceback, exit 130, run KILLED."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kdray", "train", QUICKSTART, "teacher.name=plane4", "teacher.epochs=50"]
        + ["tracking.experiment=ctrl-c"],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in process.stderr:  # type: ignore[union-attr]
        lines.append(line)
        if "epoch   2/50" in line:
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, "".join(lines) + rest
    assert "Traceback" not in rest and rest.strip().splitlines()[-1].startswith("kdray: interrupted; the runs it had")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    assert runs and {run.info.status for run in runs} == {"KILLED"}
