"""The streaming path: image files decoded per batch on Ray Data, with the in-memory path's semantics."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from kdray.data import DataError, eval_batches, load_dataset, on_device, train_batches
from kdray.resolve import load_config
from kdray.run import run_experiment
from kdray.schema import ConfigError
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


@pytest.mark.integration
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
def test_two_streaming_workers_hold_batches_not_the_dataset_and_train_what_the_memory_path_trains(
    local_ray: None, workdir: Path
) -> None:
    """A folder ten times the memory budget streams (data.loader=auto) to two gloo workers (half a CPU each,
    leaving a CPU to Ray Data's decoding): the chief worker peaks well below the chief of the memory path on the
    same folder, which holds its 287 MiB of decoded images (the student pools every image to 8x8 first, so the
    data, not the model, decides the memory), and both paths train the same losses and accuracies to the last
    digit, under one store key (a stored result serves either path). A grey image among them is made RGB alike."""
    rng = np.random.default_rng(0)
    for index in range(2000):  # smooth 224x224 images: small, quick JPEGs that decode to 287 MiB in all
        path = workdir / "big" / "train" / f"c{index % 4}" / f"{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3) if index else (8, 8), dtype=np.uint8))
        coarse.resize((224, 224), Image.BILINEAR).save(path, quality=90)
    decoded_mib = 2000 * 3 * 224 * 224 / 2**20
    results = {}
    for loader in ("auto", "memory"):
        overrides = [
            *TWO_CPU_WORKERS, "scaling.resources_per_worker={CPU: 0.5}", "data.memory_budget=0.028",
            f"data.loader={loader}", "train.epochs=2", "train.batch_size=20", "train.eval_batch_size=20",
            "method.name=none", "student.name=user_models:pooled_net", f"store.path=store-{loader}",
        ]  # fmt: skip
        results[loader] = run_experiment(load_config(None, folder_config(workdir / "big", *overrides))).student
    streamed, memory = results["auto"], results["memory"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    metrics = {loader: client.get_run(result.run_id).data for loader, result in results.items()}
    parents = [client.get_run(data.tags["mlflow.parentRunId"]) for data in metrics.values()]
    assert [parent.data.params["data.streamed"] for parent in parents] == ["true", "false"]  # auto streamed
    assert decoded_mib > 10 * 0.028 * 1024  # the folder is ten times the budget
    private = {loader: data.metrics["private_mb"] for loader, data in metrics.items()}
    assert private["auto"] < private["memory"] - decoded_mib / 2, private
    assert streamed.plan.key == memory.plan.key and metrics["auto"].params["world_size"] == "2"
    for metric in ("loss/ce", "val/acc", "val/loss"):
        history = [[m.value for m in client.get_metric_history(r.run_id, metric)] for r in (memory, streamed)]
        assert len(history[0]) == 2 and history[0] == history[1], metric


def test_a_folder_some_node_cannot_read_is_refused_before_the_scan(local_ray: None, folder: Path) -> None:
    from kdray.data.scan import check_reachable

    check_reachable(folder, str(next(folder.rglob("*.png"))))  # every node of the cluster (here: one) reads it
    with pytest.raises(DataError, match=r"data: node [\d.]+ cannot read .*missing.png .*every node mounts"):
        check_reachable(folder, str(folder / "missing.png"))


def test_workers_that_would_leave_no_cpu_to_decode_are_refused_before_any_run(local_ray: None, folder: Path) -> None:
    cfg = load_config(
        None, folder_config(folder, *TWO_CPU_WORKERS, "train.batch_size=8", "data.loader=stream", "method.name=none")
    )
    with pytest.raises(
        ConfigError, match=r"^scaling.resources_per_worker: 2 Ray Train workers hold 2 of the .* 2 CPUs"
    ):
        run_experiment(cfg)
    client = MlflowClient(f"sqlite:///{folder.parent / 'mlflow.db'}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])  # nothing was opened


def test_resized_crop_boxes_follow_torchvision_s_rule() -> None:
    """Every box lies inside the image; boxes that are not the fallback have an area share in ``scale`` and an
    aspect ratio in ``ratio`` (up to rounding to whole pixels); the same seed draws the same box."""
    from kdray.images import resized_crop_box

    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for seed in range(300):
        left, top, width, height = resized_crop_box(100, 80, scale, ratio, np.random.default_rng(seed))
        assert left >= 0 and left + width <= 100 and top >= 0 and top + height <= 80
        assert (left, top, width, height) == resized_crop_box(100, 80, scale, ratio, np.random.default_rng(seed))
        if (width, height) != (100, 80):
            assert 0.08 * 8000 * 0.9 <= width * height <= 8000
            assert 3 / 4 * 0.9 <= width / height <= 4 / 3 * 1.1
    # an image far narrower than any allowed ratio: the centre crop at the closest ratio
    assert resized_crop_box(10, 200, (0.9, 1.0), ratio, np.random.default_rng(0)) == (0, 93, 10, 13)


@pytest.fixture
def photos(workdir: Path) -> Path:
    """Non-square images of mixed sizes, as photos come: 3 classes, 8 train and 2 val images each."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 8), ("val", 2)):
        for label in ("cat", "dog", "eel"):
            for index in range(count):
                width, height = (int(side) for side in rng.integers(24, 48, 2))
                write_png(
                    workdir / "photos" / split / label / f"{index}.png",
                    rng.integers(0, 256, (height, width, 3), np.uint8),
                )
    return workdir / "photos"


@pytest.mark.integration
def test_random_resized_crops_repeat_from_the_seed_and_within_the_cycle(local_ray: None, photos: Path) -> None:
    from kdray.build import make_guides
    from kdray.distributed import local_context
    from kdray.engine import resized_crops
    from kdray.images import open_image, resized_crop_box

    overrides = ["data.augment.kind=random_resized_crop", "data.image_size=16", "data.augment.crop_cycle=2"]
    cfg = load_config(None, folder_config(photos, *overrides))
    data = load_dataset(cfg.data)
    assert data.streamed and data.train.image_shape == (3, 16, 16)  # auto streams: the crops need the originals
    source = on_device(data.train, data.mean, data.std, torch.device("cpu"), cfg.data)

    def epoch(number: int, seed: int = 0) -> dict[tuple[int, int], torch.Tensor]:
        crops = resized_crops(cfg.data.augment, seed, number)
        batches = train_batches(source, 4, number, seed, 0, True, resized=crops)
        return {
            (int(sample), int(view)): image
            for batch in batches
            for sample, view, image in zip(batch.views.samples, batch.views.views, batch.images, strict=True)
        }

    first, again, second, third = epoch(0), epoch(0), epoch(1), epoch(2)
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
    assert {view // 2 for _, view in first} == {0} and {view // 2 for _, view in second} == {1}
    assert {view // 2 for _, view in third} == {0}  # epoch 2 is epoch 0 of the cycle: the same crops
    shared = first.keys() & third.keys()  # same image, same flip
    assert shared and all(torch.equal(first[key], third[key]) for key in shared)
    other_seed = epoch(0, seed=1)
    assert any(not torch.equal(first[key], other_seed[key]) for key in first.keys() & other_seed.keys())
    # one crop, computed independently: PIL's crop then resize, mirrored when the view says so
    (sample, view), image = next(iter(first.items()))
    path = data.train.paths[sample].as_py()
    original = open_image(Path(path).read_bytes())
    left, top, width, height = resized_crop_box(
        *original.size, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng([0, 0, sample])
    )
    expected = np.asarray(original.crop((left, top, left + width, top + height)).resize((16, 16), Image.BILINEAR))
    expected = expected[:, ::-1] if view % 2 else expected
    plain = on_device(data.train, (0.0,) * 3, (1 / 255,) * 3, torch.device("cpu"), cfg.data)  # pixel values out
    crops = resized_crops(cfg.data.augment, 0, 0)
    for batch in train_batches(plain, 4, 0, 0, 0, True, resized=crops):
        for at, (row, row_view) in enumerate(zip(batch.views.samples, batch.views.views, strict=True)):
            if (row, row_view) == (sample, view):
                assert np.array_equal(batch.images[at].permute(1, 2, 0).round().byte().numpy(), expected)
    # the guide-output cache: one table of 2 crops x 2 flips per image with the cycle, bypassed without it
    ctx = local_context(False)
    model = torch.nn.Linear(1, 1)
    assert make_guides(cfg, data, ctx, cfg.train, [model])[0].lookup is not None
    no_cycle = load_config(None, folder_config(photos, *overrides[:2]))
    assert make_guides(no_cycle, data, ctx, no_cycle.train, [model])[0].lookup is None


@pytest.mark.slow
def test_trials_with_random_resized_crops_share_the_teacher_s_cached_outputs(local_ray: None, photos: Path) -> None:
    """Two KD students that differ only in temperature (two trials of a search): the crops come from the seed,
    so the second student's every teacher output is a cache hit; without a crop cycle the cache is bypassed."""
    base = [
        "data.augment.kind=random_resized_crop", "data.image_size=16", "data.augment.crop_cycle=2",
        "teacher.name=plane2", "teacher.epochs=1", "student.name=plane2", "train.epochs=2", "train.batch_size=8",
    ]  # fmt: skip
    client = MlflowClient(f"sqlite:///{photos.parent / 'mlflow.db'}")
    rates = []
    for temperature in (2, 6):
        student = run_experiment(load_config(None, folder_config(photos, *base, f"method.temperature={temperature}")))
        history = client.get_metric_history(student.student.run_id, "cache/hit_rate")
        rates.append([metric.value for metric in sorted(history, key=lambda metric: metric.step)])
    assert rates[0][0] < 1.0 and rates[1] == [1.0, 1.0]


def test_augmentation_settings_that_cannot_apply_are_refused(workdir: Path, photos: Path) -> None:
    rrc = "data.augment.kind=random_resized_crop"
    for overrides, message in (
        ([rrc, "data.image_size=16"], r"^data: augment.kind=random_resized_crop crops the original images"),
        (folder_config(photos, rrc, "data.loader=memory", "data.image_size=16"), r"only a streamed image folder"),
        (folder_config(photos, rrc), r"random_resized_crop needs data.image_size"),
        (folder_config(photos, rrc, "data.image_size=16", "data.augment.padding=4"), r"does not pad"),
        (folder_config(photos, rrc, "data.image_size=16", "data.augment.scale=[0.5, 0.2]"), r"scale: \(0.5, 0.2\)"),
        (["data.augment.eval_crop=0.875", "data.image_size=16"], r"eval_crop crops image folders"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_a_bucket_uri_is_refused_with_the_way_to_read_it(workdir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.root: 's3://bucket/imagenet': .*mount the bucket .*mountpoint-s3"):
        load_config(None, ["data.name=imagefolder", "data.root=s3://bucket/imagenet"])
