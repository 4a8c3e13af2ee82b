"""A tiny progress interface the core reports to, without knowing who listens.

The core calls ``task = progress.task(description, total)`` then
``task.advance(n)`` and ``task.close()``. The command line layer passes a rich
progress bar when stderr is a terminal; library users pass nothing.
"""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, amount: int = 1) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Task: ...


class _NullTask:
    def advance(self, amount: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class NullProgress:
    """Reports nothing: the default for library calls, pipes and CI."""

    def task(self, description: str, total: int | None) -> Task:
        return _NullTask()


def chunks(n_items: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_items)`` in steps of ``size``."""
    return [(start, min(start + size, n_items)) for start in range(0, n_items, size)]
