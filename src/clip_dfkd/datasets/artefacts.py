"""The project's own artefacts as datasets: the student (a save_pretrained folder), a style bank
and the teacher's output cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError
from kedro_datasets._typing import JSONPreview

from clip_dfkd.atomic import atomic_directory
from clip_dfkd.models.student import CONFIG_NAME, OutdatedStudentError, StudentClassifier
from clip_dfkd.styles import StyleBank
from clip_dfkd.teacher_cache import TeacherOutputCache


class StudentModelDataset(AbstractDataset[StudentClassifier, StudentClassifier]):
    """A trained student as a ``save_pretrained`` folder (config.json + model.safetensors),
    written whole or not at all."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> StudentClassifier:
        return StudentClassifier.from_pretrained(self._path)

    def save(self, data: StudentClassifier) -> None:
        with atomic_directory(self._path) as staging:
            data.save_pretrained(staging)

    def _exists(self) -> bool:
        return (self._path / CONFIG_NAME).is_file()

    def class_list(self) -> list[str]:
        """The classes the saved student tells apart, read from its ``config.json`` alone (no
        weights loaded).

        Raises:
            OutdatedStudentError: the student was saved by a version that it cannot be loaded by.
        """
        config = json.loads((self._path / CONFIG_NAME).read_text())
        if "data_config" not in config:
            raise OutdatedStudentError(self._path / CONFIG_NAME)
        return list(config["class_names"])

    def preview(self) -> JSONPreview:
        """The saved ``config.json``: architecture, classes, preprocessing."""
        return JSONPreview((self._path / CONFIG_NAME).read_text())

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class StyleBankDataset(AbstractDataset[StyleBank, StyleBank]):
    """A style bank as one ``.safetensors`` file: the vectors, and names, method and encoder
    in its metadata."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> StyleBank:
        return StyleBank.load(self._filepath)

    def save(self, data: StyleBank) -> None:
        data.save(self._filepath)

    def preview(self) -> JSONPreview:
        """The bank's method, encoder (and its token table's hash), how long its vectors are against real words (norm
        ratios; none for an empty bank or one saved before they were recorded), its
        pseudo-word names and how they were made."""
        bank = self.load()
        details = dict(bank.details)
        summary = {
            "method": bank.method,
            "encoder": bank.encoder,
            "encoder_identity": bank.encoder_identity,
            "dim": bank.dim if bank.names else None,
            "norm_ratio": details.pop("norm_ratio", None),
        }
        return JSONPreview(json.dumps({**summary, "names": bank.names, "details": details}, default=str))

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class TeacherOutputCacheDataset(AbstractDataset[None, TeacherOutputCache]):
    """The folder of cached teacher outputs (:mod:`clip_dfkd.teacher_cache`), loaded as a
    handle that the evaluation reads and fills entry by entry; it is never saved whole."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> TeacherOutputCache:
        return TeacherOutputCache(self._path)

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._path} is a cache that its users fill entry by entry; it is not saved whole")

    def _exists(self) -> bool:
        return True  # an empty cache is a cache

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
