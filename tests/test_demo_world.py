"""The demo's world: drawings decided by their seed, a teacher that is kept only when it
learned, and a config that names only what the world can draw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, demo_asset_params, merge_params

from clip_dfkd.demo.assets import DemoAssetsParams, DemoTeacherError, held_out_domains, train_demo_teacher
from clip_dfkd.demo.world import STYLES, captions, draw
from clip_dfkd.errors import UserError
from clip_dfkd.params import InvalidParameterError


def test_a_drawing_depends_on_its_seed_only() -> None:
    for style in STYLES:
        once = np.asarray(draw("kite", style, 7, 32))
        again = np.asarray(draw("kite", style, 7, 32))
        other = np.asarray(draw("kite", style, 8, 32))

        assert once.shape == (32, 32, 3), style
        assert np.array_equal(once, again), style
        assert not np.array_equal(once, other), style


def test_the_session_teacher_learned_its_styles_and_was_never_shown_night(demo_asset_project: Path) -> None:
    params = demo_asset_params()
    card = json.loads((demo_asset_project / params.teacher_checkpoint).with_suffix(".json").read_text())

    assert card["training_styles"] == ["photo", "sketch", "cartoon"] and card["unseen_styles"] == ["night"]
    assert card["unseen_styles"] == held_out_domains(params)
    accuracy = card["zero_shot_top1_on_fresh_drawings"]
    assert min(accuracy[s] for s in card["training_styles"]) >= params.teacher_training.min_accuracy
    assert accuracy["night"] > 0.5  # chance is 0.25


def test_a_benchmark_without_held_out_domains_is_refused_on_one_line() -> None:
    raw = demo_asset_params().model_dump(mode="json")
    raw["benchmark_domains"] = ["photo", "sketch"]

    with pytest.raises(UserError) as caught:
        held_out_domains(DemoAssetsParams.model_validate(raw))

    assert str(caught.value) == (
        "demo_assets.benchmark_domains=['photo', 'sketch']: every domain is one of the teacher's "
        "training styles; allowed: at least one domain outside demo_assets.teacher_training.styles"
    )


def test_a_teacher_that_did_not_learn_is_refused_and_not_saved(tmp_path: Path) -> None:
    raw = demo_asset_params().model_dump(mode="json")
    raw["teacher_training"].update(steps=2, images_per_class_and_style=4, check_images_per_class_and_style=10)
    checkpoint = tmp_path / "teacher.safetensors"

    with pytest.raises(DemoTeacherError) as caught:
        train_demo_teacher(checkpoint, DemoAssetsParams.model_validate(raw))

    message = str(caught.value)
    assert message.startswith("demo_assets.seed=0: the demo teacher reached only ")
    assert "needs demo_assets.teacher_training.min_accuracy=85%" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_names_the_world_cannot_draw_fail_on_one_line() -> None:
    raw = demo_asset_params().model_dump(mode="json")
    raw["benchmark_classes"] = ["ball", "giraffe"]

    with pytest.raises(InvalidParameterError) as caught:
        DemoAssetsParams.model_validate(raw)

    assert str(caught.value) == (
        "demo_assets.benchmark_classes=['ball', 'giraffe']: class names ['giraffe'] cannot be drawn; "
        "allowed: ['ball', 'box', 'kite', 'star', 'tent']"
    )


@pytest.mark.parametrize("world", sorted((REPO_ROOT / "benchmarks" / "worlds").glob("*.yml")), ids=lambda p: p.stem)
def test_a_benchmark_world_holds_out_domains_that_no_caption_or_prompt_names(world: Path) -> None:
    overrides = yaml.safe_load(world.read_text())
    raw = merge_params(demo_asset_params().model_dump(mode="json"), overrides["demo_assets"])
    params = DemoAssetsParams.model_validate(raw)
    training = params.teacher_training
    texts = [
        *(
            c
            for name in params.benchmark_classes
            for s in training.styles
            for c in captions(name, s, training.neutral_words)
        ),
        *overrides["teacher"]["templates"],
        *overrides["prompt_generation"]["styles"],
    ]

    held_out = held_out_domains(params)
    assert len(held_out) >= 2
    assert [(d, t) for d in held_out for t in texts if d in t] == []
    # The benchmark's seen domains are named, which is how a caption would leak a held-out one.
    assert any(d in t for d in params.benchmark_domains if d not in held_out for t in texts)
