"""Bring your own teacher, student and architecture; give back a student anyone can load."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from PIL import Image
from torchvision import models as tv

from kdray.build import model_info
from kdray.data import DataError, load_dataset
from kdray.deployed import accuracy, export, load_classifier
from kdray.models import ModelInfo, WeightsError, build_model, code_version, load_weights, parameter_count
from kdray.models.deploy import Classifier
from kdray.preflight import check_models
from kdray.resolve import load_config
from kdray.run import ExperimentResult, describe, run_experiment
from kdray.schema import ConfigError, ExperimentConfig

# RepDistiller's own definitions (github.com/HobbitLong/RepDistiller, models/), CIFAR-100 heads, counted by
# building its model_dict entries: vgg8..19 = vgg*_bn, mobilenetv2 = MobileNetV2 (mobile_half),
# shufflenetv1/v2 = ShuffleV1/ShuffleV2, resnet50 = ResNet50; resnet8/32x4 and wrn_40_2 as a cross-check.
REPDISTILLER_PARAMETERS = {
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
    "resnet50": 23_705_252,
    "resnet8": 83_892,
    "resnet32x4": 7_433_860,
    "wrn_40_2": 2_255_156,
}


@pytest.mark.parametrize(("name", "count"), REPDISTILLER_PARAMETERS.items())
def test_cifar_architectures_have_repdistillers_parameter_counts(name: str, count: int) -> None:
    assert parameter_count(build_model(name, ModelInfo(num_classes=100))) == count


@pytest.mark.integration
@pytest.mark.parametrize(("name", "stages"), [("resnet18", 5), ("mobilenet_v2", 5), ("efficientnet_b0", 5)])
def test_torchvision_models_are_split_by_resolution_and_load_torchvisions_own_weights(name: str, stages: int) -> None:
    torch.manual_seed(0)
    original = tv.get_model(name, num_classes=10).eval()
    staged = build_model(f"torchvision.{name}", ModelInfo(num_classes=10, image_size=64)).eval()
    assert len(staged.stage_names) == stages
    load_weights(staged, original.state_dict(), "torchvision")  # torchvision's parameter names
    images = torch.rand(2, 3, 64, 64)
    logits, features = staged(images, features=True)
    assert torch.allclose(logits, original(images), atol=1e-5)
    sizes = [hidden.shape[-1] for hidden in features.values()]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == stages  # one stage per resolution
    first = staged.stage_names[1]
    assert torch.allclose(staged.forward_from(first, staged.forward_to(first, images)), logits, atol=1e-5)


def test_a_users_module_with_its_own_forward_is_kept_whole_and_refused_where_stages_are_needed(
    bare_workdir: Path,
) -> None:
    whole = build_model("user_models:TinyNet", ModelInfo(num_classes=10, in_channels=1, image_size=8))
    split = build_model("user_models:features_net", ModelInfo(num_classes=10, in_channels=1, image_size=8))
    assert whole.stage_names == [] and split.stage_names == ["stage1", "stage2"]
    cfg = load_config(None, ["student.name=user_models:TinyNet", "method.name=feature_mixup"])
    with pytest.raises(ConfigError, match=r"^student.name: method 'feature_mixup' reads 1 stage\(s\)"):
        check_models(cfg, load_dataset(cfg.data))
    for bad, message in (
        ("user_models:Missing", "user_models has no attribute Missing"),
        ("no_such_package.models:net", "cannot import no_such_package.models"),
        ("torchvision.resnet1800", "unknown model 'torchvision.resnet1800'"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"student.name={bad}"])


def test_code_version_follows_the_code_not_its_docstrings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def version_of(source: str, module: str) -> str:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        return code_version(f"{module}:net")

    monkeypatch.syspath_prepend(str(tmp_path))
    net = '''
        """{doc}"""
        from torch import nn
        def net(num_classes):
            """{doc}"""
            return nn.Sequential(nn.Flatten(), nn.Linear({width}, num_classes))
    '''
    base = version_of(net.format(doc="one", width=192), "arch_a")
    assert version_of(net.format(doc="two", width=192), "arch_b") == base  # only a docstring changed
    assert version_of(net.format(doc="one", width=64), "arch_c") != base  # the definition changed
    assert code_version("resnet8") == code_version("resnet20") != code_version("wrn_16_1")


def train_plain_teacher(path: Path) -> float:
    """What a user does without kdray: train a model on [0, 1] pixels and save its state dict."""
    cfg = load_config(None)
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model("plane4", model_info(data))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = data.train.images.float() / 255, data.train.labels
    for _ in range(15):
        for start in range(0, len(labels), 64):
            loss = F.cross_entropy(model(images[start : start + 64]), labels[start : start + 64])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    torch.save(model.state_dict(), path)
    model.eval()
    with torch.no_grad():
        return (model(data.val.images.float() / 255).argmax(1) == data.val.labels).float().mean().item()


def summary_rows(result: ExperimentResult, cfg: ExperimentConfig) -> dict[str, list[str]]:
    """{stage: [model, source]} read off the run's summary table, whose columns must line up under the header."""
    header, *rows = describe(result, cfg).splitlines()[: 1 + len(result.stages)]
    starts = [header.index(title) for title in ("model", "key", "source")]
    table = {}
    for row, stage in zip(rows, result.stages, strict=True):
        assert [row.index(value) for value in (stage.plan.model.name, stage.plan.key, stage.source)] == starts, row
        table[stage.plan.role] = [stage.plan.model.name, stage.source]
    return table


