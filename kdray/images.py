"""Reading image files, with no torch import: what Ray Data's decoding tasks run.

Both paths decode with ``decode_image``, so an image streamed from its file and the same image in the
in-memory cache are the same bytes. Ray Data's tasks import this module (numpy and PIL, a fraction of
a second) rather than the package, whose torch import would cost every new task process seconds.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad data on disk: the message names the file or folder and what is wrong with it."""


def decode_image(payload: bytes, source: str, image_size: int | None = None) -> np.ndarray:
    """Decode to HxW (grey) or HxWx3 (colour) uint8, resized to ``image_size`` if given, naming ``source``
    when it cannot be read. The one decoder of both the in-memory cache and the streaming path."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
            converted = image.convert("L" if grey else "RGB")
            return np.asarray(converted if image_size is None else resize_square(converted, image_size))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{source}: cannot decode image ({error})") from None


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (antialiased bicubic), then the centre ``size`` x ``size`` square: the usual
    evaluation transform of image classifiers, applied once at decode time."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def image_digest(image: np.ndarray) -> bytes:
    """The 16-byte blake2b digest of one [C, H, W] uint8 image."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int | None, channels: int, padding: int = 0
) -> dict[str, np.ndarray]:
    """A Ray Data task: decode each path to [C, H, W] uint8 exactly as the in-memory cache does; with
    ``row``/``column``/``flip`` columns, crop and mirror it as ``kdray.data.augment.apply_augment`` does."""
    images = []
    for at, path in enumerate(batch["path"]):
        picture = decode_image(Path(path).read_bytes(), path, image_size)
        image = picture[None] if picture.ndim == 2 else picture.transpose(2, 0, 1)
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


def scan_batch(batch: dict[str, np.ndarray], image_size: int | None) -> dict[str, np.ndarray]:
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
            picture = decode_image(Path(path).read_bytes(), path, image_size)
        except OSError as error:  # unreadable file (decode errors arrive as DataError)
            out["error"][row] = f"{path}: cannot read ({error})"
            continue
        except DataError as error:
            out["error"][row] = str(error)
            continue
        image = picture[None] if picture.ndim == 2 else picture.transpose(2, 0, 1)
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
