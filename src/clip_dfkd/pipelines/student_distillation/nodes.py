from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from clip_dfkd.errors import UserError
from clip_dfkd.models import StudentClassifier, create_student, load_zero_shot_teacher
from clip_dfkd.models.student import student_fingerprint
from clip_dfkd.params import (
    AugmentationParams,
    ClassNames,
    DistillationLossParams,
    ImageSynthesisParams,
    PromptGenerationParams,
    RuntimeParams,
    StudentDistillationParams,
    TeacherParams,
)
from clip_dfkd.rerun import kedro_run_command
from clip_dfkd.runtime import Runtime, seed_everything
from clip_dfkd.serving import register_student_model
from clip_dfkd.student_training import (
    FreshViews,
    MetricHistory,
    Mixup,
    StoredViews,
    TooFewTrainingImagesError,
    ViewedImages,
    fit_student,
    soft_label_loss,
    with_online_teacher,
)
from clip_dfkd.tracking import class_list_tags, shown_classes
from clip_dfkd.views import ViewRenderer

logger = logging.getLogger(__name__)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_embedding: torch.Tensor | None,
    teacher_embedding: torch.Tensor,
    params: DistillationLossParams,
) -> dict[str, torch.Tensor]:
    """``kd_weight`` · T² · KL(teacher_T ‖ student_T) + ``embedding_weight`` · alignment.

    Alignment is ``1 − cos`` between the projected student feature and the teacher's unit-norm
    image embedding.
    """
    kd = soft_label_loss(student_logits, teacher_logits, params.temperature)
    losses = {"kd": kd}
    total = params.kd_weight * kd
    if student_embedding is not None and params.embedding_weight > 0:
        projected = F.normalize(student_embedding.float(), dim=-1)
        alignment = (1 - (projected * teacher_embedding).sum(dim=-1)).mean()
        losses["embedding"] = alignment
        total = total + params.embedding_weight * alignment
    losses["total"] = total
    return losses


