"""One direction of imports (docs/architecture.md), checked by import-linter's contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(checkout: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the ``kdray`` package of ``checkout`` (it puts the working folder first on the path)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=checkout, capture_output=True, text=True, timeout=120, check=False
    )


def test_every_layer_imports_only_downward_and_no_files_import_each_other_in_a_circle() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_import_reaching_up_from_the_schema_breaks_the_contracts(tmp_path: Path) -> None:
    """The contracts can fail: the schema importing the resolution step above it is a circle and an upward arrow."""
    shutil.copytree(ROOT / "kdray", tmp_path / "kdray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    fields = tmp_path / "kdray" / "schema" / "fields.py"
    fields.write_text(fields.read_text() + "\nfrom kdray.resolve import load_config  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "Layers: each imports only downward BROKEN" in result.stdout
    assert "No circle of imports among the files of any package BROKEN" in result.stdout
    assert "kdray.schema.fields -> kdray.resolve" in result.stdout
