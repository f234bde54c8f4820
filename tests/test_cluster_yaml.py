"""cluster.yaml: valid for Ray's own cluster-launcher schema (offline), and holding what kdray relies on."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from kdray.resolve import load_config
from tests.locked import read_lock

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_accepts_the_cluster_file(raw: dict[str, Any]) -> None:
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_ray_rejects_a_broken_copy(raw: dict[str, Any]) -> None:
    """The validation above is real: the same file with a mistyped field fails it."""
    broken = copy.deepcopy(raw)
    broken["max_workers"] = "eight"
    with pytest.raises(Exception, match="eight"):
        validate_config(prepare_config(broken))


def test_head_runs_ray_with_token_auth_dashboard_and_mlflow(raw: dict[str, Any]) -> None:
    head = " ".join(raw["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "RAY_AUTH_MODE=token" in head
    assert "--dashboard-host" in head  # Train V2 frees stopped trials' placement groups through it
    assert "mlflow server --app-name basic-auth" in head  # MLflow never listens without auth
    assert '--host "$(hostname -I' in head  # the private address, not 0.0.0.0
    assert raw["available_node_types"][raw["head_node_type"]]["resources"] == {"CPU": 0}
    assert "RAY_AUTH_MODE=token" in " ".join(raw["worker_start_ray_commands"])


def test_gpu_workers_autoscale_from_zero(raw: dict[str, Any]) -> None:
    workers = {name: t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]}
    gpu = workers["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert re.match(r"(g5|g6|p4|p5)", gpu["node_config"]["InstanceType"])
    assert raw["docker"]["worker_image"].endswith("-gpu")


def test_nodes_install_this_checkout_at_the_tested_versions(raw: dict[str, Any]) -> None:
    """Every node installs the checkout with the lock the suite passed on, on the image of the locked Ray."""
    assert raw["file_mounts"]["/home/ray/kdray"] == "."
    assert any("-c /home/ray/kdray/requirements.lock" in c for c in raw["setup_commands"])
    ray_pin = read_lock()["ray"]
    assert f"rayproject/ray:{ray_pin}-" in raw["docker"]["head_image"]
    assert f"rayproject/ray:{ray_pin}-" in raw["docker"]["worker_image"]


def test_storage_variables_reach_kdray(raw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The node environment cluster.yaml writes is what kdray's defaults read."""
    setup = " ".join(raw["setup_commands"])
    storage = re.search(r"export KDRAY_STORAGE_PATH=(\S+?)'", setup)
    store = re.search(r"export KDRAY_STORE_PATH=(\S+?)'", setup)
    assert storage and storage.group(1).startswith("s3://")
    assert store and store.group(1).startswith("s3://")  # no shared file system: the store is in the bucket
    monkeypatch.setenv("KDRAY_STORAGE_PATH", storage.group(1))
    monkeypatch.setenv("KDRAY_STORE_PATH", store.group(1))
    cfg = load_config(ROOT / "experiments" / "quickstart.yaml")
    assert cfg.scaling.storage_path == storage.group(1)
    assert cfg.store.path == store.group(1)
