"""The pins of requirements.lock (or of the lock KDRAY_LOCK_FILE names: scripts/try_latest.sh's scratch lock)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL_COMMAND = 'pip install -c requirements.lock -e ".[test]"'


def lock_path() -> Path:
    return Path(os.environ.get("KDRAY_LOCK_FILE", ROOT / "requirements.lock"))


def canonical(name: str) -> str:
    """PEP 503's normal form, so `PyYAML`, `pyyaml` and `py_yaml` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path | None = None) -> dict[str, str]:
    """{canonical name: version} of every `name==version` line of a pip-compile output."""
    pins = {}
    for line in (path or lock_path()).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins
