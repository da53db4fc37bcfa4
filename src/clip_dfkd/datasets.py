"""Kedro datasets the project needs beyond kedro-datasets; each writes whole or not at all."""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import io
import json
import textwrap
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, NewType

import fsspec.core
import numpy as np
import pandas as pd
from fsspec.implementations.local import LocalFileSystem
from kedro.io import AbstractDataset, DatasetError
from kedro.io.core import parse_dataset_definition
from kedro_datasets import pillow as pillow_datasets
from kedro_datasets import text as text_datasets
from kedro_datasets._typing import ImagePreview, JSONPreview, TablePreview
from PIL import Image, ImageDraw, ImageFont

from clip_dfkd.atomic import atomic_directory, reporting_full_disk
from clip_dfkd.models.student import CONFIG_NAME, OutdatedStudentError, StudentClassifier
from clip_dfkd.styles import StyleBank
from clip_dfkd.teacher_cache import TeacherOutputCache

_PARTIAL = ".partial"

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
        classes = (table.schema.metadata or {}).get(CLASSES_KEY)
        frame.attrs = {"classes": json.loads(classes)} if classes else {}
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
        staging = f"{self._path}{_PARTIAL}"
        local = isinstance(self._filesystem, LocalFileSystem)
        self._filesystem.makedirs(str(PurePosixPath(self._path).parent), exist_ok=True)
        try:
            with reporting_full_disk(self._path) if local else contextlib.nullcontext():
                with self._filesystem.open(staging, "wb") as file:
                    pq.write_table(table, file, **self._save_args)
                self._filesystem.mv(staging, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self._filesystem.rm_file(staging)
            raise

    def class_list(self) -> list[str] | None:
        """The class list the saved table was made for, read from the file's footer; None when
        it records none (a table saved by an older version)."""
        import pyarrow.parquet as pq

        with self._filesystem.open(self._path, "rb") as file:
            classes = (pq.read_schema(file).metadata or {}).get(CLASSES_KEY)
        return json.loads(classes) if classes else None

    def preview(self, nrows: int = 5) -> TablePreview:
        frame = self._load().head(nrows)
        return TablePreview(
            {
                "index": list(range(len(frame))),
                "columns": list(frame.columns),
                "data": [[_array_cell(cell) for cell in row] for row in frame.itertuples(index=False)],
            }
        )

    def _exists(self) -> bool:
        return self._filesystem.exists(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._url, "load_args": self._load_args, "save_args": self._save_args}


class MlflowTableDataset(AbstractDataset[pd.DataFrame, pd.DataFrame]):
    """A table saved through ``dataset`` (any Kedro dataset config, e.g. a kedro-mlflow
    artifact of a CSV file) and, when an MLflow run is active, also logged to it as an MLflow
    table (``mlflow.log_table`` to ``artifact_file``, a ``.json`` path): the MLflow UI shows it
    as a table and its artifact view compares it across runs."""

    def __init__(self, *, dataset: dict[str, Any], artifact_file: str, metadata: dict[str, Any] | None = None):
        self._dataset = AbstractDataset.from_config(f"{artifact_file} (table)", dataset)
        self._artifact_file = artifact_file
        self._logging = True
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return self._dataset.load()

    def save(self, data: pd.DataFrame) -> None:
        self._dataset.save(data)
        import mlflow

        if self._logging_activated and mlflow.active_run() is not None:
            # Missing values as JSON null, which MLflow's table reader expects.
            mlflow.log_table(data.astype(object).where(data.notna(), None), artifact_file=self._artifact_file)

    def preview(self, nrows: int = 5) -> TablePreview:
        return TablePreview(self._dataset.preview(nrows))

    def class_list(self) -> list[str] | None:
        """The class list the saved table records (see :meth:`ParquetDataset.class_list`)."""
        return self._dataset.class_list()

    # kedro-mlflow switches logging off for the datasets of a pipeline it does not track by
    # setting this on every catalog entry whose class name starts with "Mlflow"; it reaches
    # the wrapped artifact dataset through here.
    @property
    def _logging_activated(self) -> bool:
        return self._logging

    @_logging_activated.setter
    def _logging_activated(self, flag: bool) -> None:
        self._logging = flag
        if hasattr(self._dataset, "_logging_activated"):
            self._dataset._logging_activated = flag

    def _exists(self) -> bool:
        return self._dataset.exists()

    def _describe(self) -> dict[str, Any]:
        return {"dataset": self._dataset._describe(), "artifact_file": self._artifact_file}


# A metric is one {"value", "step"} or a list of them (a history), as kedro-mlflow's datasets take.
MetricPoints = dict[str, float] | list[dict[str, float]]


class MlflowMetricsDataset(AbstractDataset[dict[str, MetricPoints], dict[str, MetricPoints]]):
    """Metrics of one section of the active MLflow run: ``{"loss": [{"value", "step"}, …]}``
    saved under ``prefix`` "training" is logged as ``training/loss``. MLflow's UI makes a
    section of each ``/`` prefix, which kedro-mlflow's metrics datasets (they join with ".")
    cannot give. Logged in batches, as one request per thousand points."""

    _BATCH = 1000  # MLflow's limit on metrics per log_batch call

    def __init__(self, *, prefix: str, metadata: dict[str, Any] | None = None) -> None:
        self._prefix = prefix.strip("/")
        self._logging_activated = True
        self.metadata = metadata

    def load(self) -> dict[str, MetricPoints]:
        client, run_id = self._client_and_run()
        section = f"{self._prefix}/"
        return {
            key.removeprefix(section): [
                {"value": m.value, "step": m.step} for m in client.get_metric_history(run_id, key)
            ]
            for key in client.get_run(run_id).data.metrics
            if key.startswith(section)
        }

    def save(self, data: dict[str, MetricPoints]) -> None:
        if not self._logging_activated:
            return
        from mlflow.entities import Metric

        client, run_id = self._client_and_run()
        now = int(time.time() * 1000)
        points = [
            Metric(f"{self._prefix}/{name}", _significant(point["value"]), now, int(point["step"]))
            for name, history in data.items()
            for point in ([history] if isinstance(history, dict) else history)
        ]
        for start in range(0, len(points), self._BATCH):
            client.log_batch(run_id, metrics=points[start : start + self._BATCH])

    def _client_and_run(self) -> tuple[Any, str]:
        import mlflow

        run = mlflow.active_run()
        if run is None:
            raise DatasetError(f"metrics {self._prefix}/*: no active MLflow run; run them with `kedro run`")
        return mlflow.MlflowClient(), run.info.run_id

    def _exists(self) -> bool:
        try:
            client, run_id = self._client_and_run()
        except DatasetError:
            return False
        section = f"{self._prefix}/"
        return any(key.startswith(section) for key in client.get_run(run_id).data.metrics)

    def _describe(self) -> dict[str, Any]:
        return {"prefix": self._prefix}


def _significant(value: float) -> float:
    """``value`` to 10 significant digits: more than any figure here carries, and MLflow shows
    a mean of fractions as ``0.7025``, not its float noise ``0.7024999999999999``."""
    return float(f"{float(value):.10g}")


class MarkdownDataset(text_datasets.TextDataset):
    """kedro-datasets' ``text.TextDataset`` with the text as its kedro-viz preview."""

    def preview(self) -> TextPreview:
        return TextPreview(self.load())


@dataclasses.dataclass(frozen=True)
class PartitionLoader:
    """Loads one partition of a :class:`ResumablePartitionedDataset` through its own dataset
    (``dataset_type(**arguments, filepath=filepath)``), built on each call; picklable, so
    DataLoader workers started by spawn can take it."""

    dataset_type: type[AbstractDataset]
    arguments: dict[str, Any]
    filepath: str

    def __call__(self) -> Any:
        return self.dataset_type(**self.arguments, filepath=self.filepath).load()

    def __str__(self) -> str:
        return self.filepath


@dataclasses.dataclass(frozen=True)
class ImageFileLoader:
    """Loads one image partition as kedro-datasets' ``pillow.ImageDataset`` does (the decoded
    image, its file closed), without building that dataset: building one costs more than
    decoding a small PNG, and the labelling and training stages read every image, every epoch.
    Picklable, like :class:`PartitionLoader`."""

    filesystem: fsspec.AbstractFileSystem
    path: str  # as the filesystem names it
    filepath: str  # as the partition's dataset would have been given it

    def __call__(self) -> Image.Image:
        if isinstance(self.filesystem, LocalFileSystem):
            return _decoded(self.path)  # Pillow's own file reading: fsspec's wrapper adds a cost per file
        with self.filesystem.open(self.path, "rb") as file:
            return _decoded(file)

    def metadata(self) -> dict[str, Any]:
        """The image's metadata (``Image.info``, a PNG's text chunks among them), read from the
        file's header without decoding its pixels."""
        if isinstance(self.filesystem, LocalFileSystem):
            with Image.open(self.path) as image:
                return dict(image.info)
        with self.filesystem.open(self.path, "rb") as file, Image.open(file) as image:
            return dict(image.info)

    def __str__(self) -> str:
        return self.filepath


def _decoded(source: Any) -> Image.Image:
    with Image.open(source) as image:
        image.load()
    return image


class ResumablePartitionedDataset(AbstractDataset[dict[str, Any], dict[str, PartitionLoader | ImageFileLoader]]):
    """A folder of one file per partition, like ``PartitionedDataset``, whose save resumes.

    Each partition is written to a ``<id>.partial<suffix>`` sibling and renamed into place,
    so a file under its final name is always complete, even after SIGKILL. A write that fails
    removes its ``.partial`` file (one left by SIGKILL is never loaded and is overwritten by
    the next save of its partition); on a local disk that is full, the save stops with
    :class:`clip_dfkd.atomic.OutOfSpaceError`, naming the file and the space left. On save,
    partitions whose file already exists are skipped without calling their lazy loader, so
    an expensive producer (the image generator) only runs for what is missing.

    Partitions are written by ``writer_threads`` threads while the next lazy loader runs, so
    a producer on the GPU does not wait for PNG encoding (zlib releases the GIL); at most
    ``4 × writer_threads`` produced partitions wait for a writer.

    Saved data with an ``expect(ids)`` is told the ids of the partitions that are not on disk
    before any is loaded, and saved data with a ``close()`` is closed once saved, or when the
    save fails (the image synthesis stage's lazy images: its progress counts what it will
    render, and its producer lets go of its models at once).

    Loading gives ``{partition id: PartitionLoader}``, which builds the partition's dataset
    only when called, so listing 10⁶ partitions builds none; partitions of a plain
    ``pillow.ImageDataset`` (no credentials, fs_args or versions) get an
    :class:`ImageFileLoader`, which reads the file as that dataset does without building it.

    Built on public APIs only (fsspec for listing and renaming, Kedro's
    ``parse_dataset_definition`` for the partitions' dataset type): subclassing
    ``PartitionedDataset`` would tie it to that class's private members.
    """

    def __init__(
        self,
        *,
        path: str,
        dataset: str | type[AbstractDataset] | dict[str, Any],
        filename_suffix: str = "",
        writer_threads: int = 4,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if writer_threads < 1:
            raise DatasetError(f"writer_threads={writer_threads!r}: allowed: 1 or more")
        self._path = path
        self._dataset = dataset if isinstance(dataset, dict) else {"type": dataset}
        # Resolved once: resolving a "module.Class" name imports and inspects, per image otherwise.
        self._dataset_type, self._dataset_arguments = parse_dataset_definition(self._dataset)
        self._reads_images_itself = self._dataset_type is pillow_datasets.ImageDataset and not (
            {"credentials", "fs_args", "version"} & set(self._dataset_arguments)
        )
        self._filename_suffix = filename_suffix
        self._writer_threads = writer_threads
        self._filesystem, self._root = fsspec.core.url_to_fs(path)
        # Free space is reported for local disks only: a remote store's paths are not on one.
        self._reports_full_disk = isinstance(self._filesystem, LocalFileSystem)
        self.metadata = metadata

    def load(self) -> dict[str, PartitionLoader | ImageFileLoader]:
        partitions = self._complete_partitions()
        if not partitions:
            raise DatasetError(f"No complete partitions found in '{self._path}'")
        return partitions

    def save(self, data: dict[str, Any]) -> None:
        waiting: collections.deque[Future] = collections.deque()
        with ThreadPoolExecutor(self._writer_threads, thread_name_prefix="partition-writer") as writers:
            try:
                missing = [
                    (partition_id, partition_data, final_path)
                    for partition_id, partition_data in sorted(data.items())
                    if not self._filesystem.exists(final_path := self._partition_path(partition_id))
                ]
                if expect := getattr(data, "expect", None):
                    expect([partition_id for partition_id, _, _ in missing])
                for _, partition_data, final_path in missing:
                    value = partition_data() if callable(partition_data) else partition_data
                    waiting.append(writers.submit(self._write, final_path, value))
                    while waiting and (waiting[0].done() or len(waiting) > 4 * self._writer_threads):
                        waiting.popleft().result()  # the first failed write stops the save
                while waiting:
                    waiting.popleft().result()
            finally:
                for write in waiting:
                    write.cancel()
                if close := getattr(data, "close", None):
                    close()

    def _write(self, final_path: str, value: Any) -> None:
        staging_path = final_path.removesuffix(self._filename_suffix) + _PARTIAL + self._filename_suffix
        staging = self._filesystem.unstrip_protocol(staging_path)
        try:
            with reporting_full_disk(final_path) if self._reports_full_disk else contextlib.nullcontext():
                self._dataset_type(**self._dataset_arguments, filepath=staging).save(value)
                self._filesystem.mv(staging_path, final_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self._filesystem.rm_file(staging_path)
            raise

    def preview(self, images: int = 8, columns: int = 4, size: int = 96) -> ImagePreview:
        """A grid of the first ``images`` complete partitions (``size`` pixels square), each
        captioned with the prompt its record names (class and style), for kedro-viz: four
        columns fit its side panel without being squeezed."""
        from clip_dfkd.rendering import read_saved_record  # imports the models: only here

        partitions = self._complete_partitions()
        chosen = sorted(partitions)[:images]
        if not chosen:
            raise DatasetError(f"No complete partitions found in '{self._path}'")
        font = ImageFont.load_default(size=11)
        line_height = 13
        tile = (size, size + 2 * line_height + 4)  # the image, then two lines of caption
        rows = -(-len(chosen) // columns)
        grid = Image.new("RGB", (tile[0] * min(columns, len(chosen)), tile[1] * rows), "white")
        draw = ImageDraw.Draw(grid)
        for i, partition_id in enumerate(chosen):
            load = partitions[partition_id]
            left, top = (i % columns) * tile[0], (i // columns) * tile[1]
            grid.paste(load().convert("RGB").resize((size, size)), (left, top))
            caption = read_saved_record(load).get("prompt", partition_id)
            for n, line in enumerate(textwrap.wrap(caption, width=size // 6, max_lines=2, placeholder="…")):
                draw.text((left + 2, top + size + 2 + n * line_height), line, fill="black", font=font)
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        return ImagePreview(base64.b64encode(buffer.getvalue()).decode("ascii"))

    def _complete_partitions(self) -> dict[str, PartitionLoader | ImageFileLoader]:
        """Every complete partition's loader, listed afresh (saves write outside any listing).

        No partition's dataset is built here: building a Kedro dataset inspects its
        ``__init__`` arguments, which adds up to minutes for 10⁶ images in the process that
        lists them. A loader reads its partition when called: in the DataLoader workers that
        decode the images, and only for the partitions a caller uses (a sample grid, a preview,
        ``exists``).
        """
        if not self._filesystem.isdir(self._root):
            return {}
        root = self._root.rstrip("/") + "/"
        loaders = {}
        for path in sorted(self._filesystem.find(self._root)):
            if not path.endswith(self._filename_suffix):
                continue
            partition_id = path.removeprefix(root).removesuffix(self._filename_suffix)
            if not partition_id.endswith(_PARTIAL):
                # As PartitionedDataset does: the protocol only where the path was given one.
                filepath = self._filesystem.unstrip_protocol(path) if "://" in self._path else path
                loaders[partition_id] = (
                    ImageFileLoader(self._filesystem, path, filepath)
                    if self._reads_images_itself
                    else PartitionLoader(self._dataset_type, self._dataset_arguments, filepath)
                )
        return loaders

    def _partition_path(self, partition_id: str) -> str:
        parts = PurePosixPath(partition_id).parts
        if not parts or parts[0] == "/" or ".." in parts or partition_id.endswith(_PARTIAL):
            raise DatasetError(f"Partition id {partition_id!r} must be a relative path inside '{self._path}'")
        return f"{self._root.rstrip('/')}/{partition_id}{self._filename_suffix}"

    def _exists(self) -> bool:
        return bool(self._complete_partitions())

    def _describe(self) -> dict[str, Any]:
        return {
            "path": self._path,
            "dataset": self._dataset,
            "filename_suffix": self._filename_suffix,
            "writer_threads": self._writer_threads,
        }


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
