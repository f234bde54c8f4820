import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.data import DataError, Split, load_dataset, stratified_split
from kdray.data.imagefolder import load_image_folder
from kdray.resolve import load_config
from kdray.schema import ConfigError
from tests.conftest import SHARED_CIFAR, add_bytes, make_image_folder, tar_folder, write_png
from tests.faults import truncate


def test_digits_splits_are_disjoint_stratified_and_uint8(workdir: Path) -> None:
    data = load_dataset(load_config(None).data)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 8, 8)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.num_classes == 10
    # every class appears in val, in about its share
    assert torch.bincount(data.val.labels, minlength=10).min() >= 10
    # normalisation statistics are the train split's own
    assert data.mean[0] == pytest.approx(data.train.images.float().mean().item() / 255, rel=1e-5)


def test_digits_are_scikit_learns_own() -> None:
    """kdray reads scikit-learn's digits file without importing ``sklearn.datasets``: the splits are those of
    ``load_digits``' images and labels, to the byte, so a scikit-learn that moves or changes the file fails here."""
    from sklearn.datasets import load_digits

    from kdray.data.sources import DATASETS

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None])
    train, test = stratified_split(Split(images, torch.from_numpy(bunch.target.astype(np.int64))), 0.2, seed=0)
    raw = DATASETS["digits"].load(None, load_config(None).data)
    assert raw.classes == [str(name) for name in bunch.target_names]
    for ours, theirs in ((raw.train, train), (raw.test, test)):
        assert torch.equal(ours.images, theirs.images) and torch.equal(ours.labels, theirs.labels)


def test_stratified_split_is_seeded_and_keeps_proportions() -> None:
    labels = torch.tensor([0] * 80 + [1] * 20)
    split = Split(torch.zeros(100, 1, 8, 8, dtype=torch.uint8), labels)
    train, val = stratified_split(split, 0.1, seed=3)
    again_train, again_val = stratified_split(split, 0.1, seed=3)
    assert torch.bincount(val.labels).tolist() == [8, 2]
    assert (
        len(train) == 90 and torch.equal(val.labels, again_val.labels) and torch.equal(train.labels, again_train.labels)
    )


def test_limit_train_keeps_class_balance(workdir: Path) -> None:
    data = load_dataset(load_config(None, ["data.limit_train=200"]).data)
    assert 190 <= len(data.train) <= 210
    counts = torch.bincount(data.train.labels, minlength=10)
    assert counts.min() >= 15


