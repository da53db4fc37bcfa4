"""The student: a timm classifier that carries its class names and preprocessing.

``save_pretrained``/``from_pretrained`` mirror diffusers: a folder with ``config.json`` and
``model.safetensors`` is all that is needed to rebuild and run the student.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms import v2 as T

from clip_dfkd.models.errors import ModelNotFoundError
from clip_dfkd.params import AugmentationParams, StudentParams

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class StudentClassifier(nn.Module):
    """A timm backbone with a classifier over ``class_names`` and, for embedding alignment,
    an optional linear projection of its pooled features to the teacher's embedding size."""

    def __init__(
        self,
        model_name: str,
        class_names: Sequence[str],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        embedding_dim: int | None = None,
        checkpoint_path: str | None = None,
    ) -> None:
        super().__init__()
        import timm

        self.config: dict[str, Any] = {
            "model_name": model_name,
            "class_names": list(class_names),
            "image_size": image_size,
            "mean": list(mean),
            "std": list(std),
            "embedding_dim": embedding_dim,
        }
        overlay = {"file": checkpoint_path} if checkpoint_path else None
        self.backbone = timm.create_model(
            model_name,
            pretrained=checkpoint_path is not None,
            pretrained_cfg_overlay=overlay,
            num_classes=len(class_names),
        )
        self.projection = nn.Linear(self.backbone.num_features, embedding_dim) if embedding_dim else None

    @property
    def class_names(self) -> list[str]:
        return self.config["class_names"]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)

    def forward_distill(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and, when a projection head exists, the projected pooled features."""
        pooled = self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)
        logits = self.backbone.get_classifier()(pooled)
        projected = self.projection(pooled) if self.projection is not None else None
        return logits, projected

    def eval_transform(self) -> T.Compose:
        size = self.config["image_size"]
        return T.Compose(
            [
                T.ToImage(),
                T.Resize(size, antialias=True),
                T.CenterCrop(size),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(self.config["mean"], self.config["std"]),
            ]
        )

    def train_transform(self, augmentation: AugmentationParams) -> T.Compose:
        size = self.config["image_size"]
        steps: list[Any] = [T.ToImage(), T.RandomResizedCrop(size, scale=augmentation.crop_scale, antialias=True)]
        if augmentation.horizontal_flip:
            steps.append(T.RandomHorizontalFlip())
        if augmentation.color_jitter > 0:
            jitter = augmentation.color_jitter
            steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(self.config["mean"], self.config["std"])]
        return T.Compose(steps)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> StudentClassifier:
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{directory}: no {CONFIG_NAME}; not a saved clip-dfkd student")
        student = cls(**json.loads((directory / CONFIG_NAME).read_text()))
        student.load_state_dict(load_file(directory / WEIGHTS_NAME, device=str(device)))
        return student.to(device).eval()


def missing_student_weights(params: StudentParams) -> str | None:
    """Why the student's initial weights cannot be loaded, or None (also when it trains from scratch)."""
    if params.checkpoint_path is None or Path(params.checkpoint_path).expanduser().is_file():
        return None
    return (
        f"student_distillation.student.checkpoint_path={params.checkpoint_path!r}: no such file; "
        f"allowed: local timm/ImageNet weights for {params.model_name} (.safetensors/.pth) or null "
        "to train from scratch"
    )


def create_student(
    params: StudentParams, class_names: Sequence[str], embedding_dim: int | None = None
) -> StudentClassifier:
    """A fresh student; ImageNet-initialised when ``params.checkpoint_path`` is set."""
    import timm

    if problem := missing_student_weights(params):
        raise ModelNotFoundError(problem)
    checkpoint = str(Path(params.checkpoint_path).expanduser()) if params.checkpoint_path else None
    # Normalise as the backbone's pretraining did, so ImageNet initialisation stays meaningful.
    pretrained_cfg = timm.models.get_pretrained_cfg(params.model_name)
    mean = pretrained_cfg.mean if pretrained_cfg else timm.data.IMAGENET_DEFAULT_MEAN
    std = pretrained_cfg.std if pretrained_cfg else timm.data.IMAGENET_DEFAULT_STD
    student = StudentClassifier(
        params.model_name,
        class_names,
        image_size=params.image_size,
        mean=mean,
        std=std,
        embedding_dim=embedding_dim,
        checkpoint_path=checkpoint,
    )
    logger.info(
        "Student %s: %.1fM parameters, %d classes",
        params.model_name,
        sum(p.numel() for p in student.parameters()) / 1e6,
        len(class_names),
    )
    return student