def train_student(
    images: dict[str, Callable[[], Image.Image]],
    teacher_labels: pd.DataFrame,
    teacher_view_labels: pd.DataFrame,
    classes: ClassNames,
    teacher: TeacherParams,
    params: StudentDistillationParams,
    runtime: RuntimeParams,
) -> tuple[StudentClassifier, MetricHistory]:
    """Train the student on views of the kept synthetic images against the teacher's
    outputs: on the whole image (``teacher_targets: centre``), on the stored view being
    replayed (``stored_views``) or on the step's own view, the teacher run alongside
    (``online``).

    Returns the student (on CPU, in eval mode) and per-epoch metrics in the shape
    kedro-mlflow's ``MlflowMetricsHistoryDataset`` logs.
    """
    resolved = Runtime.resolve(runtime)
    labels = teacher_labels[teacher_labels["kept"]].reset_index(drop=True)
    if labels.empty:
        raise TooFewTrainingImagesError(
            "teacher_labels keeps no image; lower teacher_labeling.filter.min_confidence or "
            "disable teacher_labeling.filter"
        )
    embedding_dim = len(labels["teacher_embedding"].iloc[0]) if params.loss.embedding_weight > 0 else None
    # The student's initial weights come from the training seed too.
    seed_everything(params.training.seed)
    student = create_student(params.student, list(classes), embedding_dim)

    def step_loss(logits, embedding, targets):
        teacher_logits, teacher_embedding = targets
        losses = distillation_loss(logits, teacher_logits, embedding, teacher_embedding, params.loss)
        return losses, {"teacher_agreement": (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()}

    if params.teacher_targets == "stored_views":
        views = stored_views(list(labels["image_id"]), teacher_view_labels, params.augmentation)
    elif params.teacher_targets == "online":
        teacher_model, head = load_zero_shot_teacher(teacher, resolved, classes)
        views = FreshViews(params.augmentation, [], teacher_view=teacher_model.view_renderer)
        step_loss = with_online_teacher(step_loss, partial(teacher_model.classify, weights=head))
    else:
        centre = [_stacked(labels["teacher_logits"]), _stacked(labels["teacher_embedding"])]
        views = FreshViews(params.augmentation, centre)
    training_images = ViewedImages(
        [images[image_id] for image_id in labels["image_id"]],
        ViewRenderer.for_student(student.config["data_config"]),
        views,
    )
    mix = Mixup(params.mixup, params.training.seed) if params.mixup > 0 else None
    history = fit_student(student, training_images, step_loss, params.training, resolved, "Distilling student", mix=mix)
    return student, history


class MissingViewLabelsError(UserError, ValueError):
    """teacher_view_labels lacks views of a training image, or was drawn with another augmentation."""


def stored_views(image_ids: list[str], view_labels: pd.DataFrame, augmentation: AugmentationParams) -> StoredViews:
    """The stored views of ``image_ids`` and the teacher's outputs on each, in that order.

    Raises:
        MissingViewLabelsError: an image has no views, images have different numbers of them, or
            they were drawn with another augmentation than ``augmentation``.
    """
    rerun = f"`{kedro_run_command(None, '--pipelines=teacher_labeling')}`"
    relabel = f"set teacher_labeling.views.per_image >= 1 and rerun {rerun}"
    drawn_with = set(view_labels["augmentation"])
    if drawn_with - {augmentation.model_dump_json()}:
        raise MissingViewLabelsError(
            f"student_distillation.augmentation={augmentation.model_dump(mode='json')}: teacher_view_labels were drawn "
            f"with {sorted(drawn_with)}; allowed: the same augmentation, or rerun {rerun}"
        )
    counts = view_labels["image_id"].value_counts()
    missing = [image_id for image_id in image_ids if image_id not in counts.index]
    if missing:
        raise MissingViewLabelsError(
            f"student_distillation.teacher_targets=stored_views: teacher_view_labels has no views of {len(missing)} "
            f"training images (first: {missing[0]!r}); {relabel}"
        )
    per_image = counts.loc[image_ids]
    if per_image.nunique() != 1:
        raise MissingViewLabelsError(
            f"teacher_view_labels: images have between {per_image.min()} and {per_image.max()} views; {relabel}"
        )
    rows = view_labels.set_index(["image_id", "view"]).sort_index().loc[image_ids]
    shape = (len(image_ids), int(per_image.iloc[0]))
    return StoredViews(
        _stacked(rows["view_params"]).unflatten(0, shape),
        [_stacked(rows["teacher_logits"]).unflatten(0, shape), _stacked(rows["teacher_embedding"]).unflatten(0, shape)],
    )


def _stacked(column: pd.Series) -> torch.Tensor:
    return torch.from_numpy(np.stack(column.to_numpy())).float()


def register_student(
    student: StudentClassifier,
    classes: ClassNames,
    teacher: TeacherParams,
    image_synthesis: ImageSynthesisParams,
    prompt_generation: PromptGenerationParams,
    params: StudentDistillationParams,
) -> dict[str, str]:
    """Log the student as an MLflow pyfunc model, register it and point the alias at it.

    The returned registration carries the weights' ``fingerprint`` (also a version tag), by
    which ood_evaluation matches the student it scores to this registered version.
    """
    fingerprint = student_fingerprint(student)
    teacher_name = f"open_clip:{teacher.display_name}"
    generator = (
        f"diffusion:{image_synthesis.generator.model_id}"
        if image_synthesis.backend == "diffusion"
        else f"inversion:{image_synthesis.inversion.parameterization}"
    )
    names = list(classes)
    registration = register_student_model(
        student,
        registered_name=params.registry.model_name,
        alias=params.registry.alias,
        onnx=params.registry.export_onnx,
        description=(
            f"A {params.student.architecture} classifier of {len(names)} classes ({shown_classes(names)}), distilled "
            f"from the CLIP teacher {teacher_name} on images synthesised by {generator} from "
            f"{prompt_generation.method} prompts; no real image. Its logged model carries the final epoch's "
            "training metrics (`training/*`) and, once evaluated, the evaluation's figures (`ood/*`)."
        ),
        # The catalog's student_distillation_metrics section.
        training_metrics=lambda key: key.startswith("training/"),
        tags={
            "teacher": teacher_name,
            "generator": generator,
            "prompt_method": prompt_generation.method,
            # ood_evaluation's promotion compares a version only with versions of the same list.
            **class_list_tags(names),
            "student": params.student.architecture,
            "fingerprint": fingerprint,
        },
    )
    return {**registration, "fingerprint": fingerprint}
