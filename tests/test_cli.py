"""The command line: exit codes, one-line errors, listings. Commands run in this process through
``kdray.cli.main`` (a new interpreter costs seconds of imports); one test runs the installed entry point
as a user does, in its own process."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from kdray import __version__
from kdray.cli import main
from kdray.models import ModelInfo, build_model
from kdray.store import ModelStore
from tests.conftest import make_image_folder
from tests.faults import zero_in_place

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")


def kdray(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``kdray ARGS`` in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.integration
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
        ("data.cache_dir=/sys/kdray-cache", "data.cache_dir: cannot write in /sys/kdray-cache"),
        ("guide_cache.path=/proc/kdray-guides", "guide_cache.path: cannot write in /proc/kdray-guides"),
    ],
)
def test_unwritable_places_are_refused_before_any_work(
    bare_workdir: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    for command in ("train", "tune"):
        code, _, err = kdray(capsys, command, QUICKSTART, override)
        assert code == 2 and err.strip().splitlines()[-1].startswith(f"kdray: config error: {expected}"), err
    assert not (bare_workdir / "mlflow.db").exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seed=-1", "train.seed: Input should be greater than or equal to 0 (got -1)"),
        (f"train.seed={2**64}", "train.seed: Input should be less than or equal to 4294967295"),
        ("teacher.seed=-3", "teacher.seed: Input should be greater than or equal to 0"),
        ("search.sampler.seed=-3", "search.sampler.seed: Input should be greater than or equal to 0"),
        (f"train.batch_size={10**23}", "train.batch_size: Input should be less than or equal to 1048576"),
        ("train.epochs=1000000000", "train.epochs: Input should be less than or equal to 100000"),
        ("scaling.num_workers=100000", "scaling.num_workers: Input should be less than or equal to 4096"),
        # within the bound but larger than the data: known once the data is loaded, before any training
        ("train.batch_size=100000", "train.batch_size=100000 is larger than the 1295 training images"),
    ],
)
def test_numbers_out_of_bounds_are_one_line_before_any_work(
    bare_workdir: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    code, _, err = kdray(capsys, "train", QUICKSTART, override)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"kdray: config error: {expected}"), err
    assert not (bare_workdir / ".kdray").exists()  # nothing trained, nothing checkpointed


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU where none is visible")
def test_asking_for_a_gpu_on_a_machine_without_one_is_one_line(
    bare_workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = kdray(capsys, "train", QUICKSTART, "scaling.use_gpu=true")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "kdray: config error: scaling.use_gpu is true but no CUDA device is visible; set scaling.use_gpu=false"
    )


def test_a_typo_inside_a_search_range_names_the_key_and_what_is_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "typo.yaml"
    file.write_text("search:\n  space:\n    method.temperature: {kind: float, low: 1.0, hihg: 8.0}\n")
    code, _, err = kdray(capsys, "validate", str(file))
    assert code == 2
    assert err.strip().splitlines() == [
        "kdray: config error: search.space.method.temperature.hihg: unknown key; allowed: kind, low, high, values, "
        "step, methods"
    ]


@pytest.mark.integration
def test_a_batch_larger_than_a_workers_share_is_refused_before_any_worker_starts(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """96 training images on 2 workers: a per-worker batch of 64 needs 128. Said by the driver, once, exit 2."""
    make_image_folder(workdir / "images", {"train": 32, "val": 8})
    overrides = ["data.name=imagefolder", f"data.root={workdir / 'images'}", "scaling.num_workers=2"]
    for loader in ("memory", "stream"):
        code, _, err = kdray(capsys, "train", QUICKSTART, *overrides, f"data.loader={loader}", "train.epochs=1")
        assert code == 2, err
        assert err.strip().splitlines()[-1] == (
            "kdray: config error: train.batch_size=64 per worker needs 128 training images for "
            "scaling.num_workers=2 workers, and there are 96; set train.batch_size to at most 48, or use fewer workers"
        )
    assert not (workdir / ".kdray" / "ray").exists()  # no Ray Train run began


@pytest.mark.integration
def test_a_diverging_run_is_one_line_and_its_run_is_marked_failed_with_the_reason(workdir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kdray", "train", QUICKSTART, "train.lr=1e6", "teacher.epochs=1", "train.epochs=1"]
        + ["teacher.name=plane4", "tracking.experiment=diverged"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    reason = "teacher: the loss became nan in epoch 1; lower train.lr"
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"kdray: training diverged: {reason} (its MLflow run is marked FAILED)"
    )
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diverged").experiment_id])
    assert {run.info.status for run in runs} == {"FAILED"}
    teacher = next(run for run in runs if run.data.tags["kdray.role"] == "teacher")
    assert teacher.data.tags["kdray.error"] == f"TrainingDiverged: {reason}"


@pytest.mark.integration
def test_listings(capsys: pytest.CaptureFixture[str]) -> None:
    code, methods, _ = kdray(capsys, "methods")
    assert code == 0
    assert "method.temperature = 4.0" in methods and methods.startswith("none:")
    listed = {line.split(":")[0] for line in methods.splitlines() if not line.startswith(" ")}
    assert listed == {
        *("none", "kd", "dkd", "dist", "triplet", "feature_mixup", "stkd", "takd", "dgkd", "pacemaker"),
        *("online_branch", "dml", "fitnet", "at", "sp", "rkd", "pkt", "vid", "crd", "reviewkd"),
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


@pytest.mark.integration
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


@pytest.mark.integration
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
