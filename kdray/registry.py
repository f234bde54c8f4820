"""One small name -> object registry, shared by datasets, models and methods.

Registration happens where each object is defined (a decorator); every package's ``__init__``
imports all of its modules, so the full list never depends on which module a caller happened to import
first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict of named entries that refuses duplicates and explains unknown names."""

    def __init__(self, kind: str, order: Callable[[T], Any] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._order = order  # how entries are listed (stable: ties as registered); None: as registered

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the decorated object under ``name``."""

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (an entry registered for a while: a method a test defines for itself)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[self.require(name)]

    def require(self, name: str) -> str:
        """Return ``name`` if registered, else raise ValueError listing the choices (a pydantic validator)."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return name

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return [name for name, _ in self.items()]

    def items(self) -> list[tuple[str, T]]:
        entries = list(self._entries.items())
        if self._order is None:
            return entries
        order = self._order
        return sorted(entries, key=lambda item: order(item[1]))
