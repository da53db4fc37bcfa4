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


def test_mixup_shows_both_models_the_same_mixed_image() -> None:
    """Mixing two views (the student's pixels, and by the same pairs and weights the teacher's)
    gives each model its own rendering of the mixed images: function matching holds."""
    from clip_dfkd.student_training import Mixup

    student = ViewRenderer(size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic")
    teacher = ViewRenderer(size=12, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), interpolation="bicubic")
    rng = np.random.default_rng(0)
    images = [image_tensor(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))) for _ in range(6)]
    # Crops and flips, no colour jitter: its clamp to [0, 1] is the one step that is not linear.
    views = draw_views(6, AugmentationParams(crop_scale=(0.5, 1.0), color_jitter=0.0), torch.Generator().manual_seed(0))
    labels = torch.arange(6)

    mixed_student, (same_labels, mixed_teacher) = Mixup(1.0, seed=3)(
        torch.stack([student(image, view) for image, view in zip(images, views, strict=True)]),
        [labels, torch.stack([teacher(image, view) for image, view in zip(images, views, strict=True)])],
    )

    assert torch.equal(same_labels, labels)
    # Recover each mixed image's weight and partner from the student's pixels, then check the
    # teacher's pixels against the teacher's rendering of that same mixture of the two images.
    for row in range(6):
        candidates = []
        for partner in range(6):
            a, b = student(images[row], views[row]), student(images[partner], views[partner])
            weight = ((mixed_student[row] - b) * (a - b)).sum() / ((a - b) ** 2).sum().clamp_min(1e-12)
            error = (weight * a + (1 - weight) * b - mixed_student[row]).abs().max()
            candidates.append((float(error), partner, float(weight)))
        error, partner, weight = min(candidates)
        assert error < 1e-4
        expected = weight * teacher(images[row], views[row]) + (1 - weight) * teacher(images[partner], views[partner])
        torch.testing.assert_close(mixed_teacher[row], expected, atol=1e-4, rtol=0)
    assert not torch.allclose(mixed_student, torch.stack([student(i, v) for i, v in zip(images, views, strict=True)]))
