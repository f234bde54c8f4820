"""The model store in a bucket (``store.path=s3://…``) against a real S3-protocol server on loopback (moto): entries
published whole and once, read by nodes that share no folder (each its own mirror), damage found by the SHA-256
and moved aside in the bucket, and locks as leases that a dead holder's successor takes over after their term.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest
import torch

from kdray.models import ModelInfo, build_model
from kdray.resolve import load_config
from kdray.schema import ConfigError
from kdray.store import BucketStore, check_bucket, open_store
from kdray.store.lease import BucketLease
from kdray.store.objects import Bucket
from tests.servers import S3Server

pytestmark = pytest.mark.integration  # an S3 server process

INFO = ModelInfo(num_classes=10, in_channels=1, image_size=8)


@pytest.fixture
def bucket_uri(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh prefix of the session's bucket, with the AWS variables pointing at the server."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_server.bucket}/{request.node.name.replace('[', '-').rstrip(']')}-{time.monotonic_ns()}"


def _node(uri: str, tmp_path: Path, name: str, lease_seconds: float = 60) -> BucketStore:
    """The store as one node sees it: its own local mirror, nothing else in common with another node."""
    return BucketStore(uri, lease_seconds, mirror=tmp_path / name / "mirror")


def _save(store: BucketStore, key: str = "k", accuracy: float = 1.0) -> None:
    torch.manual_seed(int(accuracy * 100))
    state = build_model("plane2", INFO).state_dict()
    store.save(
        key, state, "student:\n  name: plane2\n", {"model": {"name": "plane2"}, "metrics": {"val/acc": accuracy}}
    )


def test_an_entry_written_on_one_node_loads_on_another(bucket_uri: str, tmp_path: Path, s3_server: S3Server) -> None:
    writer, reader = _node(bucket_uri, tmp_path, "a"), _node(bucket_uri, tmp_path, "b")
    assert reader.find("k") is None
    torch.manual_seed(0)
    model = build_model("plane2", INFO)
    writer.save("k", model.state_dict(), "student: {}\n", {"model": {"name": "plane2"}, "metrics": {}})
    prefix = bucket_uri.removeprefix(f"s3://{s3_server.bucket}/")
    objects = sorted(name.removeprefix(prefix + "/") for name in s3_server.keys(prefix))
    sha = json.loads(Bucket(bucket_uri).get("k/meta.json"))["weights_sha256"]
    assert objects == ["k/config.yaml", "k/meta.json", f"k/model-{sha[:16]}.pt"]  # no lease left behind
    assert reader.keys() == ["k"]
    loaded = reader.load("k", INFO)  # downloaded into b's mirror, checked against the recorded SHA-256
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    assert (tmp_path / "b" / "mirror" / "k" / "model.pt").is_file()
    assert reader.meta("k")["weights_sha256"] == sha and reader.problem("k") is None


def test_a_second_writer_keeps_the_first_entry_and_leaves_no_weights(
    bucket_uri: str, tmp_path: Path, s3_server: S3Server
) -> None:
    first, second = _node(bucket_uri, tmp_path, "a"), _node(bucket_uri, tmp_path, "b")
    _save(first, accuracy=1.0)
    _save(second, accuracy=0.5)
    assert second.find("k").meta["metrics"] == {"val/acc": 1.0}  # the first published entry stands, on both nodes
    prefix = bucket_uri.removeprefix(f"s3://{s3_server.bucket}/")
    assert len([key for key in s3_server.keys(prefix) if key.endswith(".pt")]) == 1  # the loser's weights removed


@pytest.mark.parametrize("damage", ["weights", "meta"])
def test_a_damaged_entry_in_the_bucket_is_moved_aside_and_trained_again(
    bucket_uri: str, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = _node(bucket_uri, tmp_path, "a"), _node(bucket_uri, tmp_path, "b")
    _save(writer)
    bucket = Bucket(bucket_uri)
    sha = json.loads(bucket.get("k/meta.json"))["weights_sha256"]
    if damage == "weights":  # bit rot in the bucket: same name, other bytes
        bucket.put(f"k/model-{sha[:16]}.pt", bucket.get(f"k/model-{sha[:16]}.pt")[:100])
    else:
        bucket.put("k/meta.json", b"{not json")
    with caplog.at_level(logging.WARNING):
        assert reader.find("k") is None
    assert "moved to s3://" in caplog.text and "its stage will be trained again" in caplog.text
    (aside,) = bucket.folders(".quarantine")
    reason = bucket.get(f".quarantine/{aside}/QUARANTINED.txt").decode()
    assert ("differs from what was stored" if damage == "weights" else "unreadable") in reason
    assert bucket.get("k/meta.json") is None and reader.keys() == []
    _save(reader, accuracy=0.25)  # trained again: a new entry goes in
    assert writer.find("k").meta["metrics"] == {"val/acc": 0.25}


def test_a_lease_is_exclusive_renewed_and_given_back(bucket_uri: str) -> None:
    bucket = Bucket(bucket_uri)
    holder, other = BucketLease(bucket, "k", seconds=2), BucketLease(bucket, "k", seconds=2)
    with holder:
        with holder:  # re-entrant in its holder
            pass
        time.sleep(4)  # twice the term: alive only because the holder renews it
        with pytest.raises(filelock.Timeout):
            other.acquire(timeout=0)
    other.acquire(timeout=0)  # given back: free at once
    other.release()
    assert bucket.get(".locks/k.lease") is None


def test_a_dead_holders_lease_is_taken_over_after_its_term(
    bucket_uri: str, s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    code = (
        "import sys, time; from kdray.store.lease import BucketLease; from kdray.store.objects import Bucket; "
        f"BucketLease(Bucket({bucket_uri!r}), 'k', seconds=3).acquire(); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **s3_server.env})  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    lease = BucketLease(Bucket(bucket_uri), "k", seconds=3)
    with pytest.raises(filelock.Timeout):
        lease.acquire(timeout=4)  # renewed by its live holder past its term
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    killed = time.monotonic()
    with caplog.at_level(logging.WARNING):
        lease.acquire(timeout=30)
    waited = time.monotonic() - killed
    lease.release()
    assert 1 <= waited < 15, waited  # after the term (from its last renewal), not at once, not never
    assert "taken over" in caplog.text


def test_a_bucket_that_cannot_be_written_is_one_line_before_any_work(bucket_uri: str) -> None:
    check_bucket(bucket_uri)  # the session's bucket: conditional writes work
    with pytest.raises(ConfigError, match=r"^store.path: cannot write in s3://no-such-bucket/x \(.*AWS_ENDPOINT_URL"):
        check_bucket("s3://no-such-bucket/x")


def test_the_config_takes_a_bucket_and_refuses_other_schemes(bucket_uri: str) -> None:
    cfg = load_config(None, [f"store.path={bucket_uri}", "store.lease_seconds=5"])
    store = open_store(cfg.store)
    assert isinstance(store, BucketStore) and store.location == bucket_uri and store.lease_seconds == 5
    assert cfg.guide_cache_folder == Path(cfg.data.cache_dir) / "guide-outputs"  # node-local, not in the bucket
    with pytest.raises(ConfigError, match=r"store.path: .*gs:// cannot hold a model store"):
        load_config(None, ["store.path=gs://b/x"])
    with pytest.raises(ConfigError, match=r"store.lease_seconds"):
        load_config(None, ["store.lease_seconds=1"])


@pytest.mark.slow  # two kdray train processes at once
def test_two_processes_sharing_only_a_bucket_train_the_shared_teacher_once(
    bucket_uri: str, tmp_path: Path, s3_server: S3Server
) -> None:
    """Two runs that need the same teacher, started together on 'nodes' with no folder in common (each its own
    working folder, HOME, cache and MLflow store): one trains it under the bucket lease, the other waits on the
    lease and then loads what the first published."""
    from mlflow import MlflowClient

    quickstart = Path(__file__).parents[1] / "experiments" / "quickstart.yaml"
    overrides = ["teacher.name=plane4", "teacher.epochs=3", "student.name=plane2", "train.epochs=1",
                 "scaling.threads=1", f"store.path={bucket_uri}", "store.lease_seconds=5"]  # fmt: skip
    processes = []
    for node in ("a", "b"):
        folder = tmp_path / node
        folder.mkdir()
        env = {**os.environ, **s3_server.env, "HOME": str(folder), "XDG_CACHE_HOME": str(folder / "cache")}
        command = [sys.executable, "-m", "kdray", "train", str(quickstart), *overrides,
                   f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"]  # fmt: skip
        processes.append(subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [out[-2000:] for out in outputs]
    reused = []
    for node in ("a", "b"):
        client = MlflowClient(f"sqlite:///{tmp_path / node / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        reused += [run.data.tags["kdray.reused"] for run in runs if run.data.tags.get("kdray.role") == "teacher"]
        assert not (tmp_path / node / ".kdray" / "store").exists()  # nothing of the store on a node's disk
        assert list((tmp_path / node / "cache" / "kdray" / "store-mirrors").glob("*/*/model.pt"))  # its mirror
    assert sorted(reused) == ["false", "true"]  # trained once, loaded once
    assert not Bucket(bucket_uri).names(".locks")  # every lease given back


def test_two_processes_of_a_node_mirroring_one_entry_both_succeed(
    bucket_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second to install an entry into the node's mirror finds the first one's copy in its way (a rename cannot
    replace a folder that is not empty): the same entry, intact, is as good; another one is an error."""
    from kdray.store import bucket as bucket_store

    writer, node = _node(bucket_uri, tmp_path, "a"), _node(bucket_uri, tmp_path, "b")
    _save(writer)
    assert node.find("k") is not None  # b's mirror holds the entry now
    raw = (tmp_path / "b" / "mirror" / "k" / "meta.json").read_bytes()
    staging = tmp_path / "staging"
    shutil.copytree(tmp_path / "b" / "mirror" / "k", staging)
    monkeypatch.setattr(bucket_store.shutil, "rmtree", lambda *args, **kwargs: None)  # the other process won
    bucket_store._install(staging, tmp_path / "b" / "mirror" / "k", raw)
    with pytest.raises(OSError):
        bucket_store._install(staging, tmp_path / "b" / "mirror" / "k", raw + b" ")
