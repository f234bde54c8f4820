"""The environment the suite runs in is the one requirements.lock pins (README: Moving the pinned versions).

A newcomer who installs without the lock gets whatever was released that day; this test tells them so in
one line and names the command, instead of a version mismatch deep in some other test.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.locked import INSTALL_COMMAND, ROOT, canonical, lock_path, read_lock


def differences_from_lock(pins: dict[str, str]) -> list[str]:
    """'name installed != locked' for each pinned package this environment holds at another version or lacks."""
    installed = {canonical(d.metadata["Name"]): d.version for d in distributions()}
    return [
        f"{name} {installed.get(name, 'missing')} != {pinned}"
        for name, pinned in sorted(pins.items())
        if installed.get(name) != pinned
    ]


def test_the_environment_is_the_locked_one() -> None:
    pins = read_lock()
    assert {"torch", "torchvision", "ray", "optuna", "mlflow", "pytest"} <= pins.keys()
    differences = differences_from_lock(pins)
    if differences:
        pytest.fail(
            f"this environment was not installed from {lock_path().name} ({len(differences)} packages differ: "
            f"{', '.join(differences[:3])}{', ...' if len(differences) > 3 else ''}); "
            f"install with: {INSTALL_COMMAND}",
            pytrace=False,
        )


def test_a_drifted_environment_is_named(tmp_path: Path) -> None:
    """The check above is real: a lock that pins another optuna and a package nobody installed is caught."""
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"optuna==0.0.1\n    # via kdray\nnot-a-real-package==1.0\ntorch=={version('torch')}\n")
    assert differences_from_lock(read_lock(lock)) == [
        "not-a-real-package missing != 1.0",
        f"optuna {version('optuna')} != 0.0.1",
    ]


def test_pyproject_ranges_admit_the_lock() -> None:
    """Installing kdray as a library (no lock) may resolve the locked versions: the ranges are honest."""
    pins = read_lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in map(Requirement, declared):
        if canonical(requirement.name) == "kdray":
            continue
        assert requirement.specifier.contains(pins[canonical(requirement.name)]), requirement
