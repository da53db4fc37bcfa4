"""Kedro datasets the project needs beyond kedro-datasets; each writes whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset
from kedro_datasets.partitions import PartitionedDataset

from clip_dfkd.atomic import atomic_directory
from clip_dfkd.models.student import StudentClassifier
from clip_dfkd.styles import StyleBank

_PARTIAL = ".partial"


class ResumablePartitionedDataset(PartitionedDataset):
    """A ``PartitionedDataset`` that resumes an interrupted save.

    Each partition is written to a ``.partial`` sibling and renamed into place, so a file
    under its final name is always complete, even after SIGKILL. On save, partitions whose
    file already exists are skipped without calling their lazy loader, so an expensive
    producer (the image generator) only runs for what is missing.
    """

    def _list_partitions(self) -> list[str]:
        return [p for p in super()._list_partitions() if not p.endswith(_PARTIAL + self._filename_suffix)]

    def save(self, data: dict[str, Any]) -> None:
        filesystem = self._filesystem
        for partition_id, partition_data in sorted(data.items()):
            final_path = self._partition_to_path(partition_id)
            if filesystem.exists(final_path):
                continue
            staging_path = final_path.removesuffix(self._filename_suffix) + _PARTIAL + self._filename_suffix
            kwargs = dict(self._dataset_config)
            kwargs[self._filepath_arg] = self._join_protocol(staging_path)
            if callable(partition_data) and self._save_lazily:
                partition_data = partition_data()  # noqa: PLW2901
            self._dataset_type(**kwargs).save(partition_data)
            filesystem.mv(staging_path, final_path)
        self._invalidate_caches()


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
        return (self._path / "config.json").is_file()

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

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
