from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from clip_dfkd.models import ClipTeacher, load_zero_shot_teacher
from clip_dfkd.models.teacher import UnreadableImagesError
from clip_dfkd.params import (
    AugmentationParams,
    ClassNames,
    RuntimeParams,
    StudentDistillationParams,
    TeacherLabelingParams,
    TeacherParams,
    ViewLabelingParams,
)
from clip_dfkd.runtime import Runtime
from clip_dfkd.styles import diversity_metrics
from clip_dfkd.views import views_of, views_table

logger = logging.getLogger(__name__)


def label_images(
    images: dict[str, Callable[[], Image.Image]],
    manifest: pd.DataFrame,
    classes: ClassNames,
    teacher: TeacherParams,
    params: TeacherLabelingParams,
    student_distillation: StudentDistillationParams,
    runtime: RuntimeParams,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`teacher_labels` and :func:`teacher_view_labels` (views drawn with the student's
    augmentation) from the teacher, loaded once for this node alone: it is released when the
    node returns, so it never shares the device with the generator or the student."""
    teacher_model, head = load_zero_shot_teacher(teacher, Runtime.resolve(runtime), classes)
    labels = teacher_labels(images, manifest, teacher_model, head, teacher.batch_size, params)
    views = teacher_view_labels(
        images, manifest, teacher_model, head, teacher.batch_size, params.views, student_distillation.augmentation
    )
    return labels, views


def missing_images(images: Mapping[str, Any], manifest: pd.DataFrame) -> str | None:
    """Which images of ``manifest`` are not among ``images``, or None."""
    missing = [image_id for image_id in manifest["image_id"] if image_id not in images]
    if not missing:
        return None
    return (
        f"synthetic_images lacks {len(missing)} of the {len(manifest)} images in synthesis_manifest "
        f"(first: {missing[0]!r})"
    )


def teacher_labels(
    images: dict[str, Callable[[], Image.Image]],
    manifest: pd.DataFrame,
    teacher_model: ClipTeacher,
    zero_shot_head: torch.Tensor,
    batch_size: int,
    params: TeacherLabelingParams,
) -> pd.DataFrame:
    """Teacher logits, prediction, confidence and normalised embeddings for every manifest image, by
    the zero-shot head ``(num_classes, embedding_dim)`` (:meth:`ClipTeacher.zero_shot_weights`).

    With ``filter.enabled``, rows the teacher does not recognise as their intended class (or
    recognises with less than ``min_confidence``) get ``kept = False``; they stay in the table
    so that the drop is visible per class and style.
    """
    # The preflight checks saved images and manifest, and says what to rerun.
    if problem := missing_images(images, manifest):
        raise ValueError(problem)
    sources = [images[image_id] for image_id in manifest["image_id"]]
    try:
        logits, embeddings = teacher_model.classify_images(sources, zero_shot_head, batch_size, "Teacher labelling")
    except UnreadableImagesError:
        raise ValueError("a synthetic image could not be decoded; delete it and rerun image_synthesis") from None
    probabilities = logits.softmax(dim=-1)
    confidence, prediction = probabilities.max(dim=-1)

    labels = manifest[["image_id", "class_name", "class_index", "style", "method"]].copy()
    labels["teacher_logits"] = list(logits.numpy().astype(np.float32))
    labels["teacher_embedding"] = list(embeddings.numpy().astype(np.float32))
    labels["teacher_prediction"] = prediction.numpy()
    labels["teacher_confidence"] = confidence.numpy()
    labels["teacher_agrees"] = labels["teacher_prediction"] == labels["class_index"]
    labels["kept"] = _keep_mask(labels, params)
    return labels


def teacher_view_labels(
    images: dict[str, Callable[[], Image.Image]],
    manifest: pd.DataFrame,
    teacher_model: ClipTeacher,
    zero_shot_head: torch.Tensor,
    batch_size: int,
    params: ViewLabelingParams,
    augmentation: AugmentationParams,
) -> pd.DataFrame:
    """``params.per_image`` augmented views of every manifest image (:func:`views_of`) with
    the teacher's logits and embedding on each: one row per view (``image_id``, ``view``,
    ``view_params``, ``teacher_logits``, ``teacher_embedding``), in manifest order; the
    augmentation they were drawn with is recorded in ``augmentation`` (JSON), so a student
    replays them only with the augmentation it was configured with. No rows for
    ``per_image: 0``."""
    columns = ["image_id", "view", "view_params", "teacher_logits", "teacher_embedding", "augmentation"]
    if not params.per_image:
        return _with_attrs_of(manifest, pd.DataFrame(columns=columns))
    image_ids = list(manifest["image_id"])
    views = torch.stack([views_of(image_id, params.per_image, augmentation, params.seed) for image_id in image_ids])
    logits, embeddings = teacher_model.classify_views(
        [images[image_id] for image_id in image_ids], views, zero_shot_head, batch_size, "Teacher labelling views"
    )
    table = pd.DataFrame(views_table(image_ids, views))
    table["teacher_logits"] = list(logits.flatten(0, 1).numpy().astype(np.float32))
    table["teacher_embedding"] = list(embeddings.flatten(0, 1).numpy().astype(np.float32))
    table["augmentation"] = augmentation.model_dump_json()
    return _with_attrs_of(manifest, table[columns])


def _with_attrs_of(manifest: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``table`` carrying the manifest's attributes (the class list it was made for)."""
    table.attrs.update(manifest.attrs)
    return table


def _keep_mask(labels: pd.DataFrame, params: TeacherLabelingParams) -> pd.Series:
    keep = pd.Series(True, index=labels.index)
    if not params.filter.enabled:
        return keep
    if params.filter.require_intended_class:
        keep &= labels["teacher_agrees"]
    keep &= labels["teacher_confidence"] >= params.filter.min_confidence
    return keep


def summarise_labels(labels: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per class and style: images, how many the filter kept and dropped, how often the
    teacher saw the intended class; plus run-level metrics for MLflow."""
    summary = (
        labels.groupby(["class_name", "style"], sort=False)
        .agg(
            images=("image_id", "size"),
            kept=("kept", "sum"),
            teacher_agreement=("teacher_agrees", "mean"),
            mean_confidence=("teacher_confidence", "mean"),
        )
        .reset_index()
    )
    summary["dropped"] = summary["images"] - summary["kept"]
    dropped = summary[summary["dropped"] > 0]
    if len(dropped):
        logger.info(
            "Teacher filter dropped %d of %d images:\n%s",
            int(summary["dropped"].sum()),
            len(labels),
            dropped[["class_name", "style", "images", "dropped"]].to_string(index=False),
        )
    else:
        logger.info("Teacher filter kept all %d images", len(labels))
    metrics = {
        "images": float(len(labels)),
        "kept": float(labels["kept"].sum()),
        "intended_class_agreement": float(labels["teacher_agrees"].mean()),
        "mean_confidence": float(labels["teacher_confidence"].mean()),
    }
    return summary, {name: {"value": value, "step": 0} for name, value in metrics.items()}


def measure_image_diversity(labels: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The prompt-diversity metric on the images: mean pairwise cosine distance of the
    teacher's embeddings of each class's synthetic images, and its mean over classes."""
    embeddings = torch.from_numpy(np.stack(labels["teacher_embedding"].to_numpy()))
    return diversity_metrics("synthetic images", embeddings, list(labels["class_name"]))
