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
from clip_dfkd.params import ClassNames, RuntimeParams, TeacherLabelingParams, TeacherParams
from clip_dfkd.runtime import Runtime
from clip_dfkd.styles import diversity_metrics

logger = logging.getLogger(__name__)


def label_images(
    images: dict[str, Callable[[], Image.Image]],
    manifest: pd.DataFrame,
    classes: ClassNames,
    teacher: TeacherParams,
    params: TeacherLabelingParams,
    runtime: RuntimeParams,
) -> pd.DataFrame:
    """:func:`teacher_labels` from the teacher, loaded for this node alone: it is released
    when the node returns, so it never shares the device with the generator or the student."""
    teacher_model, head = load_zero_shot_teacher(teacher, Runtime.resolve(runtime), classes)
    return teacher_labels(images, manifest, teacher_model, head, teacher.batch_size, params)


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
    """Teacher logits, probabilities and normalised embeddings for every manifest image, by
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
    labels["teacher_probs"] = list(probabilities.numpy().astype(np.float32))
    labels["teacher_embedding"] = list(embeddings.numpy().astype(np.float32))
    labels["teacher_prediction"] = prediction.numpy()
    labels["teacher_confidence"] = confidence.numpy()
    labels["teacher_agrees"] = labels["teacher_prediction"] == labels["class_index"]
    labels["kept"] = _keep_mask(labels, params)
    return labels


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