@pytest.mark.slow
def test_a_teacher_given_as_a_weights_file_teaches_a_users_own_student(workdir: Path) -> None:
    val_acc = train_plain_teacher(workdir / "teacher.pt")
    overrides = [
        "teacher.name=plane4",
        f"teacher.weights={workdir / 'teacher.pt'}",
        "teacher.input_mean=[0.0]",  # it was trained on plain [0, 1] pixels
        "teacher.input_std=[1.0]",
        "student.name=user_models:TinyNet",
        "train.epochs=10",
        "tracking.experiment=given",
    ]
    cfg = load_config(None, overrides)
    first = run_experiment(cfg)
    teacher, student = first.stages
    assert summary_rows(first, cfg) == {"teacher": ["plane4", "given"], "student": ["user_models:TinyNet", "trained"]}
    assert teacher.plan.weights is not None and not teacher.reused
    assert teacher.metrics["val/acc"] == pytest.approx(val_acc, abs=1e-6)  # evaluated as the user would
    assert teacher.metrics["val/acc"] > 0.8 and student.metrics["val/acc"] > 0.3
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert "loss/total" not in client.get_run(teacher.run_id).data.metrics  # never trained
    cfg = load_config(None, [*overrides, "method.temperature=2"])
    again = run_experiment(cfg)
    assert again.stages[0].plan.key == teacher.plan.key and again.stages[0].reused  # keyed by the weights
    assert summary_rows(again, cfg)["teacher"] == ["plane4", "reused"]
    # a file that does not fit the architecture is one clear error before anything runs
    with pytest.raises(ConfigError, match=r"^teacher.weights: .*do not fit this architecture"):
        run_experiment(load_config(None, [*overrides, "teacher.name=resnet8"]))
    # the student as the user gets it: [0, 1] images in, logits out, the logged test accuracy
    logged = client.get_run(student.run_id).data
    data = load_dataset(load_config(None).data)
    for name in (f"models:/{logged.tags['kdray.model_id']}", student.plan.key):  # logged, and by store key
        model = load_classifier(name, load_config(None))
        assert accuracy(model, data, "test", load_config(None).data)[0] == pytest.approx(logged.metrics["test/acc"])


