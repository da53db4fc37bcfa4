"""Progress bars share the terminal with Kedro's log lines (clip_dfkd.progress)."""

from __future__ import annotations

import gc
import io
import logging
import re

import pytest
from kedro.logging import RichHandler
from rich.console import Console

from clip_dfkd import progress
from clip_dfkd.progress import ProgressBar, track

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(autouse=True)
def no_open_bar() -> None:
    """Each test opens the display itself: a bar left open elsewhere would keep its console."""
    gc.collect()
    assert progress._display is None


def _terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=120), screen


def _screen_lines(screen: io.StringIO) -> list[str]:
    """What was written, cut where the terminal starts a line again (newline or carriage return)."""
    return re.split(r"[\r\n]", ANSI.sub("", screen.getvalue()))


def test_a_line_logged_while_a_bar_is_open_gets_a_line_of_its_own() -> None:
    console, screen = _terminal()
    logger = logging.getLogger("clip_dfkd.test_terminal")
    logger.propagate = False
    logger.addHandler(handler := RichHandler(console=console))
    try:
        with ProgressBar(4, "Rendering missing images", unit="img", console=console) as bar:
            bar.update(1)
            logger.warning("Loading teacher clip-dfkd-tiny")
            bar.update(3)
    finally:
        logger.removeHandler(handler)
    lines = _screen_lines(screen)
    logged = [line for line in lines if "Loading teacher" in line]
    assert logged and all("Rendering" not in line for line in logged), logged
    # the bar is drawn again below the line, and ends full
    assert any(line.startswith("Rendering missing images") and "4/4" in line for line in lines), lines


def test_bars_open_at_once_are_rows_of_one_display_that_stops_with_the_last() -> None:
    console, screen = _terminal()
    outer = ProgressBar(2, "Evaluating", console=console)
    inner = list(track(range(3), 3, "Labelling"))  # opened and closed while the outer bar is open
    assert inner == [0, 1, 2]
    assert progress._display is not None  # the outer bar still draws
    outer.update(2)
    outer.close()
    assert progress._display is None
    assert any("Labelling" in line and "3/3" in line for line in _screen_lines(screen))


def test_a_bar_dropped_unclosed_does_not_keep_the_display() -> None:
    console, _ = _terminal()
    bar = ProgressBar(5, "Rendering missing images", console=console)
    bar.update(2)
    del bar  # as when its owner fails before closing it
    assert progress._display is None
