"""Augmented views that the teacher and the student see alike.

A view is eight numbers: a crop box as fractions of the image (``top, left, height, width``),
a horizontal flip (0 or 1) and colour-jitter factors (``brightness, contrast, saturation``;
1 leaves the colour as it is). Because a view is data rather than the random state of a
transform, the teacher can be run on exactly the view the student trains on: now, on the
student's batch (``online``), or ahead of training, with its outputs stored beside the view
and replayed (``stored_views``, as MobileCLIP's reinforced datasets store teacher outputs per
augmentation). Beyer et al. 2022 (*Knowledge distillation: a good teacher is patient and
consistent*) show that this "function matching" is what lets a student follow its teacher.

Each model renders a view at its own input size and normalisation (:class:`ViewRenderer`);
the same view and image always give the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from clip_dfkd.params import AugmentationParams

VIEW_FIELDS = ("top", "left", "height", "width", "flip", "brightness", "contrast", "saturation")
# The whole image, unflipped, with its own colours: what teacher_labels' outputs are computed on.
WHOLE_IMAGE = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
# RandomResizedCrop's aspect-ratio range (torchvision's and timm's default).
_ASPECT_RATIOS = (3 / 4, 4 / 3)


def draw_views(count: int, augmentation: AugmentationParams, generator: torch.Generator) -> torch.Tensor:
    """``(count, 8)`` views drawn as torchvision's ``RandomResizedCrop`` (timm's training
    transform) draws crops: up to 10 tries of a box covering a ``crop_scale`` share of the
    image at an aspect ratio in [3/4, 4/3], the first that fits inside the image, else the whole
    image; then a flip half the time when ``horizontal_flip``, and jitter factors in
    ``[1 - color_jitter, 1 + color_jitter]``. The same generator state gives the same views."""
    tries = 10
    low, high = augmentation.crop_scale
    area = torch.empty(count, tries).uniform_(low, high, generator=generator)
    log_ratio = torch.empty(count, tries).uniform_(*(math.log(r) for r in _ASPECT_RATIOS), generator=generator)
    width = (area * log_ratio.exp()).sqrt()
    height = (area / log_ratio.exp()).sqrt()
    fits = (width <= 1) & (height <= 1)
    first = fits.float().argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    width = torch.where(found, width.gather(1, first).squeeze(1), torch.ones(count))
    height = torch.where(found, height.gather(1, first).squeeze(1), torch.ones(count))
    top = torch.rand(count, generator=generator) * (1 - height)
    left = torch.rand(count, generator=generator) * (1 - width)
    flip = (torch.rand(count, generator=generator) < 0.5).float() * float(augmentation.horizontal_flip)
    jitter = augmentation.color_jitter
    factors = torch.empty(count, 3).uniform_(max(0.0, 1 - jitter), 1 + jitter, generator=generator)
    return torch.cat([torch.stack([top, left, height, width, flip], dim=1), factors], dim=1)


def views_of(image_id: str, count: int, augmentation: AugmentationParams, seed: int) -> torch.Tensor:
    """``count`` views of one image, decided by ``seed`` and the image's id alone, so that an
    image's views do not depend on which other images are labelled with it, or in what order."""
    from clip_dfkd.naming import stable_seed

    return draw_views(count, augmentation, torch.Generator().manual_seed(stable_seed(seed, "views", image_id)))


@dataclass(frozen=True)
class ViewRenderer:
    """Renders a view of a uint8 ``(3, H, W)`` image as one model's input: the crop resized to
    ``size`` × ``size`` with ``interpolation`` (antialiased), flipped, colour-jittered in [0, 1]
    (brightness, then contrast, then saturation, as torchvision defines each) and normalised
    with ``mean`` and ``std``."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @classmethod
    def for_student(cls, data_config: Mapping[str, Any]) -> ViewRenderer:
        """The student's input as timm's data config describes it."""
        return cls(
            int(data_config["input_size"][-1]),
            tuple(data_config["mean"]),
            tuple(data_config["std"]),
            data_config.get("interpolation", "bilinear"),
        )

    @classmethod
    def for_open_clip(cls, preprocess_cfg: Mapping[str, Any]) -> ViewRenderer:
        """An open_clip image tower's input (``model.visual.preprocess_cfg``)."""
        size = preprocess_cfg["size"]
        return cls(
            int(size if isinstance(size, int) else size[-1]),
            tuple(preprocess_cfg["mean"]),
            tuple(preprocess_cfg["std"]),
            preprocess_cfg.get("interpolation", "bicubic"),
        )

    def __call__(self, image: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top, left, box_height, box_width, flip, brightness, contrast, saturation = view.tolist()
        box_top, box_left = round(top * height), round(left * width)
        box_height = min(max(1, round(box_height * height)), height - box_top)
        box_width = min(max(1, round(box_width * width)), width - box_left)
        crop = TF.resized_crop(
            image,
            box_top,
            box_left,
            box_height,
            box_width,
            [self.size, self.size],
            interpolation=InterpolationMode(self.interpolation),
            antialias=True,
        )
        pixels = crop.float() / 255
        if flip:
            pixels = pixels.flip(-1)
        # Each adjustment is the identity at factor 1; skipping it then keeps pixels bit-equal.
        if brightness != 1:
            pixels = TF.adjust_brightness(pixels, brightness)
        if contrast != 1:
            pixels = TF.adjust_contrast(pixels, contrast)
        if saturation != 1:
            pixels = TF.adjust_saturation(pixels, saturation)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (pixels - mean) / std


def image_tensor(image) -> torch.Tensor:
    """A decoded RGB image (PIL) as a uint8 ``(3, H, W)`` tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def views_table(image_ids: Sequence[str], views: torch.Tensor) -> dict[str, list]:
    """Columns ``image_id``, ``view`` (its index among the image's views) and ``view_params``
    (float32 rows of :data:`VIEW_FIELDS`) for ``views`` of shape ``(images, per_image, 8)``."""
    per_image = views.shape[1]
    return {
        "image_id": [image_id for image_id in image_ids for _ in range(per_image)],
        "view": [k for _ in image_ids for k in range(per_image)],
        "view_params": list(views.reshape(-1, len(VIEW_FIELDS)).numpy().astype(np.float32)),
    }