def write_mixed_size_folder(root: Path, per_class: int = 12) -> None:
    """Colour-coded classes at mixed sizes (64x64, 80x72, 96x96): only data.image_size makes them one size."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for split, count in (("train", per_class), ("val", 4)):
        for label, colour in enumerate(colours):
            for i in range(count):
                width, height = ((64, 64), (80, 72), (96, 96))[i % 3]
                pixels = np.clip(rng.normal(colour, 40, (height, width, 3)), 0, 255).astype(np.uint8)
                (root / split / f"c{label}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / split / f"c{label}" / f"{i}.png")


@pytest.mark.slow
def test_torchvision_resnet18_teaches_mobilenet_v2_on_a_64px_image_folder(workdir: Path) -> None:
    write_mixed_size_folder(workdir / "images")
    with pytest.raises(DataError, match="set data.image_size"):
        load_dataset(load_config(None, ["data.name=imagefolder", f"data.root={workdir / 'images'}"]).data)
    cfg = load_config(
        None,
        [
            "data.name=imagefolder",
            f"data.root={workdir / 'images'}",
            "data.image_size=64",
            "teacher.name=torchvision.resnet18",
            "student.name=torchvision.mobilenet_v2",
            "train.epochs=2",
            "train.batch_size=16",
            "train.lr=0.01",
            "tracking.experiment=torchvision",
        ],
    )
    result = run_experiment(cfg)
    assert [stage.plan.model.name for stage in result.stages] == ["torchvision.resnet18", "torchvision.mobilenet_v2"]
    assert all(np.isfinite(stage.metrics["val/acc"]) for stage in result.stages)
    client = MlflowClient(cfg.tracking.uri)
    model = mlflow.pytorch.load_model(f"models:/{client.get_run(result.student.run_id).data.tags['kdray.model_id']}")
    assert isinstance(model, Classifier) and model.image_shape == (3, 64, 64)
    out = workdir / "student.pt"
    export(model, "torchscript", out)
    scripted = torch.jit.load(str(out))
    images = torch.rand(3, 3, 64, 64)
    assert torch.allclose(scripted(images), model(images), atol=1e-5)


@pytest.mark.integration
def test_installed_packages_add_models_and_methods_through_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package of one file declares a model and a method in its metadata, as `pip install` would."""
    (tmp_path / "acme_kd.py").write_text(
        textwrap.dedent('''
        from typing import Literal

        import torch.nn.functional as F
        from torch import nn

        from kdray.methods import Method, MethodParams


        class HardLabelParams(MethodParams):
            name: Literal["acme_hard"] = "acme_hard"


        class HardLabelKD(Method):
            """Cross-entropy on the teacher's argmax."""

            Params = HardLabelParams
            summary = "ACME: cross-entropy on the teacher's hard labels"

            def forward(self, batch, step):
                return {"ce": F.cross_entropy(self.student(batch.images), self.guide(0)(batch).argmax(1))}


        def tiny(num_classes):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        ''')
    )
    info = tmp_path / "acme_kd-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-kd\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[kdray.methods]\nacme_hard = acme_kd:HardLabelKD\n\n[kdray.models]\nacme_tiny = acme_kd:tiny\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from kdray.methods import METHODS

    try:
        cfg = load_config(None, ["method.name=acme_hard", "student.name=acme_tiny"])
        assert cfg.method.name == "acme_hard" and cfg.student.name == "acme_tiny"
        environment = {**os.environ, "PYTHONPATH": str(tmp_path)}  # a fresh process finds the package too
        listed, models = (
            subprocess.run(["kdray", what], capture_output=True, text=True, check=True, env=environment).stdout
            for what in ("methods", "models")
        )
        assert "acme_hard: ACME: cross-entropy on the teacher's hard labels" in listed
        assert "acme_tiny" in models and "entry point acme_kd:tiny" in models
    finally:
        METHODS.remove("acme_hard")


def test_timm_models_are_one_stage_and_load_timms_own_weights() -> None:
    timm = pytest.importorskip("timm", reason="timm is an optional extra (kdray[timm])")
    torch.manual_seed(0)
    original = timm.create_model("resnet18", num_classes=10).eval()
    staged = build_model("timm.resnet18", ModelInfo(num_classes=10)).eval()
    assert staged.stage_names == ["features"]
    load_weights(staged, original.state_dict(), "timm")
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(staged(images), original(images), atol=1e-5)
    assert len(staged.state_dict()) == len(original.state_dict())  # the head does not list the weights twice


