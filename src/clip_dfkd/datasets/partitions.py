"""A folder of one file per partition, saved resumably: what the image synthesis stage renders
into, and what every later stage reads image by image."""

from __future__ import annotations

import base64
import collections
import dataclasses
import io
import textwrap
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

import fsspec.core
from fsspec.implementations.local import LocalFileSystem
from kedro.io import AbstractDataset, DatasetError
from kedro.io.core import parse_dataset_definition
from kedro_datasets import pillow as pillow_datasets
from kedro_datasets._typing import ImagePreview
from PIL import Image, ImageDraw, ImageFont

from clip_dfkd.atomic import staged_on

PARTIAL = ".partial"  # the staging name of a file being written, never loaded


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
        staging_path = final_path.removesuffix(self._filename_suffix) + PARTIAL + self._filename_suffix
        staging = self._filesystem.unstrip_protocol(staging_path)
        with staged_on(self._filesystem, final_path, staging_path):
            self._dataset_type(**self._dataset_arguments, filepath=staging).save(value)

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
            if not partition_id.endswith(PARTIAL):
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
        if not parts or parts[0] == "/" or ".." in parts or partition_id.endswith(PARTIAL):
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
