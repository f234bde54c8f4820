"""Reading image files, with no torch import: what Ray Data's decoding tasks run.

Both paths decode with ``decode_image``, so an image streamed from its file and the same image in the
in-memory cache are the same bytes. Ray Data's tasks import this module (numpy and PIL, a fraction of
a second) rather than the package, whose torch import would cost every new task process seconds.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad data on disk: the message names the file or folder and what is wrong with it."""


@contextmanager
def decoding(source: str) -> Iterator[None]:
    """Turn PIL's errors on a file into one ``DataError`` line naming ``source``."""
    try:
        yield
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{source}: cannot decode image ({error})") from None


def decode_image(payload: bytes, source: str, image_size: int | None = None, crop: float = 1.0) -> np.ndarray:
    """Decode to HxW (grey) or HxWx3 (colour) uint8, resized to ``image_size`` if given (``resize_square``),
    naming ``source`` when it cannot be read. The one decoder of both the in-memory cache and the stream."""
    with decoding(source):
        return np.asarray(resize_square(open_image(payload), image_size, crop) if image_size else open_image(payload))


def chw(picture: np.ndarray) -> np.ndarray:
    """A decoded HxW or HxWx3 picture as [C, H, W]."""
    return picture[None] if picture.ndim == 2 else picture.transpose(2, 0, 1)


def open_image(payload: bytes) -> Image.Image:
    """The decoded image in grey (``L``) or ``RGB``, whatever mode the file stores."""
    with Image.open(io.BytesIO(payload)) as image:
        grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
        return image.convert("L" if grey else "RGB")


def resize_square(image: Image.Image, size: int, crop: float = 1.0) -> Image.Image:
    """Shorter side to ``size / crop`` (antialiased bicubic), then the centre ``size`` x ``size`` square: the
    usual evaluation transform of image classifiers (ImageNet's: crop 0.875, 256 then 224), applied at
    decode time."""
    width, height = image.size
    scale = size / crop / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def image_digest(image: np.ndarray) -> bytes:
    """The 16-byte blake2b digest of one [C, H, W] uint8 image."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: int,
    channels: int,
    padding: int = 0,
    crop: float = 1.0,
    resized: dict | None = None,
) -> dict[str, np.ndarray]:
    """A Ray Data task: decode each path to [C, H, W] uint8 exactly as the in-memory cache does; with
    ``row``/``column``/``flip`` columns, crop and mirror it as ``kdray.data.augment.apply_augment`` does.

    With ``resized`` (``seed``, ``view``, ``scale``, ``ratio``) each image is instead a ``resized_crop`` of
    the original, drawn from (seed, view, its ``position`` column): one crop per image and epoch (or
    epoch of the crop cycle), the same in every run with that seed.
    """
    images = []
    for at, path in enumerate(batch["path"]):
        payload = Path(path).read_bytes()
        if resized is None:
            picture = decode_image(payload, path, image_size, crop)
        else:
            seed = [resized["seed"], resized["view"], int(batch["position"][at])]
            picture = resized_crop(payload, path, image_size, resized["scale"], resized["ratio"], seed)
        image = chw(picture)
        if image.shape[0] != channels:
            image = np.repeat(image, channels, axis=0)
        if "row" in batch:
            image = crop_flip(image, int(batch["row"][at]), int(batch["column"][at]), bool(batch["flip"][at]), padding)
        images.append(image)
    return {"image": np.stack(images)}


def crop_flip(image: np.ndarray, row: int, column: int, flip: bool, padding: int) -> np.ndarray:
    """The [C, H, W] window at (``row``, ``column``) of ``image`` zero-padded by ``padding``, mirrored if ``flip``."""
    _, height, width = image.shape
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding))) if padding else image
    window = padded[:, row : row + height, column : column + width]
    return window[:, :, ::-1] if flip else window


def scan_batch(batch: dict[str, np.ndarray], image_size: int | None, crop: float = 1.0) -> dict[str, np.ndarray]:
    """What a Ray Data task computes for each file of its batch (zeros and an error for an unreadable one)."""
    count = len(batch["path"])
    out = {
        "height": np.zeros(count, np.int32), "width": np.zeros(count, np.int32), "colour": np.zeros(count, bool),
        "sums": np.zeros((count, 3), np.int64), "squares": np.zeros((count, 3), np.int64),
        "digest": np.zeros((count, 16), np.uint8), "digest3": np.zeros((count, 16), np.uint8),
        "error": np.full(count, "", dtype=object),
    }  # fmt: skip
    for row, path in enumerate(batch["path"]):
        try:
            picture = decode_image(Path(path).read_bytes(), path, image_size, crop)
        except OSError as error:  # unreadable file (decode errors arrive as DataError)
            out["error"][row] = f"{path}: cannot read ({error})"
            continue
        except DataError as error:
            out["error"][row] = str(error)
            continue
        image = chw(picture)
        colour = np.repeat(image, 3, axis=0) if picture.ndim == 2 else image
        wide = colour.reshape(3, -1).astype(np.int64)
        out["height"][row], out["width"][row] = picture.shape[:2]
        out["colour"][row] = picture.ndim == 3
        out["sums"][row], out["squares"][row] = wide.sum(axis=1), np.square(wide).sum(axis=1)
        out["digest"][row] = np.frombuffer(image_digest(image), np.uint8)
        out["digest3"][row] = np.frombuffer(image_digest(colour), np.uint8)
    return out


def read_error(path: str) -> str | None:
    """Why ``path`` cannot be read on this machine, or None: the probe each node runs before a folder streams."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        return str(error)
    return None


def resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random crop as torchvision's ``RandomResizedCrop.get_params`` draws it
    (Szegedy et al. 2015's Inception augmentation): an area share in ``scale`` and a log-uniform aspect ratio
    in ``ratio``, ten tries, then the centre crop of the closest allowed ratio."""
    area = width * height
    low, high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(low, high))
        crop_width, crop_height = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, crop_width, crop_height
    if width / height < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def resized_crop(
    payload: bytes, source: str, size: int, scale: tuple[float, float], ratio: tuple[float, float], seed: list[int]
) -> np.ndarray:
    """A ``resized_crop_box`` of the original image, drawn from ``seed`` (the same crop for the same seed, in
    every trial of a search), resized to ``size`` x ``size`` (bilinear, antialiased): HxW or HxWx3 uint8."""
    with decoding(source):
        image = open_image(payload)
        left, top, width, height = resized_crop_box(*image.size, scale, ratio, np.random.default_rng(seed))
        crop = image.crop((left, top, left + width, top + height))  # then resize, as torchvision's resized_crop
        return np.asarray(crop.resize((size, size), Image.BILINEAR))
