"""Image batches for the models: decoding, preprocessing and DataLoader plumbing."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

ImageSource = Callable[[], Image.Image] | str | Path | bytes
Transform = Callable[[Image.Image], torch.Tensor]

# What PIL raises for unreadable, truncated or non-image files.
CORRUPT_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def open_rgb(source: ImageSource) -> Image.Image:
    """An RGB image from a lazy loader (Kedro partition), a file path or encoded bytes."""
    if callable(source):
        image = source()
    elif isinstance(source, bytes | bytearray):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(source)
    image.load()  # decode now, so a corrupt file fails here and not deep in a transform
    return image.convert("RGB")


class TransformedImages(Dataset):
    """Images decoded on demand and run through one or more transforms.

    Item ``i`` is ``(index, ok, *tensors)``; an unreadable image yields ``ok=False`` and zero
    tensors, so a caller counts it as corrupt instead of losing it silently.
    """

    def __init__(
        self, sources: Sequence[ImageSource], transforms: Sequence[Transform], shapes: Sequence[tuple[int, ...]]
    ):
        self._sources = sources
        self._transforms = transforms
        self._shapes = shapes

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        try:
            image = open_rgb(self._sources[index])
        except CORRUPT_IMAGE_ERRORS as exc:
            logger.warning("Skipping unreadable image %s: %s", self._sources[index], exc)
            return (index, False, *(torch.zeros(shape) for shape in self._shapes))
        return (index, True, *(transform(image) for transform in self._transforms))


def iterate_batches(
    sources: Sequence[ImageSource],
    transforms: Sequence[Transform],
    batch_size: int,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    """Yield ``(indices, ok_mask, [batch per transform])`` over ``sources`` in order."""
    if not sources:
        return
    # Zero stand-ins for corrupt images must match real outputs so that batches collate;
    # every transform here ends in a fixed-size crop, so a blank image gives the shape.
    blank = Image.new("RGB", (256, 256))
    shapes = [tuple(transform(blank).shape) for transform in transforms]
    loader = DataLoader(
        TransformedImages(sources, transforms, shapes),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    for indices, ok, *tensors in loader:
        yield indices, ok, tensors
