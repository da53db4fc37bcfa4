"""Writers that leave either the whole output or nothing under its final name.

Each output is built beside its destination under a fresh hidden name and renamed into
place, so readers never see a half-written file or folder, also after SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _staging_path(destination: Path) -> Path:
    # A fresh name per build: concurrent builds and leftovers of killed ones never collide.
    return destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.tmp")


@contextmanager
def atomic_file(destination: Path) -> Iterator[Path]:
    """Yield a sibling path to write; on success it replaces ``destination`` in one rename."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_path(destination)
    try:
        yield staging
        os.replace(staging, destination)
    finally:
        staging.unlink(missing_ok=True)


@contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; on success it takes the place of ``destination``.

    A folder cannot be renamed over a non-empty one, so an existing ``destination`` is first
    renamed aside and deleted after the swap; it is absent only between two renames.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_path(destination)
    staging.mkdir()
    try:
        yield staging
        previous = None
        if destination.exists() or destination.is_symlink():
            previous = _staging_path(destination)
            os.replace(destination, previous)
        os.replace(staging, destination)
        if previous is not None:
            _remove(previous)
    finally:
        _remove(staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