@pytest.mark.integration
def test_a_teacher_given_as_an_mlflow_model_brings_its_normalisation(workdir: Path) -> None:
    from mlflow.entities import LoggedModelStatus

    from kdray.given import given_model
    from kdray.tracking import Tracker

    torch.manual_seed(0)
    model = build_model("resnet8", ModelInfo(num_classes=10, in_channels=1, image_size=8))
    tracker = Tracker("sqlite:///mlflow.db", "teachers")
    run = tracker.start_run("teacher", {})
    logged = Classifier(model, [0.25], [0.5], [str(c) for c in range(10)], (1, 8, 8))
    model_id = tracker.log_model(run, logged, (1, 8, 8))
    # The model belongs to its run's experiment (its Models tab), not to MLflow's "Default".
    found = tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert [m.model_id for m in found] == [model_id]
    assert found[0].source_run_id == run and found[0].status.to_proto() == LoggedModelStatus.READY.to_proto()
    assert not tracker.client.search_logged_models(experiment_ids=["0"])
    cfg = load_config(None, ["teacher.name=resnet8", f"teacher.weights=models:/{model_id}"])
    info = ModelInfo(num_classes=10, in_channels=1, image_size=8)
    given = given_model(cfg, "teacher", cfg.student.model_copy(update={"name": "resnet8"}), info)
    assert given.stats == ((0.25,), (0.5,))
    assert all(
        torch.equal(a, b) for a, b in zip(given.model.state_dict().values(), model.state_dict().values(), strict=True)
    )
    wrong = load_config(None, ["teacher.name=resnet20", f"teacher.weights=models:/{model_id}"])
    with pytest.raises(ConfigError, match=r"^teacher.weights: .*do not fit this architecture"):
        given_model(wrong, "teacher", wrong.student.model_copy(update={"name": "resnet20"}), info)
    tracker.end_run(run)


@pytest.mark.slow
def test_onnx_export_takes_any_batch_size(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="ONNX export is an optional extra (kdray[onnx])")
    model = Classifier(build_model("resnet8", ModelInfo(10, 1, 8)), [0.5], [0.25], image_shape=(1, 8, 8)).eval()
    export(model, "onnx", tmp_path / "student.onnx")
    graph = onnx.load(str(tmp_path / "student.onnx")).graph
    onnx.checker.check_model(onnx.load(str(tmp_path / "student.onnx")))
    (images,) = graph.input
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]


@pytest.mark.slow
def test_a_chain_takes_a_given_assistant_and_trains_the_rest(workdir: Path) -> None:
    train_plain_teacher(workdir / "plane4.pt")
    chain = ["method.name=takd", "teacher.name=plane6", "student.name=plane2", "assistants.depth=1"]
    chain += ["assistants.models=[plane4]", "train.epochs=2", "tracking.experiment=chain"]
    with pytest.raises(ConfigError, match=r"^assistants.weights: plane8 is not among the assistants"):
        load_config(None, [*chain, f"assistants.weights={{plane8: {workdir / 'plane4.pt'}}}"])
    given = [f"assistants.weights={{plane4: {workdir / 'plane4.pt'}}}"]
    result = run_experiment(load_config(None, [*chain, *given]))
    teacher, assistant, student = result.stages
    assert teacher.plan.weights is None and student.plan.guides == [assistant.plan.key]
    assert assistant.plan.role == "assistant1" and assistant.plan.weights == str(workdir / "plane4.pt")
    runs = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")  # absolute: MLflow caches stores by URI
    assert "loss/total" not in runs.get_run(assistant.run_id).data.metrics
    assert "loss/total" in runs.get_run(teacher.run_id).data.metrics and np.isfinite(student.metrics["val/acc"])


def test_weights_for_other_classes_are_refused_naming_the_classifier() -> None:
    cifar100 = build_model("resnet8", ModelInfo(num_classes=100))
    digits = build_model("resnet8", ModelInfo(num_classes=10))
    with pytest.raises(WeightsError, match=r"head.fc.weight is \(100, 64\) in the weights but \(10, 64\) .*classes"):
        load_weights(digits, cifar100.state_dict(), "cifar100.pt")
