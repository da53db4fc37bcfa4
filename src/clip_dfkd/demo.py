"""The offline demo's assets: tiny seeded models and a small multi-domain benchmark.

Nothing can be downloaded here, so ``kedro run --env=demo`` builds these on first use and
then loads them through the same code as real models (open_clip with a checkpoint path,
diffusers ``from_pretrained`` on a folder). Random tiny models prove the machinery, not
accuracy.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import PositiveInt

from clip_dfkd.atomic import atomic_directory
from clip_dfkd.params import Params

logger = logging.getLogger(__name__)


class DemoAssetsParams(Params):
    """Where the demo's tiny models and benchmark live (relative to the project root)."""

    section: ClassVar[str] = "demo_assets"

    seed: int = 0
    teacher_checkpoint: str
    generator_dir: str
    benchmark_root: str
    benchmark_domains: list[str]
    benchmark_classes: list[str]
    images_per_class: PositiveInt = 4
    image_size: PositiveInt = 48


def ensure_demo_assets(params: DemoAssetsParams, project_path: Path) -> None:
    """Build whichever demo asset is missing; existing ones are left as they are."""
    from clip_dfkd.models.tiny import build_tiny_clip, build_tiny_stable_diffusion

    teacher = project_path / params.teacher_checkpoint
    if not teacher.is_file():
        logger.info("Demo: building the tiny open_clip teacher at %s", teacher)
        build_tiny_clip(teacher, seed=params.seed)
    generator = project_path / params.generator_dir
    if not (generator / "model_index.json").is_file():
        logger.info("Demo: building the tiny Stable Diffusion pipeline at %s", generator)
        build_tiny_stable_diffusion(generator, seed=params.seed)
    benchmark = project_path / params.benchmark_root
    if not benchmark.is_dir():
        logger.info("Demo: drawing the multi-domain benchmark at %s", benchmark)
        draw_demo_benchmark(benchmark, params)


def draw_demo_benchmark(root: Path, params: DemoAssetsParams) -> None:
    """Each class is a shape, each domain a way of drawing it (filled photo-like texture,
    line sketch, flat cartoon, night), so the domains really differ."""
    rng = random.Random(params.seed)
    with atomic_directory(root) as staging:
        for d, domain in enumerate(params.benchmark_domains):
            for c, class_name in enumerate(params.benchmark_classes):
                folder = staging / domain / class_name
                folder.mkdir(parents=True)
                for n in range(params.images_per_class):
                    _draw(c, d, rng, params.image_size).save(folder / f"{n:03d}.png")


def _draw(shape: int, style: int, rng: random.Random, size: int) -> Image.Image:
    background = [(235, 235, 235), (255, 255, 255), (250, 230, 120), (40, 40, 60)][style % 4]
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    margin = rng.randint(size // 8, size // 4)
    box = (margin + rng.randint(-3, 3), margin + rng.randint(-3, 3), size - margin, size - margin)
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    fill = None if style % 4 == 1 else colour
    outline = (0, 0, 0) if style % 4 in (1, 2) else colour
    kind = shape % 4
    if kind == 0:
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif kind == 1:
        draw.rectangle(box, fill=fill, outline=outline, width=2)
    elif kind == 2:
        draw.polygon(
            [(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill, outline=outline, width=2
        )
    else:
        draw.line([(box[0], box[1]), (box[2], box[3])], fill=outline, width=3)
        draw.line([(box[0], box[3]), (box[2], box[1])], fill=outline, width=3)
    if style % 4 == 0:  # photo-like: texture and blur
        noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = Image.blend(image, Image.fromarray(noise), 0.25).filter(ImageFilter.GaussianBlur(0.8))
    return image
