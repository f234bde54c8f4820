"""The streaming path: image files decoded per batch on Ray Data, with the in-memory path's semantics."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from kdray.config import ConfigError, load_config
from kdray.data import DataError, eval_batches, load_dataset, on_device, train_batches
from kdray.run import run_experiment
from tests.conftest import TWO_CPU_WORKERS, make_image_folder, tar_folder, write_png


def folder_config(root: Path, *overrides: str) -> list[str]:
    return ["data.name=imagefolder", f"data.root={root}", *overrides]


@pytest.fixture
def folder(workdir: Path) -> Path:
    """3 classes of 12x12 colour PNGs (20 train, 4 val each) and one grey image among them."""
    root = workdir / "data"
    make_image_folder(root, {"train": 20, "val": 4}, size=12)
    write_png(root / "train" / "dog" / "grey.png", np.arange(144, dtype=np.uint8).reshape(12, 12))
    return root


def test_streamed_and_in_memory_splits_give_the_same_batches(local_ray: None, folder: Path) -> None:
    """Same statistics, fingerprint and validation split; per epoch and rank the same images in the same
    batches with the same crops; every image once per epoch across the ranks (and once in evaluation)."""
    memory = load_dataset(load_config(None, folder_config(folder, "data.loader=memory")).data)
    cfg = load_config(None, folder_config(folder, "data.loader=stream"))
    streamed = load_dataset(cfg.data)
    assert streamed.streamed and not memory.streamed
    assert (streamed.mean, streamed.std, streamed.in_channels) == (memory.mean, memory.std, 3)
    assert streamed.fingerprint() == memory.fingerprint()  # stored teachers serve both paths
    assert torch.equal(streamed.val.labels, memory.val.labels) and len(streamed.train) == len(memory.train) == 61
    cpu = torch.device("cpu")
    sources = [on_device(data.train, data.mean, data.std, cpu, cfg.data) for data in (memory, streamed)]
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            pairs = zip(*(train_batches(s, 9, epoch, 7, 4, True, rank, 2) for s in sources), strict=True)
            for in_memory, from_files in pairs:
                assert torch.equal(in_memory.images, from_files.images)
                assert torch.equal(in_memory.labels, from_files.labels)
                assert np.array_equal(in_memory.views.views, from_files.views.views)
                seen.extend(from_files.views.samples.tolist())
        assert len(seen) == len(set(seen)) == 54  # 27 per rank: 3 batches of 9, the remainder dropped
    evaluated = []
    for rank in (0, 1):
        val = [on_device(data.val, data.mean, data.std, cpu, cfg.data) for data in (memory, streamed)]
        for in_memory, from_files in zip(*(eval_batches(s, 5, rank, 2) for s in val), strict=True):
            assert torch.equal(in_memory.images, from_files.images)
            evaluated.extend(from_files.index.tolist())
    assert sorted(evaluated) == list(range(len(memory.val)))


@pytest.mark.slow
def test_two_ray_workers_streaming_train_the_model_the_memory_path_trains(local_ray: None, folder: Path) -> None:
    """Two gloo workers (half a CPU each, leaving a CPU to Ray Data's decoding) on each path: the same
    losses and accuracies to the last digit, under one store key (a stored result serves either path)."""
    results = {}
    for loader in ("memory", "stream"):
        overrides = [
            *TWO_CPU_WORKERS, "scaling.resources_per_worker={CPU: 0.5}", "train.batch_size=8", "train.epochs=2",
            "method.name=none", "student.name=resnet8", f"data.loader={loader}", f"store.path=store-{loader}",
        ]  # fmt: skip
        results[loader] = run_experiment(load_config(None, folder_config(folder, *overrides))).student
    memory, streamed = results["memory"], results["stream"]
    assert memory.plan.key == streamed.plan.key
    client = MlflowClient(f"sqlite:///{folder.parent / 'mlflow.db'}")
    for metric in ("loss/ce", "val/acc", "val/loss"):
        history = [[m.value for m in client.get_metric_history(r.run_id, metric)] for r in (memory, streamed)]
        assert len(history[0]) == 2 and history[0] == history[1], metric
    assert client.get_run(streamed.run_id).data.params["world_size"] == "2"
    parents = [client.get_run(client.get_run(r.run_id).data.tags["mlflow.parentRunId"]) for r in (memory, streamed)]
    assert [parent.data.params["data.streamed"] for parent in parents] == ["false", "true"]


def test_auto_streams_a_folder_over_the_memory_budget(
    local_ray: None, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kdray.data")
    # 73 images of 3x12x12 bytes are 31,536 bytes: over a budget of 1e-5 GiB (10,737 bytes), within 1 GiB
    assert load_dataset(load_config(None, folder_config(folder, "data.memory_budget=0.00001")).data).streamed
    assert "over the 0.00 GiB memory budget (data.memory_budget): streaming from the files" in caplog.text
    assert not load_dataset(load_config(None, folder_config(folder, "data.memory_budget=1")).data).streamed
    assert "within the 1.00 GiB memory budget (data.memory_budget): in memory" in caplog.text


def test_unreadable_images_are_refused_by_name_or_skipped_and_counted(local_ray: None, folder: Path) -> None:
    """Either path, the same way: refused with the file named and the count, or left out and counted."""
    broken = folder / "train" / "eel" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    kept = {}
    for loader in ("stream", "memory"):
        with pytest.raises(DataError, match=r"broken.png: cannot decode image .*\(1 of 74 images .*bad_images=skip"):
            load_dataset(load_config(None, folder_config(folder, f"data.loader={loader}")).data)
        skip = folder_config(folder, f"data.loader={loader}", "data.bad_images=skip")
        kept[loader] = load_dataset(load_config(None, skip).data)
        assert kept[loader].skipped == 1 and len(kept[loader].train) + len(kept[loader].val) == 73
    assert kept["stream"].fingerprint() == kept["memory"].fingerprint()
    assert not any("broken" in path for path in kept["stream"].train.paths.to_pylist())


def test_streaming_refuses_what_it_cannot_stream(workdir: Path, folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data: .*data.loader=stream reads image folders .*'digits' is read whole"):
        load_config(None, ["data.loader=stream"])
    archive = tar_folder(folder, workdir / "data.tar.gz")
    with pytest.raises(DataError, match=r"data.tar.gz: data.loader=stream reads a folder .*extract it"):
        load_dataset(load_config(None, folder_config(archive, "data.loader=stream")).data)
    (workdir / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no train/<class>/<image> files found"):
        load_dataset(load_config(None, folder_config(workdir / "empty", "data.loader=stream")).data)
    write_png(folder / "val" / "fox" / "000.png", np.zeros((12, 12, 3), np.uint8))
    with pytest.raises(DataError, match=r"val/fox/000.png: class 'fox' is not one of the 3 train classes"):
        load_dataset(load_config(None, folder_config(folder, "data.loader=stream")).data)


@pytest.mark.slow
def test_a_streaming_worker_holds_batches_not_the_dataset(local_ray: None, workdir: Path) -> None:
    """A folder ten times the memory budget streams, and its Ray Train worker peaks well below the worker of
    the memory path on the same folder, which holds its 72 MiB of decoded images."""
    rng = np.random.default_rng(0)
    for index in range(2000):  # smooth 112x112 images: small, quick JPEGs that decode to 72 MiB in all
        path = workdir / "big" / "train" / f"c{index % 4}" / f"{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        coarse.resize((112, 112), Image.BILINEAR).save(path, quality=90)
    decoded_mib = 2000 * 3 * 112 * 112 / 2**20
    memory = {}
    for loader in ("auto", "memory"):
        overrides = [
            "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.threads=1", "data.memory_budget=0.007",
            f"data.loader={loader}", "train.epochs=1", "train.batch_size=20", "train.eval_batch_size=20",
            "method.name=none", "student.name=user_models:TinyNet", f"store.path=store-{loader}",
        ]  # fmt: skip
        outcome = run_experiment(load_config(None, folder_config(workdir / "big", *overrides))).student
        memory[loader] = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(outcome.run_id).data.metrics
    assert decoded_mib > 10 * 0.007 * 1024  # the folder is ten times the budget, and streamed (auto)
    print("MEMORY", {k: (v["private_mb"], v["peak_rss_mb"]) for k, v in memory.items()}, decoded_mib)
    assert memory["auto"]["private_mb"] < memory["memory"]["private_mb"] - decoded_mib / 2, memory


def test_a_folder_some_node_cannot_read_is_refused_before_the_scan(local_ray: None, folder: Path) -> None:
    from kdray.data.scan import check_reachable

    check_reachable(folder, str(next(folder.rglob("*.png"))))  # every node of the cluster (here: one) reads it
    with pytest.raises(DataError, match=r"data: node [\d.]+ cannot read .*missing.png .*every node mounts"):
        check_reachable(folder, str(folder / "missing.png"))


def test_workers_that_would_leave_no_cpu_to_decode_are_refused_before_any_run(local_ray: None, folder: Path) -> None:
    cfg = load_config(None, folder_config(folder, *TWO_CPU_WORKERS, "data.loader=stream", "method.name=none"))
    with pytest.raises(
        ConfigError, match=r"^scaling.resources_per_worker: 2 Ray Train workers hold 2 of the .* 2 CPUs"
    ):
        run_experiment(cfg)
    client = MlflowClient(f"sqlite:///{folder.parent / 'mlflow.db'}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])  # nothing was opened
