"""Writers that leave either the whole output or nothing under its final name.

Each output is built beside its destination under a fresh hidden name and renamed into
place, so readers never see a half-written file or folder, also after SIGKILL. A write that
finds the disk (or the user's quota) full stops with :class:`OutOfSpaceError`, one line
naming the output and the space left, instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from clip_dfkd.errors import UserError

_OUT_OF_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class OutOfSpaceError(UserError):
    """An output did not fit: its disk, or the user's quota on it, is full."""


def out_of_space_error(destination: str | Path, exc: BaseException) -> OutOfSpaceError | None:
    """The one-line error for a full disk when ``exc``, or an error it was raised from or
    while handling (Kedro wraps a dataset's error in a ``DatasetError``), means that writing
    the local file or folder ``destination`` ran out of space; None for any other error."""
    current: BaseException | None = exc
    while current is not None and not (isinstance(current, OSError) and current.errno in _OUT_OF_SPACE):
        current = current.__cause__ or current.__context__
    if current is None:
        return None
    folder = nearest_folder(Path(destination))
    mount = folder.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    return OutOfSpaceError(
        f"{destination}: {_OUT_OF_SPACE[current.errno]} ({_size(shutil.disk_usage(folder).free)} free on {mount}); "
        "free some space there or point the output elsewhere"
    )


@contextmanager
def reporting_full_disk(destination: str | Path) -> Iterator[None]:
    """Turns running out of space while writing the local ``destination`` into :class:`OutOfSpaceError`."""
    try:
        yield
    except Exception as exc:
        if (error := out_of_space_error(destination, exc)) is None:
            raise
        raise error from exc


def nearest_folder(path: Path) -> Path:
    """``path`` if it is a folder, else its closest ancestor that is one."""
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _size(size: float) -> str:
    """A byte count in decimal units, e.g. ``12.0 MB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _staging_path(destination: Path) -> Path:
    # A fresh name per build: concurrent builds and leftovers of killed ones never collide.
    return destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.tmp")


@contextmanager
def atomic_file(destination: Path) -> Iterator[Path]:
    """Yield a sibling path to write; on success it replaces ``destination`` in one rename."""
    staging = _staging_path(destination)
    try:
        with reporting_full_disk(destination):
            destination.parent.mkdir(parents=True, exist_ok=True)
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
    staging = _staging_path(destination)
    try:
        with reporting_full_disk(destination):
            destination.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
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


@contextmanager
def staged_on(filesystem: AbstractFileSystem, destination: str, staging: str) -> Iterator[None]:
    """For any fsspec filesystem: write ``staging`` inside the block; on success it is renamed
    to ``destination``, on any failure removed. A full local disk raises
    :class:`OutOfSpaceError` (a remote store's paths are on no local disk)."""
    local = isinstance(filesystem, LocalFileSystem)
    try:
        with reporting_full_disk(destination) if local else nullcontext():
            yield
            filesystem.mv(staging, destination)
    except BaseException:
        with suppress(FileNotFoundError):
            filesystem.rm_file(staging)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
