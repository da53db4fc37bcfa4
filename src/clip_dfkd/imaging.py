"""Image batches for the models: decoding, preprocessing and DataLoader plumbing."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

logger = logging.getLogger(__name__)

ImageSource = Callable[[], Image.Image] | str | Path | bytes
Transform = Callable[[Image.Image], torch.Tensor]


class UnsupportedImageModeError(ValueError):
    """A decoded image whose pixel mode has no conversion to RGB."""


# What PIL raises for unreadable, truncated or non-image files; UnsupportedImageModeError is a
# ValueError, so an image in a mode that cannot become RGB is counted as unreadable too.
CORRUPT_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)

# 16-bit grayscale as Pillow opens it (PNG, TIFF, PGM). Mode I is 32-bit, but Pillow has also
# opened 16-bit PNGs as I, so it is read on the same 0..65535 scale (larger values saturate).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
SUPPORTED_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "F", *_SIXTEEN_BIT_MODES, *_ALPHA_MODES)
WHITE = (255, 255, 255)


def one_line_error(exc: BaseException) -> str:
    """``Type: message`` on one line, for logs and the skipped-files report."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def open_rgb(source: ImageSource) -> Image.Image:
    """An 8-bit RGB image from a lazy loader (Kedro partition), a file path or encoded bytes,
    as an image viewer shows it.

    - EXIF orientation is applied, so a phone photo stored sideways comes out upright.
    - 16-bit grayscale (modes I;16, I;16B, I;16L, I;16N and I) is scaled from 0..65535 to
      0..255; a plain conversion would clip it, turning most of the image white.
    - Float images (mode F) are read as 0..1 when every value lies in [0, 1] (how float image
      writers such as scikit-image store them) and as 0..255 otherwise (Pillow's convention);
      values outside the range saturate, NaN is black.
    - Transparent pixels (an alpha channel, or a transparent palette index or colour in
      ``info["transparency"]``) are composited over white, as viewers draw them on a white
      page; the colour stored under alpha 0 is arbitrary and never shown.
    - 1, L, P, CMYK, YCbCr, LAB, HSV and RGBX go through Pillow's own conversion.

    Raises one of :data:`CORRUPT_IMAGE_ERRORS`: the decoder's error for an unreadable file, or
    :class:`UnsupportedImageModeError` naming a mode that has no conversion to RGB.
    """
    if callable(source):
        image = source()
    elif isinstance(source, bytes | bytearray):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(source)
    image.load()  # decode now, so a corrupt file fails here and not deep in a transform
    if image.mode not in SUPPORTED_MODES:
        raise UnsupportedImageModeError(
            f"image mode {image.mode!r} cannot be converted to RGB; allowed: {', '.join(SUPPORTED_MODES)}"
        )
    # Pillow's exif_transpose copies even an image it does not turn: only an image to turn
    # goes through it, as a copy, not in place, since a loader may hand out an image it keeps.
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_8bit(image)
    elif image.mode == "F":
        image = Image.fromarray(_float_to_8bit(np.asarray(image)))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        page = Image.new("RGBA", image.size, (*WHITE, 255))
        return Image.alpha_composite(page, image.convert("RGBA")).convert("RGB")
    # Already RGB: the image itself (every caller only reads it), not a copy.
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_bit_to_8bit(image: Image.Image) -> Image.Image:
    """Grayscale ``L`` (``LA`` with a transparent grey level) scaled by 255/65535, rounded."""
    raw = np.asarray(image).astype(np.int64)
    gray = Image.fromarray(((raw.clip(0, 65535) + 128) // 257).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        gray.putalpha(Image.fromarray(np.where(raw == transparent, 0, 255).astype(np.uint8)))
    return gray


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    scale = 255.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 1.0
    return np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0).round().clip(0, 255).astype(np.uint8)


class TransformedImages(Dataset):
    """Images decoded on demand and run through a transform.

    Item ``i`` is ``(index, ok, error, tensor)``; an unreadable image yields ``ok=False``, the
    decoder's one-line error and ``blank`` (zeros like the transform's output), so a caller
    reports it as corrupt instead of losing it silently.
    """

    def __init__(self, sources: Sequence[ImageSource], transform: Transform, blank: torch.Tensor):
        self._sources = sources
        self._transform = transform
        self._blank = blank

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        try:
            image = open_rgb(self._sources[index])
        except CORRUPT_IMAGE_ERRORS as exc:
            logger.warning("Skipping unreadable image %s: %s", self._sources[index], one_line_error(exc))
            return (index, False, one_line_error(exc), self._blank)
        with torch.inference_mode():  # preprocessing needs no autograd bookkeeping on its tensor ops
            return (index, True, "", self._transform(image))


class BatchNormalize:
    """torchvision's ``ToTensor`` then ``Normalize``, on a whole uint8 batch ``(N, C, H, W)``
    wherever it lies, in the same float32 arithmetic: ``(x / 255 - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self._mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean.to(pixels.device), self._std.to(pixels.device)
        return pixels.float().div_(255).sub_(mean).div_(std)


def split_normalization(transform: Transform) -> tuple[Transform, Callable[[torch.Tensor], torch.Tensor]]:
    """``transform`` as a per-image part and a batch part.

    A torchvision ``Compose`` that ends in ``ToTensor`` and ``Normalize`` (open_clip's and
    timm's evaluation preprocessing do) gives uint8 tensors per image and
    :class:`BatchNormalize` for the batch: batches then leave the DataLoader workers and go to
    the device at a quarter of float32's bytes, and the float work runs once per batch on the
    device instead of per image in the decoding process. Any other transform is kept whole.
    """
    steps = getattr(transform, "transforms", [])
    if len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize):
        return T.Compose([*steps[:-2], T.PILToTensor()]), BatchNormalize(steps[-1].mean, steps[-1].std)
    return transform, _unchanged


def _unchanged(pixels: torch.Tensor) -> torch.Tensor:
    return pixels


def iterate_batches(
    sources: Sequence[ImageSource],
    transform: Transform,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    errors: dict[int, str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, ok_mask, pixels)`` over ``sources`` in order: ``pixels`` is the batch
    of ``transform``'s outputs on ``device`` (its normalisation done there, see
    :func:`split_normalization`), the masks on the CPU.

    ``errors``, when given, receives ``{index: one-line decoder error}`` for each unreadable
    source; the errors travel inside the batches, so this also works with worker processes.
    """
    if not sources:
        return
    per_image, per_batch = split_normalization(transform)
    # Zero stand-ins for corrupt images must match real outputs so that batches collate;
    # every transform here ends in a fixed-size crop, so a blank image gives the shape.
    blank = torch.zeros_like(per_image(Image.new("RGB", (256, 256))))
    loader = DataLoader(
        TransformedImages(sources, per_image, blank),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    for indices, ok, messages, pixels in loader:
        if errors is not None:
            errors.update((int(i), m) for i, good, m in zip(indices, ok, messages, strict=True) if not good)
        yield indices, ok, per_batch(pixels.to(device, non_blocking=True))