def _write_cifar(root: Path, per_batch: int, classes: int = 10, bad_label: int | None = None) -> dict:
    """torchvision's cifar-10-batches-py layout: five train pickles, a test pickle, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, classes, per_batch)]
        if bad_label is not None and name == "data_batch_3":
            labels[0] = bad_label
        with open(folder / name, "wb") as handle:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, handle)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(classes)], "num_cases_per_batch": per_batch}, handle)
    return written


def test_cifar_pickle_layout(workdir: Path) -> None:
    written = _write_cifar(workdir / "cifar", per_batch=20)
    cfg = load_config(None, ["data.name=cifar10", f"data.root={workdir / 'cifar'}", "data.val_fraction=0.2"])
    assert cfg.data.augment.padding == 4 and cfg.data.augment.flip is True
    data = load_dataset(cfg.data)
    assert len(data.train) + len(data.val) == 100 and len(data.test) == 20
    # the first test image, rebuilt from the pickle's channel-planar row by hand
    row = written["test_batch"][0][0]
    expected = np.stack([row[:1024].reshape(32, 32), row[1024:2048].reshape(32, 32), row[2048:].reshape(32, 32)])
    assert np.array_equal(data.test.images[0].numpy(), expected)
    assert data.test.labels.tolist() == written["test_batch"][1]
    assert data.classes[:2] == ["c0", "c1"]


def test_cifar_label_out_of_range_names_the_files(workdir: Path) -> None:
    _write_cifar(workdir / "cifar", per_batch=5, bad_label=12)
    cfg = load_config(None, ["data.name=cifar10", f"data.root={workdir / 'cifar'}"])
    with pytest.raises(
        DataError, match=r"cifar-10-batches-py .*data_batch_3.*: label 12 is out of range for 10 classes"
    ):
        load_dataset(cfg.data)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_test_fraction_carves_a_test_split_for_a_folder_of_training_images_only(workdir: Path, loader: str) -> None:
    make_image_folder(workdir / "folder", {"train": 20}, size=8)
    overrides = ["data.name=imagefolder", f"data.root={workdir / 'folder'}", f"data.loader={loader}"]
    split = ["data.val_fraction=0.1", "data.test_fraction=0.2"]
    data = load_dataset(load_config(None, [*overrides, *split]).data)
    # 20 per class: 2 validation (10% of 20), 4 test (20% of 20), 14 train -- in every class
    for part, per_class in ((data.val, 2), (data.test, 4), (data.train, 14)):
        assert torch.bincount(part.labels, minlength=3).tolist() == [per_class] * 3
    digests = [{bytes(row) for row in part.digests()} for part in (data.train, data.val, data.test)]
    assert sum(map(len, digests)) == 60 and len(set.union(*digests)) == 60  # disjoint, all kept
    without = load_dataset(load_config(None, [*overrides, "data.val_fraction=0.1"]).data)
    assert {bytes(row) for row in without.val.digests()} == digests[1]  # the validation split is unchanged
    assert without.test is None and without.fingerprint() != data.fingerprint()


def test_test_fraction_is_refused_where_it_cannot_hold(workdir: Path) -> None:
    with pytest.raises(DataError, match="digits has its own test split; remove data.test_fraction"):
        load_dataset(load_config(None, ["data.test_fraction=0.1"]).data)
    with pytest.raises(ConfigError, match="data.test_fraction: 0.5 with val_fraction 0.5 leaves no training images"):
        load_config(None, ["data.val_fraction=0.5", "data.test_fraction=0.5"])


def test_image_folder_reads_pixels_labels_and_splits(workdir: Path) -> None:
    written = make_image_folder(workdir / "folder", {"train": 6, "val": 2, "test": 3})
    data = load_image_folder(workdir / "folder", workdir / "cache")
    assert data.classes == ["cat", "dog", "eel"]
    assert len(data.train) == 18 and len(data.val) == 6 and len(data.test) == 9
    pixels, label = written["test"][4]
    assert np.array_equal(data.test.images[4].permute(1, 2, 0).numpy(), pixels)  # PNG is lossless
    assert data.test.labels[4].item() == label


def test_image_folder_cache_is_used_and_invalidated(workdir: Path) -> None:
    make_image_folder(workdir / "folder", {"train": 4})
    first = load_image_folder(workdir / "folder", workdir / "cache")
    cached = list((workdir / "cache" / "imagefolder").glob("*/meta.json"))
    assert len(cached) == 1
    again = load_image_folder(workdir / "folder", workdir / "cache")
    assert torch.equal(first.train.images, again.train.images)
    assert len(list((workdir / "cache" / "imagefolder").glob("*/meta.json"))) == 1
    write_png(workdir / "folder" / "train" / "cat" / "new.png", np.zeros((8, 8, 3), np.uint8))
    changed = load_image_folder(workdir / "folder", workdir / "cache")
    assert len(changed.train) == len(first.train) + 1
    assert len(list((workdir / "cache" / "imagefolder").glob("*/meta.json"))) == 2


def test_image_folder_tar_gz_equals_folder(workdir: Path) -> None:
    make_image_folder(workdir / "folder", {"train": 3, "valid": 2})
    archive = tar_folder(workdir / "folder", workdir / "data.tar.gz")
    from_dir = load_image_folder(workdir / "folder", workdir / "cache")
    from_tar = load_image_folder(archive, workdir / "cache")
    assert torch.equal(from_dir.train.images, from_tar.train.images)
    assert torch.equal(from_dir.val.labels, from_tar.val.labels) and len(from_tar.val) == 6


def test_truncated_archive_is_one_line_naming_it(workdir: Path) -> None:
    make_image_folder(workdir / "folder", {"train": 6})
    archive = tar_folder(workdir / "folder", workdir / "data.tar.gz")
    truncate(archive, 0.6)  # a copy interrupted part-way
    with pytest.raises(DataError, match=r"data\.tar\.gz: the archive is damaged or ends early after \d+ files"):
        load_image_folder(archive, workdir / "cache")


def test_tiny_imagenet_layout(workdir: Path) -> None:
    root = workdir / "tiny"
    rng = np.random.default_rng(1)
    for wnid in ("n01", "n02"):
        for i in range(3):
            write_png(root / "train" / wnid / "images" / f"{wnid}_{i}.png", rng.integers(0, 255, (8, 8, 3), np.uint8))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    lines = []
    for i, wnid in enumerate(("n02", "n01", "n02")):
        write_png(root / "val" / "images" / f"val_{i}.png", rng.integers(0, 255, (8, 8, 3), np.uint8))
        lines.append(f"val_{i}.png\t{wnid}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_png(root / "test" / "images" / "test_0.png", rng.integers(0, 255, (8, 8, 3), np.uint8))
    data = load_image_folder(root, workdir / "cache")
    assert data.classes == ["n01", "n02"] and len(data.train) == 6
    assert data.val.labels.tolist() == [1, 0, 1]
    assert data.test is None  # unlabelled test images are skipped


def test_corrupt_image_is_named(workdir: Path) -> None:
    make_image_folder(workdir / "folder", {"train": 2})
    bad = workdir / "folder" / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        load_image_folder(workdir / "folder", workdir / "cache")


def test_corrupt_image_in_archive_is_named(workdir: Path) -> None:
    make_image_folder(workdir / "folder", {"train": 2})
    with tarfile.open(workdir / "extra.tar", "w") as tar:
        tar.add(workdir / "folder", arcname="data")
        add_bytes(tar, "data/train/cat/zz.jpg", b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"extra\.tar:data/train/cat/zz\.jpg: cannot decode image"):
        load_image_folder(workdir / "extra.tar", workdir / "cache")


def test_empty_class_folder_is_named(workdir: Path) -> None:
    make_image_folder(workdir / "folder", {"train": 2})
    (workdir / "folder" / "train" / "fox").mkdir()
    with pytest.raises(DataError, match=r"class folder train/fox holds no images"):
        load_image_folder(workdir / "folder", workdir / "cache")


def test_mixed_sizes_are_named(workdir: Path) -> None:
    make_image_folder(workdir / "folder", {"train": 2})
    write_png(workdir / "folder" / "train" / "eel" / "big.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DataError, match=r"big\.png: image is 16x16 but .* is 8x8"):
        load_image_folder(workdir / "folder", workdir / "cache")


def test_val_class_unknown_to_train_is_named(workdir: Path) -> None:
    make_image_folder(workdir / "folder", {"train": 2})
    write_png(workdir / "folder" / "val" / "yak" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"a\.png: class 'yak' is not one of the 3 train classes"):
        load_image_folder(workdir / "folder", workdir / "cache")


@pytest.mark.slow  # decodes 50,000 JPEGs
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"{SHARED_CIFAR} is not beside this checkout")
def test_real_cifar10_jpeg_archive(workdir: Path) -> None:
    """The shared CIFAR-10 training set (50,000 JPEGs) through the imagefolder source, then its cache."""
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={SHARED_CIFAR}", "data.val_fraction=0.1"])
    data = load_dataset(cfg.data)
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(data.train) == 45_000 and len(data.val) == 5_000 and data.test is None
    assert data.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(data.val.labels).tolist() == [500] * 10
    # CIFAR-10's well-known channel means (0.491, 0.482, 0.447), up to JPEG re-encoding
    assert data.mean == pytest.approx((0.491, 0.482, 0.447), abs=0.01)
    again = load_dataset(cfg.data)  # from the uint8 cache
    assert data.fingerprint() == again.fingerprint()
