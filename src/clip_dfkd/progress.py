"""Progress bars drawn by rich, on the console that Kedro's log handler prints to.

A tqdm bar ends its line with a carriage return, so a line logged while it is open was printed
after the bar's text, on the same line. A rich bar is a live display of that console: a logged
line prints above it and the bar is redrawn below. Bars open at the same time are rows of one
display (rich allows one live display per console). ``TQDM_DISABLE=1`` hides them, as it
hides the libraries' own tqdm bars.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

_display: Progress | None = None
_open: set[TaskID] = set()


class ProgressBar:
    """One row of the shared display, with the part of tqdm's interface the project uses:
    ``update``, ``set_postfix`` (shown after the bar), ``close``, and use as a context manager.

    Args:
        total: Steps to completion.
        desc: What is counted, shown first.
        unit: The unit of a step, shown after the count.
        console: Where the display draws when this bar opens it; rich's global console
            (Kedro's log handler's) by default.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", console: Console | None = None):
        global _display
        if _display is None:
            _display = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                TextColumn("<"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[postfix]}"),
                console=console,
                disable=os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true"),
            )
            _display.start()
        self._display = _display
        self._task = _display.add_task(desc, total=total, unit=unit, postfix="")
        _open.add(self._task)
        self.total, self.n = total, 0
        # A bar dropped without close (an error before its owner closed it) stops counting as
        # open, so the display does not outlive every bar.
        self._release = weakref.finalize(self, _close_row, _display, self._task)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._display.advance(self._task, n)

    def set_postfix(self, **values: Any) -> None:
        self._display.update(self._task, postfix=", ".join(f"{key}={value}" for key, value in values.items()))

    def close(self) -> None:
        """Stop counting; the finished row stays on screen. The display stops with its last bar."""
        if self._release.alive:
            self._display.refresh()
            self._release()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _close_row(display: Progress, task: TaskID) -> None:
    global _display
    _open.discard(task)
    if not _open and _display is display:
        display.stop()
        _display = None


def track(iterable: Iterable[T], total: int, desc: str, unit: str = "it") -> Iterator[T]:
    """The items of ``iterable``, counted on a bar of ``total`` steps that closes at the end."""
    with ProgressBar(total, desc, unit) as bar:
        for item in iterable:
            yield item
            bar.update(1)
