"""What travels with a synthetic image, and what a run measured while rendering.

An image's *record* (its id, prompt, seed and what its synthesis computed, such as the
inversion's loss) is a function of the recipe alone, so it goes into the PNG's text chunk: the
same recipe gives the same file, byte for byte, whether it was rendered here, in shards or on
Ray. Wall-clock time is not a property of the image; it is counted per run in
:class:`RenderTiming`, which the stage turns into metrics.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

RECORD_KEY = "clip-dfkd"  # the PNG text chunk that carries an image's synthesis record


@dataclasses.dataclass
class RenderTiming:
    """The images this run rendered and the seconds their rendering took (summed over batches,
    so over Ray actors working at once too; model loading not included)."""

    images: int = 0
    seconds: float = 0.0

    def add(self, images: int, seconds: float) -> None:
        self.images += images
        self.seconds += seconds


def attach_record(image: Image.Image, record: dict[str, Any]) -> Image.Image:
    # Pillow writes an image's own ``encoderinfo`` when it saves it: the record travels with
    # the image through the partitioned dataset into a PNG text chunk.
    text = PngInfo()
    text.add_text(RECORD_KEY, json.dumps(record))
    image.encoderinfo = {"pnginfo": text}
    return image


def read_record(image: Image.Image) -> dict[str, Any]:
    return _record(image.info)


def read_saved_record(load: Callable[[], Image.Image]) -> dict[str, Any]:
    """The record of a saved image, given its loader: one that reads the file's metadata alone
    (:meth:`clip_dfkd.datasets.ImageFileLoader.metadata`) decodes no pixel."""
    metadata = getattr(load, "metadata", None)
    return _record(metadata() if metadata is not None else load().info)


def _record(info: dict[str, Any]) -> dict[str, Any]:
    text = info.get(RECORD_KEY)
    return json.loads(text) if text else {}
