"""``student_distillation`` (conf/base/parameters_student_distillation.yml)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from clip_dfkd.params.base import Params, bad_value
from clip_dfkd.params.shared import ScaleRange


class StudentParams(Params):
    """A timm classifier; ``checkpoint_path`` optionally initialises it from local ImageNet weights."""

    model_name: str
    # Keyword arguments of timm.create_model(model_name), saved with the student: a narrower or
    # shallower variant of a family (e.g. resnet10t with channels: [8, 16, 32, 64]).
    model_kwargs: dict[str, Any] = {}
    checkpoint_path: str | None = None
    image_size: PositiveInt = 224

    @field_validator("model_name")
    @classmethod
    def _known_timm_model(cls, name: str) -> str:
        import timm

        if not timm.is_model(name):
            raise ValueError(
                "is not a timm model; allowed: a name from timm.list_models() "
                "(e.g. resnet18, resnet50, mobilenetv3_large_100, efficientnet_b0)"
            )
        return name

    @property
    def architecture(self) -> str:
        """The timm name, followed by its keyword arguments where there are any."""
        if not self.model_kwargs:
            return self.model_name
        return f"{self.model_name}({', '.join(f'{key}={value}' for key, value in self.model_kwargs.items())})"

    @model_validator(mode="after")
    def _model_kwargs_build(self) -> StudentParams:
        """Builds the architecture on the meta device (no memory, no weights), so a keyword
        timm does not take fails here rather than after synthesis and labelling."""
        if not self.model_kwargs:
            return self
        import timm
        import torch

        try:
            with torch.device("meta"):
                timm.create_model(self.model_name, num_classes=2, **self.model_kwargs)
        except Exception as exc:  # timm raises TypeError, ValueError, KeyError, ... by family
            raise bad_value(
                "model_kwargs",
                self.model_kwargs,
                f"timm.create_model({self.model_name!r}) refused them ({type(exc).__name__}: {exc}); "
                "allowed: keyword arguments of that model's constructor",
            ) from None
        return self


class DistillationLossParams(Params):
    temperature: PositiveFloat = 4.0
    kd_weight: float = Field(default=1.0, ge=0.0)
    # Weight of 1 − cos(student projection, teacher embedding). (A squared L2 distance between
    # the two unit vectors would be exactly twice it: a weight, not another loss.)
    embedding_weight: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _some_signal(self) -> DistillationLossParams:
        if self.kd_weight == 0 and self.embedding_weight == 0:
            raise bad_value("kd_weight", 0, "kd_weight and embedding_weight are both 0; allowed: at least one > 0")
        return self


# Where the teacher's targets for a training step come from: its outputs on the whole image
# (``centre``, computed once), on views of the image stored ahead with their outputs and
# replayed exactly (``stored_views``), or the teacher run on the step's own views (``online``).
TeacherTargets = Literal["centre", "stored_views", "online"]


class AugmentationParams(Params):
    crop_scale: ScaleRange = (0.5, 1.0)
    horizontal_flip: bool = True
    color_jitter: float = Field(default=0.3, ge=0.0)


class TrainingParams(Params):
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    learning_rate: PositiveFloat = 1e-3
    weight_decay: float = Field(default=0.05, ge=0.0)
    seed: int = 0

    @field_validator("batch_size")
    @classmethod
    def _batch_norm_needs_two(cls, batch_size: int) -> int:
        # A batch-norm layer in training mode normalises by the batch's statistics: one image
        # has none (timm's ResNets fail outright once the feature map is 1 x 1).
        if batch_size < 2:
            raise ValueError("a training batch needs at least 2 images (batch-norm statistics); allowed: >= 2")
        return batch_size


class RegistryParams(Params):
    model_name: str = Field(default="clip-dfkd-student", min_length=1)
    alias: str = Field(default="candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    # Also log the student as ONNX beside the registered model (a few seconds per run).
    export_onnx: bool = True


class StudentDistillationParams(Params):
    section: ClassVar[str] = "student_distillation"

    student: StudentParams
    training: TrainingParams = TrainingParams()
    loss: DistillationLossParams = DistillationLossParams()
    augmentation: AugmentationParams = AugmentationParams()
    teacher_targets: TeacherTargets = "stored_views"
    # Mixup between a batch's views (Beta(mixup, mixup) weights, one per image; 0: off), for
    # the teacher run online on the same mixed images ("function matching", Beyer et al. 2022).
    mixup: float = Field(default=0.0, ge=0.0)
    registry: RegistryParams = RegistryParams()

    @model_validator(mode="after")
    def _mixup_needs_the_teacher_online(self) -> StudentDistillationParams:
        if self.mixup > 0 and self.teacher_targets != "online":
            raise bad_value(
                "mixup",
                self.mixup,
                f"mixed images have no stored targets (teacher_targets is {self.teacher_targets!r}); allowed: 0, "
                "or teacher_targets online",
            )
        return self
