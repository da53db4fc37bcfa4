"""The teacher's outputs on benchmark images, kept between runs.

A benchmark's teacher side (a forward pass of a large CLIP over every image) does not depend
on the student, so a run that evaluates another student reads it back. The key covers
everything the outputs depend on; anything that changes them makes a new key, and the old
entry is simply never read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pandas as pd

from clip_dfkd.atomic import atomic_file
from clip_dfkd.params import TeacherParams
from clip_dfkd.runtime import Runtime

logger = logging.getLogger(__name__)

# Bump when the cached columns or their meaning change.
CACHE_FORMAT = 1


def teacher_output_key(teacher: TeacherParams, runtime: Runtime, classes: list[str], paths: list[str]) -> str:
    """A hex digest of the teacher (model, weights, templates), the precision it ran in, the
    class list in order, and every image file's path, size and modification time.

    A checkpoint file counts by its size and modification time, so a retrained teacher saved
    to the same path makes a new key; so does an image replaced in place.
    """
    weights = Path(teacher.pretrained).expanduser()
    described = {
        "format": CACHE_FORMAT,
        "model_name": teacher.model_name,
        "pretrained": teacher.pretrained,
        "weights_file": _file_stamp(weights) if weights.is_file() else None,
        "templates": teacher.templates,
        "device_type": runtime.device.type,
        "dtype": str(runtime.dtype),
        "classes": classes,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for path in paths:
        digest.update(json.dumps([path, _file_stamp(Path(path))]).encode())
    return digest.hexdigest()


def _file_stamp(path: Path) -> list[int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # an unreadable file is recorded as such; its error is cached too
    return [stat.st_size, stat.st_mtime_ns]


class TeacherOutputCache:
    """One parquet file per key in ``folder``, each written whole or not at all."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get(self, key: str) -> pd.DataFrame | None:
        path = self.folder / f"{key}.parquet"
        return pd.read_parquet(path) if path.is_file() else None

    def put(self, key: str, outputs: pd.DataFrame) -> None:
        with atomic_file(self.folder / f"{key}.parquet") as staging:
            outputs.to_parquet(staging, index=False)
