"""The demo's worlds: shapes drawn in several styles, and captions that describe them.

Each class is a shape and each style a way of drawing it, so that a tiny CLIP trained here on
some styles has real knowledge to pass on, and a style it never saw is a real domain shift.
Besides the demo's four styles there are compositional ones, a rendering under a light, whose
names mean the same thing across styles as real style words do (docs/held_out_world.md).
Every image comes from its own ``random.Random``, so a drawing depends only on its seed.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Point = tuple[float, float]


def _circle(rng: random.Random) -> list[Point]:
    squash = rng.uniform(0.85, 1.0)
    return [(math.cos(a), squash * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]


def _square(rng: random.Random) -> list[Point]:
    return [(-1, -1), (1, -1), (1, 1), (-1, 1)]


def _triangle(rng: random.Random) -> list[Point]:
    return [(-1, 0.8), (0, -1), (1, 0.8)]


def _diamond(rng: random.Random) -> list[Point]:
    return [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]


def _star(rng: random.Random) -> list[Point]:
    return [
        (
            (1.0 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
            -(1.0 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5),
        )
        for k in range(10)
    ]


# The shape each class name is drawn as (outline as points on [-1, 1]²).
SHAPES: dict[str, Callable[[random.Random], list[Point]]] = {
    "ball": _circle,
    "box": _square,
    "tent": _triangle,
    "kite": _diamond,
    "star": _star,
}


def _placed(outline: list[Point], rng: random.Random, size: int) -> list[Point]:
    """The outline rotated a little, scaled and moved to a random place inside the image."""
    angle = rng.uniform(-0.3, 0.3)
    radius = size * rng.uniform(0.24, 0.4)
    cx = size / 2 + rng.uniform(-1, 1) * (size / 2 - radius - 1)
    cy = size / 2 + rng.uniform(-1, 1) * (size / 2 - radius - 1)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in outline]


def _colour(rng: random.Random, low: int, high: int) -> tuple[int, int, int]:
    return tuple(rng.randint(low, high) for _ in range(3))


def _photo(points: list[Point], rng: random.Random, size: int) -> Image.Image:
    """A filled shape, darker than its light background, with texture and blur."""
    image = Image.new("RGB", (size, size), _colour(rng, 150, 235))
    draw = ImageDraw.Draw(image)
    draw.polygon(points, fill=_colour(rng, 0, 130))
    noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.blend(image, Image.fromarray(noise), rng.uniform(0.1, 0.25))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))


def _sketch(points: list[Point], rng: random.Random, size: int) -> Image.Image:
    """A dark outline, drawn twice with a slight wobble, on paper."""
    image = Image.new("RGB", (size, size), _colour(rng, 225, 255))
    draw = ImageDraw.Draw(image)
    ink = _colour(rng, 0, 80)
    for _ in range(2):
        wobbly = [(x + rng.uniform(-0.8, 0.8), y + rng.uniform(-0.8, 0.8)) for x, y in points]
        draw.line([*wobbly, wobbly[0]], fill=ink, width=1)
    return image


def _cartoon(points: list[Point], rng: random.Random, size: int) -> Image.Image:
    """A bright flat shape with a thick black outline on a flat bright background."""
    image = Image.new("RGB", (size, size), _colour(rng, 150, 255))
    draw = ImageDraw.Draw(image)
    draw.polygon(points, fill=_colour(rng, 60, 255), outline=(0, 0, 0), width=2)
    return image


def _night(points: list[Point], rng: random.Random, size: int) -> Image.Image:
    """A dimly lit shape on a dark background with a few stars."""
    image = Image.new("RGB", (size, size), _colour(rng, 0, 45))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        draw.point((x, y), fill=_colour(rng, 180, 255))
    draw.polygon(points, fill=_colour(rng, 70, 190))
    return image.filter(ImageFilter.GaussianBlur(0.5))


# The held-out world's styles: a rendering (how the shape is drawn) under a light (the
# palette of background and ink). Captions name both ("a night drawing of a ball"), so the teacher's
# text space has structure between styles: "night" means the same thing in every rendering.
LIGHTS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    # (background, ink) channel ranges
    "day": ((170, 255), (0, 110)),
    "night": ((0, 50), (110, 230)),
}


def _painting(points: list[Point], rng: random.Random, size: int, light: str) -> Image.Image:
    """A filled shape with texture noise and a soft blur."""
    background, ink = LIGHTS[light]
    image = Image.new("RGB", (size, size), _colour(rng, *background))
    ImageDraw.Draw(image).polygon(points, fill=_colour(rng, *ink))
    noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.blend(image, Image.fromarray(noise), rng.uniform(0.1, 0.2))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))


def _line_drawing(points: list[Point], rng: random.Random, size: int, light: str) -> Image.Image:
    """A thin outline, drawn twice with a slight wobble."""
    background, ink = LIGHTS[light]
    image = Image.new("RGB", (size, size), _colour(rng, *background))
    draw = ImageDraw.Draw(image)
    colour = _colour(rng, *ink)
    for _ in range(2):
        wobbly = [(x + rng.uniform(-0.8, 0.8), y + rng.uniform(-0.8, 0.8)) for x, y in points]
        draw.line([*wobbly, wobbly[0]], fill=colour, width=1)
    return image


def _comic(points: list[Point], rng: random.Random, size: int, light: str) -> Image.Image:
    """A flat bright shape with a thick outline in the light's ink."""
    background, ink = LIGHTS[light]
    image = Image.new("RGB", (size, size), _colour(rng, *background))
    outline = (0, 0, 0) if light == "day" else (255, 255, 255)
    ImageDraw.Draw(image).polygon(points, fill=_colour(rng, 60, 255), outline=outline, width=2)
    return image


