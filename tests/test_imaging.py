"""open_rgb decodes every image mode Pillow opens to the 8-bit RGB a viewer would show.

Each case derives a file in one mode from the same RGB reference picture and compares the
decoded result with what that file should look like: exactly for lossless files, within a
few levels for JPEG and for Pillow's own colour-space round trips.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clip_dfkd.imaging import (
    CORRUPT_IMAGE_ERRORS,
    UnsupportedImageModeError,
    iterate_batches,
    open_rgb,
    split_normalization,
)

WIDTH, HEIGHT = 64, 48  # not square, so a missing or wrong rotation changes the shape
ORIENTATION = 0x0112
# Pixels made transparent in the alpha cases; under them lies the reference's dark red.
HOLE = (slice(4, 20), slice(40, 60))


def _reference() -> Image.Image:
    x = np.arange(WIDTH)[None, :].repeat(HEIGHT, 0)
    y = np.arange(HEIGHT)[:, None].repeat(WIDTH, 1)
    pixels = np.stack([x * 4, y * 5, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 4, 59, 19), fill=(120, 0, 0))
    draw.ellipse((6, 24, 26, 44), fill=(20, 40, 230))
    draw.polygon([(30, 44), (40, 26), (50, 44)], fill=(10, 200, 30))
    return image


REF = _reference()
REF_RGB = np.asarray(REF)
REF_GRAY = np.asarray(REF.convert("L"))


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _white_hole(pixels: np.ndarray) -> np.ndarray:
    expected = pixels.copy()
    expected[HOLE] = 255
    return expected


def _hole_alpha() -> Image.Image:
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[HOLE] = 0
    return Image.fromarray(alpha)


# The palette cases' colours are those of REF quantised to 64 colours.
PALETTE_RGB = np.asarray(REF.quantize(colors=64).convert("RGB"))


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _palette_with_transparent_hole() -> Image.Image:
    """REF quantised to 64 colours, the hole painted with an extra index 64 that is marked
    transparent; its palette colour is a vivid green that must never show."""
    image = REF.quantize(colors=64)
    indices = np.asarray(image).copy()
    indices[HOLE] = 64
    palette = image.getpalette()[: 64 * 3] + [0, 255, 0]
    transparent = Image.fromarray(indices, "P")
    transparent.putpalette(palette)
    transparent.info["transparency"] = 64
    return transparent


def _exif_rotated(path: Path, orientation: int, **save_args) -> Path:
    """REF stored sideways with the EXIF orientation that tells a viewer to turn it upright."""
    stored = REF.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return _save(stored, path, exif=exif, **save_args)


def _sixteen_bit(mode: str) -> Image.Image:
    values = REF_GRAY.astype(np.uint16) * 257
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (WIDTH, HEIGHT), values.astype(dtype).tobytes())


# name -> (source builder, expected pixels, max abs difference, mean abs difference)
CASES: dict[str, tuple[Callable[[Path], object], np.ndarray, int, float]] = {
    "rgb png": (lambda d: _save(REF, d / "a.png"), REF_RGB, 0, 0),
    "rgb jpeg": (lambda d: _save(REF, d / "a.jpg", quality=95, subsampling=0), REF_RGB, 24, 2.0),
    "L png": (lambda d: _save(REF.convert("L"), d / "a.png"), _rgb(REF_GRAY), 0, 0),
    "1 png": (
        lambda d: _save(REF.convert("L").point(lambda v: 255 * (v > 100)).convert("1"), d / "a.png"),
        _rgb(np.where(REF_GRAY > 100, 255, 0).astype(np.uint8)),
        0,
        0,
    ),
    "16-bit png (I;16)": (
        lambda d: _save(Image.fromarray(REF_GRAY.astype(np.uint16) * 257), d / "a.png"),
        _rgb(REF_GRAY),
        0,
        0,
    ),
    "16-bit big-endian tiff (I;16B)": (lambda d: _save(_sixteen_bit("I;16B"), d / "a.tif"), _rgb(REF_GRAY), 0, 0),
    # Pillow writes I;16L files as I;16, so this one comes from a loader.
    "16-bit little-endian (I;16L)": (lambda d: lambda: _sixteen_bit("I;16L"), _rgb(REF_GRAY), 0, 0),
    "32-bit int tiff (I) on the 16-bit scale": (
        lambda d: _save(Image.fromarray(REF_GRAY.astype(np.int32) * 257), d / "a.tif"),
        _rgb(REF_GRAY),
        0,
        0,
    ),
    "16-bit png with a transparent grey level": (
        lambda d: _save(
            Image.fromarray(REF_GRAY.astype(np.uint16) * 257), d / "a.png", transparency=int(REF_GRAY[0, 0]) * 257
        ),
        _rgb(np.where(REF_GRAY == REF_GRAY[0, 0], 255, REF_GRAY).astype(np.uint8)),
        0,
        0,
    ),
    "float tiff (F) in 0..1": (
        lambda d: _save(Image.fromarray(REF_GRAY.astype(np.float32) / 255), d / "a.tif"),
        _rgb(REF_GRAY),
        0,
        0,
    ),
    "float tiff (F) in 0..255": (
        lambda d: _save(Image.fromarray(REF_GRAY.astype(np.float32)), d / "a.tif"),
        _rgb(REF_GRAY),
        0,
        0,
    ),
    "LA png": (
        lambda d: _save(Image.merge("LA", [REF.convert("L"), _hole_alpha()]), d / "a.png"),
        _white_hole(_rgb(REF_GRAY)),
        0,
        0,
    ),
    "RGBA png": (
        lambda d: _save(Image.merge("RGBA", [*REF.split(), _hole_alpha()]), d / "a.png"),
        _white_hole(REF_RGB),
        0,
        0,
    ),
    "RGBA png, half transparent": (
        lambda d: _save(Image.merge("RGBA", [*REF.split(), Image.new("L", REF.size, 128)]), d / "a.png"),
        (REF_RGB.astype(float) * 128 / 255 + 255 * 127 / 255).round().astype(np.uint8),
        1,
        1,
    ),
    "P png with a transparent index": (
        lambda d: _save(_palette_with_transparent_hole(), d / "a.png", transparency=64),
        _white_hole(PALETTE_RGB),
        0,
        0,
    ),
    "P gif with a transparent index": (
        lambda d: _save(_palette_with_transparent_hole(), d / "a.gif", transparency=64),
        _white_hole(PALETTE_RGB),
        0,
        0,
    ),
    # Pillow cannot write PA files; a loader (as a Kedro partition is) hands the image over.
    "PA": (
        lambda d: lambda: Image.merge("PA", [*REF.quantize(colors=64).split(), _hole_alpha()]),
        _white_hole(PALETTE_RGB),
        0,
        0,
    ),
    "CMYK tiff": (lambda d: _save(REF.convert("CMYK"), d / "a.tif"), REF_RGB, 0, 0),
    "CMYK jpeg": (lambda d: _save(REF.convert("CMYK"), d / "a.jpg", quality=95), REF_RGB, 24, 2.0),
    "YCbCr tiff": (lambda d: _save(REF.convert("YCbCr"), d / "a.tif"), REF_RGB, 3, 1.5),
    # LAB's 8-bit quantisation costs a few levels, more on saturated colours.
    "LAB tiff": (lambda d: _save(REF.convert("LAB"), d / "a.tif"), REF_RGB, 32, 2.0),
    # Pillow cannot write HSV files.
    "HSV": (lambda d: lambda: REF.convert("HSV"), REF_RGB, 8, 1.0),
    "EXIF orientation 6 jpeg": (lambda d: _exif_rotated(d / "a.jpg", 6, quality=95, subsampling=0), REF_RGB, 24, 2.0),
    "EXIF orientation 8 jpeg": (lambda d: _exif_rotated(d / "a.jpg", 8, quality=95, subsampling=0), REF_RGB, 24, 2.0),
    "EXIF orientation 6 png": (lambda d: _exif_rotated(d / "a.png", 6), REF_RGB, 0, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_decodes_to_what_a_viewer_shows(tmp_path, case) -> None:
    build, expected, max_error, mean_error = CASES[case]

    image = open_rgb(build(tmp_path))

    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.dtype == np.uint8
    assert pixels.shape == expected.shape  # (48, 64, 3): also catches a missing EXIF rotation
    difference = np.abs(pixels.astype(int) - expected.astype(int))
    assert difference.max() <= max_error, case
    assert difference.mean() <= mean_error, case


def test_the_decoded_files_really_are_in_the_mode_under_test(tmp_path) -> None:
    """Guards the cases above: Pillow must open each file in the mode it is named after."""
    opened = {}
    for number, (case, (build, *_)) in enumerate(CASES.items()):
        (tmp_path / str(number)).mkdir()
        opened[case] = build(tmp_path / str(number))
    modes = {case: (source() if callable(source) else Image.open(source)).mode for case, source in opened.items()}
    assert modes["16-bit png (I;16)"] == "I;16"
    assert modes["16-bit big-endian tiff (I;16B)"] == "I;16B"
    assert modes["16-bit little-endian (I;16L)"] == "I;16L"
    assert modes["32-bit int tiff (I) on the 16-bit scale"] == "I"
    assert modes["float tiff (F) in 0..1"] == "F"
    assert modes["1 png"] == "1"
    assert modes["LA png"] == "LA"
    assert (modes["P png with a transparent index"], modes["P gif with a transparent index"]) == ("P", "P")
    assert modes["PA"] == "PA"
    assert (modes["CMYK tiff"], modes["CMYK jpeg"]) == ("CMYK", "CMYK")
    assert modes["YCbCr tiff"] == "YCbCr"
    assert (modes["LAB tiff"], modes["HSV"]) == ("LAB", "HSV")
    assert Image.open(opened["EXIF orientation 8 jpeg"]).getexif()[ORIENTATION] == 8


def test_a_mode_without_rgb_conversion_fails_clearly_and_counts_as_unreadable() -> None:
    premultiplied = Image.new("La", (4, 3))  # Pillow has no La -> RGB conversion

    with pytest.raises(UnsupportedImageModeError, match=r"^image mode 'La' cannot be converted to RGB; allowed: 1, L,"):
        open_rgb(lambda: premultiplied)
    assert issubclass(UnsupportedImageModeError, CORRUPT_IMAGE_ERRORS)


def test_unreadable_sources_report_the_decoder_error_by_index(tmp_path) -> None:
    good = _save(REF, tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.png"
    empty.touch()
    errors: dict[int, str] = {}

    batches = list(
        iterate_batches(
            [good, truncated, empty, lambda: Image.new("La", (4, 3))],
            lambda image: torch.zeros(2),
            batch_size=3,
            device=torch.device("cpu"),
            errors=errors,
        )
    )

    assert [ok.tolist() for _, ok, _ in batches] == [[True, False, False], [False]]
    assert sorted(errors) == [1, 2, 3]
    assert errors[1].startswith("OSError: image file is truncated")
    assert errors[2].startswith("UnidentifiedImageError: cannot identify image file")
    assert errors[3].startswith("UnsupportedImageModeError: image mode 'La'")
    assert all("\n" not in message for message in errors.values())


def _teacher_and_student_preprocessing() -> dict[str, Callable]:
    """open_clip's preprocessing for a CLIP tower and timm's for a student, as the project builds them."""
    import open_clip
    import timm

    clip_preprocess = open_clip.image_transform(224, is_train=False, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))
    backbone = timm.create_model("resnet10t", pretrained=False)
    timm_preprocess = timm.data.create_transform(**timm.data.resolve_model_data_config(backbone), is_training=False)
    return {"open_clip": clip_preprocess, "timm": timm_preprocess}


@pytest.mark.parametrize("library", ["open_clip", "timm"])
def test_batches_are_normalised_on_the_device_exactly_as_per_image_preprocessing_does(library) -> None:
    """Decoding processes hand over uint8 (a quarter of float32's bytes) and the batch is
    normalised where the model runs: the pixels must be bit for bit what the library's own
    preprocessing gives each image."""
    preprocess = _teacher_and_student_preprocessing()[library]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(240, 320), (300, 200)]]

    per_image, per_batch = split_normalization(preprocess)
    (_, ok, pixels), *rest = iterate_batches([lambda i=i: i for i in images], preprocess, 2, torch.device("cpu"))

    assert rest == [] and ok.all()
    assert torch.stack([per_image(image) for image in images]).dtype == torch.uint8
    expected = torch.stack([preprocess(image) for image in images])
    assert pixels.dtype == torch.float32 and torch.equal(pixels, expected)
    assert torch.equal(per_batch(torch.stack([per_image(image) for image in images])), expected)


def test_a_transform_that_does_not_end_in_to_tensor_and_normalize_is_kept_whole() -> None:
    def custom(image: Image.Image) -> torch.Tensor:
        return torch.ones(2)

    per_image, per_batch = split_normalization(custom)
    batch = torch.ones(3, 2)

    assert per_image is custom and per_batch(batch) is batch
