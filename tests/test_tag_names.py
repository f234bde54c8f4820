"""Every MLflow tag is spelt once, in kdray/tag_names.py: a tag spelt anywhere else could drift from the one
the code looks runs up by, and runs would silently no longer be found."""

from __future__ import annotations

import ast
from pathlib import Path

import kdray
from kdray import tag_names

PACKAGE = Path(kdray.__file__).parent
NOT_TAGS = {"kdray.methods", "kdray.models", "mlflow.pytorch"}  # entry-point groups, a logger


def spelt_tags(source: str) -> list[tuple[int, str]]:
    """String constants of ``source`` that look like a kdray or MLflow tag name, with their lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text.startswith(("kdray.", "mlflow.")) and " " not in text and text not in NOT_TAGS:
                found.append((node.lineno, text))
    return found


def test_no_module_but_tag_names_spells_a_tag() -> None:
    spelt = {
        f"{path.relative_to(PACKAGE.parent)}:{line}: {text}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "tag_names.py"
        for line, text in spelt_tags(path.read_text())
    }
    assert not spelt, "use kdray.tag_names instead of:\n" + "\n".join(sorted(spelt))


def test_the_check_finds_a_spelt_tag() -> None:
    assert spelt_tags('tracker.set_tags(run, {"kdray.role": "teacher"})') == [(1, "kdray.role")]
    assert spelt_tags('log.info("kdray.role is %s", role)') == []


def test_every_tag_name_is_spelt_once() -> None:
    names = {name: value for name, value in vars(tag_names).items() if name.isupper()}
    assert len(set(names.values())) == len(names)
    assert all(value.startswith(("kdray.", "mlflow.")) for value in names.values())
