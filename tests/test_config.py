from pathlib import Path

import pytest
import yaml

from kdray.resolve import apply_overrides, load_config, validate_config
from kdray.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_empty_file_is_the_default_digits_kd_run(tmp_path: Path) -> None:
    file = tmp_path / "empty.yaml"
    file.write_text("")
    cfg = load_config(file)
    assert cfg.data.name == "digits" and cfg.method.name == "kd"
    assert cfg.method.temperature == 4.0
    # digits must not be flipped (a mirrored 2 is no 2): the dataset's defaults fill augment
    assert cfg.data.augment.flip is False and cfg.data.augment.padding == 1


def test_every_shipped_experiment_validates() -> None:
    files = sorted((REPO / "experiments").glob("*.yaml"))
    assert files
    for file in files:
        overrides = []
        if "imagefolder" in file.read_text():
            overrides = [f"data.root={REPO}"]  # any existing path; only validation is checked here
        load_config(file, overrides)


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        None,
        [
            "method.temperature=2.5",
            "train.epochs=3",
            "train.milestones=[1, 2]",
            "train.schedule=multistep",
            "data.augment.flip=true",
        ],
    )
    assert cfg.method.temperature == 2.5
    assert cfg.train.epochs == 3 and cfg.train.milestones == [1, 2]
    assert cfg.data.augment.flip is True


def test_search_space_bounds_are_overridable_by_their_dotted_names() -> None:
    """Space entries are dotted themselves: ``search.space.method.margin.low`` is entry method.margin's low."""
    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    cfg = load_config(quickstart, ["search.space.method.margin.low=2", "search.space.method.margin.high=3"])
    margin = cfg.search.space["method.margin"]
    assert (margin.kind, margin.low, margin.high) == ("float", 2, 3)
    assert cfg.search.space["method.temperature"].low == 1  # the other entries are untouched
    added = load_config(quickstart, ["search.space.method.beta={kind: float, low: 1, high: 2}"])
    assert added.search.space["method.beta"].high == 2
    with pytest.raises(ConfigError, match=r"^search\.space\.method\.margin: a float parameter needs low < high"):
        load_config(quickstart, ["search.space.method.margin.low=9"])


def test_overrides_do_not_mutate_the_raw_dict() -> None:
    raw = {"method": {"name": "kd", "temperature": 3}}
    apply_overrides(raw, ["method.temperature=9"])
    assert raw["method"]["temperature"] == 3


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["method.alpha=0.5"])
    again = validate_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_method_without_name_means_kd(tmp_path: Path) -> None:
    file = tmp_path / "x.yaml"
    file.write_text("method:\n  temperature: 2\n")
    assert load_config(file).method.name == "kd"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["method.temperature=-1"], "method.temperature: Input should be greater than 0 (got -1)"),
        (["method.temprature=3"], "method.temprature: unknown key; allowed: name, temperature, alpha"),
        (["student.name=resnet9"], "student.name: unknown model 'resnet9'; choose one of: plane2"),
        (["method.name=cdr"], "method.name: unknown method 'cdr'; choose one of: none, kd, dkd, dist, triplet"),
        (["data.name=mnist"], "data.name: unknown dataset 'mnist'"),
        (["data.name=imagefolder"], "data.root: dataset 'imagefolder' needs data.root"),
        (["data.name=imagefolder", "data.root=/no/such/dir"], "data.root: '/no/such/dir' does not exist"),
        (
            ["data.name=cifar10", "data.root=/tmp"],
            "data.root: no cifar-10-batches-py/ under /tmp; set data.download=true",
        ),
        (["train.epochs=ten"], "train.epochs: Input should be a valid integer"),
        (["train.schedule=multistep"], "train: schedule=multistep needs train.milestones"),
        (["trian.epochs=3"], "trian: unknown key; allowed: data, teacher, student, method"),
        (["search.space={foo.bar: {kind: float, low: 0, high: 1}}"], "search.space: 'foo.bar' is not a config field"),
        (["epochs"], "override 'epochs': write section.field=value"),
        (["search.name=../../../../X"], "search.name: '../../../../X' is not a plain name: no '/', '\\', '..'"),
        (["search.name=/etc/kdray"], "search.name: '/etc/kdray' is not a plain name"),
        (["search.name=" + "x" * 101], "search.name: 101 characters long; keep it to 100"),
        (["tracking.experiment=a/b"], "tracking.experiment: 'a/b' is not a plain name"),
        (["tracking.run_name=' '"], "tracking.run_name: an empty name; give one"),
        (["scaling.sync_batchnorm=true"], "scaling.sync_batchnorm: needs data-parallel GPU workers"),
        (
            ["scaling.parallelism=branches", "scaling.num_workers=2"],
            "scaling.parallelism=branches: method 'kd' has no branches; use one of online_branch, dml",
        ),
        (
            ["method.name=online_branch", "scaling.parallelism=branches", "scaling.num_workers=2"],
            "scaling.num_workers: parallelism=branches needs one worker per branch; set it to 4",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_field(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("tracking:\n  experiment: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(
        ConfigError, match=r"latin\.yaml: not UTF-8 text \(byte 0xe9 at offset 27\); save the file as UTF-8"
    ):
        load_config(latin)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listed)


def test_switching_method_on_the_command_line_drops_the_files_method_params() -> None:
    quickstart = REPO / "experiments" / "quickstart.yaml"
    assert load_config(quickstart, ["method.name=none"]).method.name == "none"
    # the same method keeps the file's values, and method.* overrides still apply after a switch
    assert load_config(quickstart, ["method.name=kd"]).method.temperature == 4.0
    with pytest.raises(ConfigError, match="method.alpha: unknown key"):
        load_config(quickstart, ["method.name=none", "method.alpha=0.5"])
