"""The demo's world: shapes drawn in several styles, and captions that describe them.

Each class is a shape and each style a way of drawing it, so that a tiny CLIP trained here on
some styles has real knowledge to pass on, and a style it never saw is a real domain shift.
Every image comes from its own ``random.Random``, so a drawing depends only on its seed.
"""

from __future__ import annotations

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


# How each style draws a placed outline.
STYLES: dict[str, Callable[[list[Point], random.Random, int], Image.Image]] = {
    "photo": _photo,
    "sketch": _sketch,
    "cartoon": _cartoon,
    "night": _night,
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


def captions(class_name: str, style: str) -> list[str]:
    """Every caption that describes a drawing of ``class_name`` in ``style``."""
    return [template.format(class_name=class_name, style=style) for template in CAPTION_TEMPLATES]


def unknown_names(class_names: Sequence[str], styles: Sequence[str]) -> str | None:
    """A one-line complaint about names the world cannot draw, or None."""
    for kind, names, known in (("class", class_names, SHAPES), ("style", styles, STYLES)):
        unknown = [name for name in names if name not in known]
        if unknown:
            return f"{kind} names {unknown} cannot be drawn; allowed: {sorted(known)}"
    return None