def _silhouette(points: list[Point], rng: random.Random, size: int, light: str) -> Image.Image:
    """A sharp shape of one grey on a plain background."""
    background, ink = LIGHTS[light]
    image = Image.new("RGB", (size, size), (rng.randint(*background),) * 3)
    ImageDraw.Draw(image).polygon(points, fill=(rng.randint(*ink),) * 3)
    return image


RENDERINGS = {"painting": _painting, "drawing": _line_drawing, "comic": _comic, "silhouette": _silhouette}


def _mask(points: list[Point], size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return mask


def _mosaic(points: list[Point], rng: random.Random, size: int) -> Image.Image:
    """Small square tiles: the ground's of random light colours, the shape's of one dark hue."""
    tile = 2
    cells = -(-size // tile)
    inside = np.asarray(_mask(points, size).resize((cells, cells), Image.BOX)) > 110
    pick = np.random.default_rng(rng.randrange(2**32))
    hue = np.array(_colour(rng, 20, 110))
    shape = np.clip(hue + pick.integers(-20, 21, (cells, cells, 3)), 0, 255)
    ground = pick.integers(140, 256, (cells, cells, 3))
    tiles = np.where(inside[..., None], shape, ground).astype(np.uint8)
    return Image.fromarray(tiles).resize((cells * tile, cells * tile), Image.NEAREST).crop((0, 0, size, size))


def _hatching(points: list[Point], rng: random.Random, size: int) -> Image.Image:
    """The shape filled with parallel pen strokes, no outline, on plain paper."""
    paper = Image.new("RGB", (size, size), _colour(rng, 200, 255))
    strokes = paper.copy()
    draw = ImageDraw.Draw(strokes)
    ink = _colour(rng, 0, 120)
    angle = rng.uniform(0, math.pi)
    dx, dy = math.cos(angle), math.sin(angle)
    spacing = rng.uniform(2.0, 3.0)
    for k in np.arange(-size, 2 * size, spacing):  # a stroke every `spacing` pixels across the image
        cx, cy = size / 2 + (k - size / 2) * -dy, size / 2 + (k - size / 2) * dx
        draw.line([(cx - 2 * size * dx, cy - 2 * size * dy), (cx + 2 * size * dx, cy + 2 * size * dy)], fill=ink)
    return Image.composite(strokes, paper, _mask(points, size))


def _stipple(points: list[Point], rng: random.Random, size: int) -> Image.Image:
    """The shape made of scattered coloured dots, a few stray dots around it."""
    mask = np.asarray(_mask(points, size)) > 0
    pick = np.random.default_rng(rng.randrange(2**32))
    image = np.full((size, size, 3), _colour(rng, 210, 255), dtype=np.uint8)
    dots = pick.random((size, size)) < np.where(mask, 0.7, 0.03)
    image[dots] = np.clip(np.array(_colour(rng, 0, 120)) + pick.integers(-30, 31, (int(dots.sum()), 3)), 0, 255)
    return Image.fromarray(image)


# How each style draws a placed outline. The demo's world is the first four (its teacher
# learns photo, sketch and cartoon; night is held out). The held-out world
# (benchmarks/worlds/held_out_styles.yml, docs/held_out_world.md) trains its teacher on every
# rendering under every light ("night comic") and holds out the three renderings that stand
# alone: no caption names them, and nothing in the teacher's augmentation (brightness, channel
# order, inversion, flips) makes tiles, strokes or dots.
STYLES: dict[str, Callable[[list[Point], random.Random, int], Image.Image]] = {
    "photo": _photo,
    "sketch": _sketch,
    "cartoon": _cartoon,
    "night": _night,
    **{
        f"{light} {name}": functools.partial(render, light=light)
        for light in LIGHTS
        for name, render in RENDERINGS.items()
    },
    "mosaic": _mosaic,
    "hatching": _hatching,
    "stipple": _stipple,
}

# Captions of a (class, style) drawing; "{style}"-less ones describe the class in any style.
CAPTION_TEMPLATES = (
    "a {style} of a {class_name}.",
    "a {style} of a {class_name}",
    "a {style} of the {class_name}.",
    "a {class_name} in a {style}.",
    "a {class_name}.",
    "a {class_name}",
    "the {class_name}.",
)


def draw(class_name: str, style: str, seed: int, size: int) -> Image.Image:
    """One drawing of ``class_name`` in ``style``, decided by ``seed`` alone."""
    rng = random.Random(seed)
    return STYLES[style](_placed(SHAPES[class_name](rng), rng, size), rng, size)


def captions(class_name: str, style: str, neutral_words: Sequence[str] = ()) -> list[str]:
    """Every caption that describes a drawing of ``class_name`` in ``style``; each of
    ``neutral_words`` adds one that fits any style ("a picture of a ball.")."""
    return [template.format(class_name=class_name, style=style) for template in CAPTION_TEMPLATES] + [
        f"a {word} of a {class_name}." for word in neutral_words
    ]


def unknown_names(class_names: Sequence[str], styles: Sequence[str]) -> str | None:
    """A one-line complaint about names the world cannot draw, or None."""
    for kind, names, known in (("class", class_names, SHAPES), ("style", styles, STYLES)):
        unknown = [name for name in names if name not in known]
        if unknown:
            return f"{kind} names {unknown} cannot be drawn; allowed: {sorted(known)}"
    return None
