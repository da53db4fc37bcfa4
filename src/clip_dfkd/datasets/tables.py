"""Tables and reports: Parquet tables written whole, with the class list they were made for in
their footer, and Markdown reports; both with kedro-viz previews."""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Any, NewType

import fsspec.core
import numpy as np
import pandas as pd
from kedro.io import AbstractDataset
from kedro_datasets import text as text_datasets
from kedro_datasets._typing import TablePreview

from clip_dfkd.atomic import staged_on
from clip_dfkd.datasets.partitions import PARTIAL

# kedro-viz names a preview's kind after its return annotation: "TextPreview" shows as text.
TextPreview = NewType("TextPreview", str)


def _array_cell(value: Any) -> Any:
    """An array cell as a short readable string (kedro-viz serialises previews as JSON,
    which has no arrays of numpy values), other cells as they are."""
    if not isinstance(value, np.ndarray):
        return value
    head = ", ".join(f"{v:.3g}" if isinstance(v, float | np.floating) else str(v) for v in value[:4].tolist())
    return f"[{head}{', …' if len(value) > 4 else ''}] ({len(value)} values)"


# The Parquet schema-metadata key of the class list a table was made for (a JSON list).
CLASSES_KEY = b"clip_dfkd.classes"


def _recorded_classes(schema_metadata: dict[bytes, bytes] | None) -> list[str] | None:
    """The class list a footer records: under :data:`CLASSES_KEY`, or, in a table saved before
    it (by pandas, which writes ``DataFrame.attrs`` there), in pandas' ``PANDAS_ATTRS``."""
    metadata = schema_metadata or {}
    if CLASSES_KEY in metadata:
        return json.loads(metadata[CLASSES_KEY])
    return json.loads(metadata.get(b"PANDAS_ATTRS", b"{}")).get("classes")


class ParquetDataset(AbstractDataset[pd.DataFrame, pd.DataFrame]):
    """A pandas table in one Parquet file (local or any fsspec URL), written whole or not at all
    (to a sibling, then renamed). The class list a table was made for (``data.attrs["classes"]``
    between nodes) is kept in the file's schema metadata under :data:`CLASSES_KEY`, where
    :meth:`class_list` reads it from the footer alone, without reading a row. Its kedro-viz
    preview shows array columns (embeddings, logits) as short strings."""

    def __init__(
        self,
        *,
        filepath: str,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._url = filepath
        self._load_args = load_args or {}
        self._save_args = save_args or {}
        self._filesystem, self._path = fsspec.core.url_to_fs(filepath, **(fs_args or {}))
        # Where kedro-mlflow's MlflowArtifactDataset finds the file to log, as it finds
        # kedro-datasets' own (a path without its protocol).
        self._filepath = PurePosixPath(self._path)
        self.metadata = metadata

    def _load(self) -> pd.DataFrame:
        import pyarrow.parquet as pq

        with self._filesystem.open(self._path, "rb") as file:
            table = pq.read_table(file, **self._load_args)
        frame = table.to_pandas()
        classes = _recorded_classes(table.schema.metadata)
        frame.attrs = {"classes": classes} if classes else {}
        return frame

    def _save(self, data: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(data, preserve_index=False)
        # The class list under the project's own key; pandas' copy of every attr is left out.
        schema_metadata = {key: value for key, value in (table.schema.metadata or {}).items() if key != b"PANDAS_ATTRS"}
        if "classes" in data.attrs:
            schema_metadata[CLASSES_KEY] = json.dumps(list(data.attrs["classes"])).encode()
        table = table.replace_schema_metadata(schema_metadata)
        staging = f"{self._path}{PARTIAL}"
        self._filesystem.makedirs(str(PurePosixPath(self._path).parent), exist_ok=True)
        with staged_on(self._filesystem, self._path, staging), self._filesystem.open(staging, "wb") as file:
            pq.write_table(table, file, **self._save_args)

    def class_list(self) -> list[str] | None:
        """The class list the saved table was made for, read from the file's footer; None when
        it records none (a table saved by an older version)."""
        import pyarrow.parquet as pq

        with self._filesystem.open(self._path, "rb") as file:
            return _recorded_classes(pq.read_schema(file).metadata)

    def content_digest(self) -> str:
        """The sha256 of the saved file's bytes: the same table saved again gives the same file."""
        digest = hashlib.sha256()
        with self._filesystem.open(self._path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def preview(self, nrows: int = 5) -> TablePreview:
        """The first ``nrows`` rows (read alone), missing values as null and array cells as short
        strings: kedro-viz serialises the preview as JSON."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._filesystem.open(self._path, "rb") as file:
            parquet = pq.ParquetFile(file)
            batch = next(parquet.iter_batches(batch_size=nrows), None)
            table = pa.Table.from_batches([batch]) if batch is not None else parquet.schema_arrow.empty_table()
        frame = table.to_pandas()
        cells = frame.astype(object).where(frame.notna(), None)
        return TablePreview(
            {
                "index": list(range(len(frame))),
                "columns": list(frame.columns),
                "data": [[_array_cell(cell) for cell in row] for row in cells.itertuples(index=False)],
            }
        )

    def _exists(self) -> bool:
        return self._filesystem.exists(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._url, "load_args": self._load_args, "save_args": self._save_args}


class MarkdownDataset(text_datasets.TextDataset):
    """kedro-datasets' ``text.TextDataset`` with the text as its kedro-viz preview."""

    def preview(self) -> TextPreview:
        return TextPreview(self.load())
