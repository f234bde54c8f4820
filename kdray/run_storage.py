"""Files under ``scaling.storage_path``: a local folder, or a bucket (``s3://``, ``gs://``) read and written through
pyarrow's file systems, the ones Ray Train and Tune use for the same path. So a bucket's endpoint, credentials and
region come from the usual variables of its cloud (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …) for kdray's own
files exactly as for Ray's.

What kdray keeps there beside Ray's state: a search's ``kdray-search.json`` and, for a stage trained in the driver's
own process, its training state. An object is written by one request, so a reader sees the old object or the new
one, never half of one.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from pyarrow import fs


def is_uri(path: str) -> bool:
    """Whether ``path`` names a bucket (``scheme://…``) rather than a local folder."""
    return "://" in path


def join(root: str, *parts: str) -> str:
    """``root`` and ``parts`` joined as the storage writes them: '/' for a URI, the OS's separator locally."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def _resolve(path: str) -> tuple[fs.FileSystem, str]:
    if is_uri(path):
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def exists(path: str) -> bool:
    """Whether a file, or a folder (a prefix with objects under it, in a bucket), is at ``path``."""
    system, where = _resolve(path)
    return system.get_file_info(where).type != fs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    system, where = _resolve(path)
    with system.open_input_stream(where) as stream:
        return stream.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` in one piece: a local file through a temporary file renamed over it, an object
    by one upload."""
    system, where = _resolve(path)
    if not is_uri(path):
        target = Path(where)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(data)
        partial.replace(target)
        return
    with system.open_output_stream(where) as stream:
        stream.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def names(folder: str, pattern: str = "*") -> list[str]:
    """The names of the files directly in ``folder`` that match ``pattern`` (none if it does not exist)."""
    system, where = _resolve(folder)
    found = system.get_file_info(fs.FileSelector(where, allow_not_found=True))
    return sorted(info.base_name for info in found if fnmatch.fnmatch(info.base_name, pattern))


def remove_folder(folder: str) -> None:
    """Delete ``folder`` and everything under it, if it is there."""
    system, where = _resolve(folder)
    if system.get_file_info(where).type != fs.FileType.NotFound:
        system.delete_dir(where)
