"""Views (clip_dfkd.views): drawn as the training augmentation draws crops, flips and colour
jitter, and rendered the same way every time, at each model's size and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clip_dfkd.params import AugmentationParams
from clip_dfkd.views import VIEW_FIELDS, WHOLE_IMAGE, ViewRenderer, draw_views, image_tensor, views_of

NO_AUGMENTATION = AugmentationParams(crop_scale=(1.0, 1.0), horizontal_flip=False, color_jitter=0.0)


def _image(seed: int = 0, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_views_follow_the_augmentation_params() -> None:
    views = draw_views(
        2000, AugmentationParams(crop_scale=(0.5, 1.0), color_jitter=0.3), torch.Generator().manual_seed(0)
    )
    fields = dict(zip(VIEW_FIELDS, views.T, strict=True))

    area = fields["height"] * fields["width"]
    assert area.min() >= 0.5 - 1e-6 and area.max() <= 1.0 + 1e-6
    assert (fields["top"] + fields["height"]).max() <= 1 + 1e-6 and (fields["left"] + fields["width"]).max() <= 1 + 1e-6
    assert 0.4 < fields["flip"].mean() < 0.6
    for factor in ("brightness", "contrast", "saturation"):
        assert fields[factor].min() >= 0.7 - 1e-6 and fields[factor].max() <= 1.3 + 1e-6
        assert fields[factor].std() > 0.1
    # Without augmentation every view is the whole image, as it is.
    plain = draw_views(50, NO_AUGMENTATION, torch.Generator().manual_seed(0))
    assert torch.equal(plain, WHOLE_IMAGE.expand(50, -1))


def test_an_image_views_depend_on_its_id_and_the_seed_alone() -> None:
    augmentation = AugmentationParams()
    assert torch.equal(views_of("a", 4, augmentation, 0), views_of("a", 4, augmentation, 0))
    assert not torch.equal(views_of("a", 4, augmentation, 0), views_of("b", 4, augmentation, 0))
    assert not torch.equal(views_of("a", 4, augmentation, 0), views_of("a", 4, augmentation, 1))


def test_a_view_is_rendered_from_its_box_flip_and_colours() -> None:
    renderer = ViewRenderer(size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
    image = image_tensor(_image())

    whole = renderer(image, WHOLE_IMAGE)
    resized = image_tensor(_image().resize((16, 16), Image.Resampling.BILINEAR))
    assert whole.shape == (3, 16, 16)
    assert (whole * 255 - resized.float()).abs().mean() < 2  # PIL's and torch's antialiased resize agree

    left_half = renderer(image, torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0]))
    mirrored_right_half = renderer(image.flip(-1), torch.tensor([0.0, 0.5, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(left_half, mirrored_right_half, atol=1e-6)

    darker = renderer(image, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(darker, whole * 0.5, atol=1e-6)
    # The same view of the same image gives the same pixels, bit for bit.
    view = views_of("x", 1, AugmentationParams(), 0)[0]
    assert torch.equal(renderer(image, view), renderer(image, view))


def test_renderers_take_each_model_s_size_and_normalisation() -> None:
    student = ViewRenderer.for_student({"input_size": [3, 24, 24], "mean": [0.5] * 3, "std": [0.25] * 3})
    teacher = ViewRenderer.for_open_clip({"size": (32, 32), "mean": (0.4,) * 3, "std": (0.2,) * 3})
    image = image_tensor(Image.new("RGB", (40, 40), (255, 255, 255)))

    assert student(image, WHOLE_IMAGE).shape == (3, 24, 24)
    assert torch.allclose(student(image, WHOLE_IMAGE), torch.full((3, 24, 24), 2.0))
    assert teacher.interpolation == "bicubic" and teacher(image, WHOLE_IMAGE).shape == (3, 32, 32)
    assert torch.allclose(teacher(image, WHOLE_IMAGE), torch.full((3, 32, 32), 3.0), atol=1e-5)


@pytest.mark.parametrize("size", [(40, 30), (30, 40)])
def test_views_of_oblong_images_stay_inside_them(size) -> None:
    renderer = ViewRenderer(size=8, mean=(0.0,) * 3, std=(1.0,) * 3)
    image = image_tensor(Image.new("RGB", size))
    for view in draw_views(100, AugmentationParams(crop_scale=(0.08, 1.0)), torch.Generator().manual_seed(1)):
        assert renderer(image, view).shape == (3, 8, 8)
