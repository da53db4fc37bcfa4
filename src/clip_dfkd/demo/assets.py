"""The offline demo's assets: a tiny teacher that knows a small world, a tiny random
generator, and a multi-domain benchmark of that world.

Nothing can be downloaded here, so ``kedro run --env=demo`` builds these on first use and
then loads them through the same code as real models (open_clip with a checkpoint path,
diffusers ``from_pretrained`` on a folder). The teacher is trained here, through open_clip,
on drawings of the world (:mod:`clip_dfkd.demo.world`) in some of its styles; the benchmark
draws every style, so a style the teacher never saw measures transfer to an unseen domain.
The generator stays random: it is the contrast, a generator that knows nothing.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from clip_dfkd.atomic import atomic_directory, atomic_file
from clip_dfkd.demo.world import captions, draw, unknown_names
from clip_dfkd.errors import UserError
from clip_dfkd.params.base import Params, bad_value

logger = logging.getLogger(__name__)


class DemoTeacherError(UserError):
    """The demo teacher did not learn its world well enough to be worth distilling."""


class DemoTeacherTrainingParams(Params):
    """How the demo teacher learns its world, and the bar it must clear to be kept."""

    section: ClassVar[str] = "demo_assets.teacher_training"

    # The styles the teacher is trained on; benchmark domains outside this list are unseen.
    styles: list[str] = Field(min_length=1)
    # Words its captions also use for a drawing in any style: "picture" adds "a picture of a
    # ball.", a neutral prompt the teacher understands (the vanilla baseline's style word).
    neutral_words: list[str] = []
    images_per_class_and_style: PositiveInt = 300
    steps: PositiveInt = 800
    batch_size: PositiveInt = 128
    learning_rate: PositiveFloat = 2e-3
    # Zero-shot top-1 the teacher must reach on fresh drawings of its training styles.
    min_accuracy: float = Field(default=0.85, gt=0.0, le=1.0)
    check_images_per_class_and_style: PositiveInt = 50


class DemoAssetsParams(Params):
    """Where the demo's tiny models and benchmark live (relative to the project root), and
    how they are made."""

    section: ClassVar[str] = "demo_assets"

    seed: int = 0
    teacher_checkpoint: str
    generator_dir: str
    benchmark_root: str
    benchmark_domains: list[str]
    benchmark_classes: list[str]
    images_per_class: PositiveInt = 25
    image_size: PositiveInt = 32
    teacher_training: DemoTeacherTrainingParams

    @model_validator(mode="after")
    def _drawable(self) -> DemoAssetsParams:
        problem = unknown_names(self.benchmark_classes, [*self.benchmark_domains, *self.teacher_training.styles])
        if problem:
            raise bad_value("benchmark_classes", self.benchmark_classes, problem)
        return self


def held_out_domains(params: DemoAssetsParams) -> list[str]:
    """The benchmark domains the teacher was not trained on (no caption names them).

    Raises:
        UserError: there are none, so nothing measures transfer to an unseen domain.
    """
    held_out = [d for d in params.benchmark_domains if d not in params.teacher_training.styles]
    if not held_out:
        raise UserError(
            f"demo_assets.benchmark_domains={params.benchmark_domains}: every domain is one of the teacher's "
            "training styles; allowed: at least one domain outside demo_assets.teacher_training.styles"
        )
    return held_out


def ensure_demo_assets(params: DemoAssetsParams, project_path: Path) -> None:
    """Build whichever demo asset is missing; existing ones are left as they are."""
    from clip_dfkd.demo.tiny_models import build_tiny_stable_diffusion

    teacher = project_path / params.teacher_checkpoint
    if not teacher.is_file():
        logger.info("Demo: training the tiny open_clip teacher on its world at %s", teacher)
        train_demo_teacher(teacher, params)
    generator = project_path / params.generator_dir
    if not (generator / "model_index.json").is_file():
        logger.info("Demo: building the tiny (random) Stable Diffusion pipeline at %s", generator)
        build_tiny_stable_diffusion(generator, seed=params.seed)
    benchmark = project_path / params.benchmark_root
    if not benchmark.is_dir():
        logger.info("Demo: drawing the multi-domain benchmark at %s", benchmark)
        draw_demo_benchmark(benchmark, params)


def _seeds(purpose: str, seed: int, class_name: str, style: str, count: int) -> list[int]:
    """Drawing seeds for one purpose; training, checking and the benchmark never share one
    (``random.Random`` seeded with a string is the same in every process)."""
    rng = random.Random(f"{purpose}/{seed}/{class_name}/{style}")
    return [rng.randrange(2**31) for _ in range(count)]


def _pixels(class_name: str, style: str, seeds: list[int], size: int) -> torch.Tensor:
    drawings = np.stack([np.asarray(draw(class_name, style, s, size)) for s in seeds])
    return torch.from_numpy(drawings).permute(0, 3, 1, 2).float() / 255


def train_demo_teacher(checkpoint: Path, params: DemoAssetsParams) -> dict:
    """Train the tiny teacher on drawings of its training styles, check it on fresh drawings
    of every style, and save it (with a card of what it measured beside it) only if it
    reached ``min_accuracy`` on its training styles.

    Raises:
        DemoTeacherError: it did not; nothing is written.
    """
    from clip_dfkd.demo.tiny_models import save_clip_checkpoint, train_tiny_clip

    training = params.teacher_training
    classes = params.benchmark_classes
    started = time.perf_counter()
    images, rows = [], []
    for class_name in classes:
        for style in training.styles:
            seeds = _seeds("teacher-training", params.seed, class_name, style, training.images_per_class_and_style)
            images.append(_pixels(class_name, style, seeds, params.image_size))
            rows += [(class_name, style)] * len(seeds)

    def described(class_name: str, style: str) -> list[str]:
        return captions(class_name, style, training.neutral_words)

    world_captions = sorted(
        {c for class_name in classes for style in training.styles for c in described(class_name, style)}
    )
    index = {caption: i for i, caption in enumerate(world_captions)}
    positives = torch.zeros(len(rows), len(world_captions), dtype=torch.bool)
    for row, (class_name, style) in enumerate(rows):
        positives[row, [index[c] for c in described(class_name, style)]] = True
    model = train_tiny_clip(
        torch.cat(images),
        world_captions,
        positives,
        seed=params.seed,
        steps=training.steps,
        batch_size=training.batch_size,
        learning_rate=training.learning_rate,
    )
    accuracy = _zero_shot_accuracy(model, params)
    seen = [accuracy[style] for style in training.styles]
    card = {
        "model": "clip-dfkd-tiny",
        "seed": params.seed,
        "classes": classes,
        "training_styles": training.styles,
        "unseen_styles": [s for s in params.benchmark_domains if s not in training.styles],
        "zero_shot_top1_on_fresh_drawings": accuracy,
        "training_seconds": round(time.perf_counter() - started, 1),
        **training.model_dump(mode="json", exclude={"styles"}),
    }
    logger.info("Demo teacher: zero-shot top-1 on fresh drawings %s", {s: f"{a:.0%}" for s, a in accuracy.items()})
    if min(seen) < training.min_accuracy:
        raise DemoTeacherError(
            f"demo_assets.seed={params.seed}: the demo teacher reached only {min(seen):.0%} zero-shot top-1 on fresh "
            f"drawings of its training styles (needs demo_assets.teacher_training.min_accuracy="
            f"{training.min_accuracy:.0%}); try another seed or more steps"
        )
    save_clip_checkpoint(model, checkpoint)
    with atomic_file(checkpoint.with_suffix(".json")) as staging:
        staging.write_text(json.dumps(card, indent=2) + "\n")
    return card


@torch.inference_mode()
def _zero_shot_accuracy(model: torch.nn.Module, params: DemoAssetsParams) -> dict[str, float]:
    """Top-1 of the class-name prompts ("a ball.") on fresh drawings of every style."""
    import open_clip
    import torch.nn.functional as F

    training = params.teacher_training
    classes = params.benchmark_classes
    tokens = open_clip.get_tokenizer("clip-dfkd-tiny")([f"a {name}." for name in classes])
    text = F.normalize(model.encode_text(tokens), dim=-1)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    accuracy = {}
    for style in dict.fromkeys([*training.styles, *params.benchmark_domains]):
        correct = 0
        for label, class_name in enumerate(classes):
            seeds = _seeds("teacher-check", params.seed, class_name, style, training.check_images_per_class_and_style)
            pixels = _pixels(class_name, style, seeds, params.image_size)
            predicted = (F.normalize(model.encode_image((pixels - mean) / std), dim=-1) @ text.T).argmax(dim=-1)
            correct += int((predicted == label).sum())
        accuracy[style] = round(correct / (len(classes) * training.check_images_per_class_and_style), 4)
    return accuracy


def draw_demo_benchmark(root: Path, params: DemoAssetsParams) -> None:
    """``<root>/<domain>/<class>/<n>.png``: every class in every domain, from seeds that
    neither the teacher's training nor its check used."""
    with atomic_directory(root) as staging:
        for domain in params.benchmark_domains:
            for class_name in params.benchmark_classes:
                folder = staging / domain / class_name
                folder.mkdir(parents=True)
                seeds = _seeds("benchmark", params.seed, class_name, domain, params.images_per_class)
                for n, seed in enumerate(seeds):
                    draw(class_name, domain, seed, params.image_size).save(folder / f"{n:03d}.png")
