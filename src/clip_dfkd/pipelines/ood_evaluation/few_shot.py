"""Few-shot: k labelled images per class from one domain, drawn reproducibly, and the student
fine-tuned on them (its classifier, or all of it) with the teacher's soft labels."""

from __future__ import annotations

import copy
import logging
import os

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from clip_dfkd.errors import UserError
from clip_dfkd.imaging import CORRUPT_IMAGE_ERRORS, open_rgb
from clip_dfkd.models import ClipTeacher, StudentClassifier, load_zero_shot_teacher
from clip_dfkd.models.teacher import UnreadableImagesError
from clip_dfkd.params import ClassNames, OodEvaluationParams, RuntimeParams, TeacherParams
from clip_dfkd.runtime import Runtime, seed_everything
from clip_dfkd.student_training import (
    FreshViews,
    MetricHistory,
    StoredViews,
    ViewedImages,
    fit_student,
    soft_label_loss,
    with_online_teacher,
)
from clip_dfkd.views import ViewRenderer, views_of

logger = logging.getLogger(__name__)


class FewShotError(UserError, ValueError):
    """A few-shot setting the benchmark cannot serve; one line."""


def draw_few_shot(
    benchmark_index: pd.DataFrame, classes: ClassNames, params: OodEvaluationParams
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The few-shot split: ``few_shot.k`` readable images per class drawn with
    ``few_shot.seed`` from the source domains (rows of the index), and the index of the
    domains the few-shot student is scored on: every other evaluated domain, less any file
    that is one of the drawn images under another name (a link). Both empty when k = 0.

    Raises:
        FewShotError: a source domain that was not indexed, no domain left to score, or a
            class with fewer than k readable images in the source domains (preflight has
            counted the image files; only decoding finds those that are unreadable).
    """
    few_shot = params.few_shot
    if not few_shot.k:
        return benchmark_index.iloc[:0], benchmark_index.iloc[:0]
    found = benchmark_index.groupby("benchmark", sort=False)["domain"].unique()
    if problem := params.few_shot_source_error({name: list(domains) for name, domains in found.items()}):
        raise FewShotError(problem)
    sources = {(b, domain) for b, domains in few_shot.source_domains.items() for domain in domains}
    is_source = pd.Series(
        [pair in sources for pair in zip(benchmark_index["benchmark"], benchmark_index["domain"], strict=True)],
        index=benchmark_index.index,
        dtype=bool,
    )
    pool = benchmark_index[is_source & benchmark_index["path"].notna()]
    rng = np.random.default_rng(few_shot.seed)
    drawn, readable = [], {}
    for label, name in enumerate(classes):
        candidates = pool.index[pool["label"] == label]
        taken = []
        # Decodes only until k readable images are found: a source domain can be large.
        for index in candidates[rng.permutation(len(candidates))]:
            if len(taken) == few_shot.k:
                break
            if _readable(pool.at[index, "path"]):
                taken.append(index)
        # Counts are complete for a class short of k: all its candidates were decoded.
        found = pool.loc[taken, "benchmark"] + "/" + pool.loc[taken, "domain"]
        readable[name] = {source: int((found == source).sum()) for source in few_shot.source_names()}
        drawn += taken
    if problem := params.few_shot_shortage_error(readable, "readable images"):
        raise FewShotError(problem)
    shots = benchmark_index.loc[drawn].reset_index(drop=True)
    held_out = benchmark_index[~is_source]
    # A held-out file that is a drawn image under another name (a link, a copy by hard link)
    # would be scored after training on it.
    drawn_files = {os.path.realpath(path) for path in shots["path"]}
    linked = held_out["path"].map(lambda path: isinstance(path, str) and os.path.realpath(path) in drawn_files)
    if linked.any():
        logger.warning(
            "few-shot: %d held-out files are drawn training images under another name; not scored: %s",
            int(linked.sum()),
            held_out.loc[linked, "path"].tolist()[:5],
        )
    logger.info(
        "few-shot: %d images (%d per class) from %s; the few-shot student is scored on %d images of %s",
        len(shots),
        few_shot.k,
        few_shot.source_domains,
        int(held_out["path"].notna().sum() - linked.sum()),
        sorted({f"{b}/{d}" for b, d in zip(held_out["benchmark"], held_out["domain"], strict=True)}),
    )
    return shots, held_out[~linked].reset_index(drop=True)


def _readable(path: str) -> bool:
    try:
        open_rgb(path)
    except CORRUPT_IMAGE_ERRORS:
        return False
    return True


def fine_tune_student(
    student: StudentClassifier,
    shots: pd.DataFrame,
    classes: ClassNames,
    teacher: TeacherParams,
    params: OodEvaluationParams,
    runtime: RuntimeParams,
) -> tuple[StudentClassifier, MetricHistory]:
    """The few-shot student: a copy of the distilled student fine-tuned on views of the drawn
    real images against their true class (``label_weight`` · cross-entropy) and the teacher's
    zero-shot logits (``kd_weight`` · T² · KL) on the whole image or on the very view trained
    on (``teacher_targets``, as in distillation), all its layers or the classifier only
    (``layers``), its weights then taken ``interpolation`` of the way from the distilled
    student's to the fine-tuned ones, with its per-epoch metrics. With k = 0 the distilled student itself,
    untouched, and no metrics."""
    few_shot = params.few_shot
    if not few_shot.k:
        return student, {}
    resolved = Runtime.resolve(runtime)
    paths = shots["path"].tolist()
    labels = torch.as_tensor(shots["label"].to_numpy(), dtype=torch.long)

    def step_loss(logits, embedding, batch_targets):
        labels = batch_targets[0]
        losses = {"label": F.cross_entropy(logits, labels)}
        measures = {"label_accuracy": (logits.argmax(-1) == labels).float().mean()}
        total = few_shot.label_weight * losses["label"]
        if few_shot.kd_weight > 0:
            teacher_logits = batch_targets[1]
            losses["kd"] = soft_label_loss(logits, teacher_logits, few_shot.temperature)
            measures["teacher_agreement"] = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
            total = total + few_shot.kd_weight * losses["kd"]
        losses["total"] = total
        return losses, measures

    if few_shot.kd_weight == 0:
        views = FreshViews(few_shot.augmentation, [labels])
    else:
        teacher_model, head = load_zero_shot_teacher(teacher, resolved, classes)
        if few_shot.teacher_targets == "online":
            views = FreshViews(few_shot.augmentation, [labels], teacher_view=teacher_model.view_renderer)
            step_loss = with_online_teacher(step_loss, lambda pixels: teacher_model.classify(pixels, head)[:1])
        else:
            views = _few_shot_teacher_views(paths, labels, teacher_model, head, params)
            # The teacher's work is done: it does not share the device with the training.
            del teacher_model
    seed_everything(few_shot.training.seed)
    tuned = copy.deepcopy(student).cpu()
    if few_shot.layers == "classifier":
        trained = {id(parameter) for parameter in tuned.backbone.get_classifier().parameters()}
        for parameter in tuned.parameters():
            parameter.requires_grad_(id(parameter) in trained)
    images = ViewedImages(paths, ViewRenderer.for_student(tuned.config["data_config"]), views)
    history = fit_student(
        tuned,
        images,
        step_loss,
        few_shot.training,
        resolved,
        f"Fine-tuning ({few_shot.describe()})",
        freeze_batch_norm=few_shot.freeze_batch_norm,
    )
    return interpolated(student, tuned, few_shot.interpolation).requires_grad_(True), history


def interpolated(start: torch.nn.Module, tuned: torch.nn.Module, share: float) -> torch.nn.Module:
    """``tuned`` with every floating-point weight and buffer moved back to ``start``'s but for
    ``share`` of the way (integer buffers, e.g. batch-norm step counts, stay ``tuned``'s)."""
    if share == 1:
        return tuned
    start_state = start.state_dict()
    with torch.no_grad():
        for name, value in tuned.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.lerp(start_state[name].to(value), value, share))
    return tuned


def _few_shot_teacher_views(
    paths: list[str], labels: torch.Tensor, teacher_model: ClipTeacher, head: torch.Tensor, params: OodEvaluationParams
) -> FreshViews | StoredViews:
    """The few-shot images' targets, true class and the teacher's logits: on the whole image
    (``centre``), or on ``views_per_image`` stored views of each."""
    few_shot = params.few_shot
    try:
        if few_shot.teacher_targets == "centre":
            logits, _ = teacher_model.classify_images(paths, head, params.batch_size, "Teacher soft labels")
            return FreshViews(few_shot.augmentation, [labels, logits.float()])
        views = torch.stack(
            [views_of(path, few_shot.views_per_image, few_shot.augmentation, few_shot.seed) for path in paths]
        )
        logits, _ = teacher_model.classify_views(paths, views, head, params.batch_size, "Teacher labelling views")
    except (UnreadableImagesError, *CORRUPT_IMAGE_ERRORS) as exc:
        # The images were drawn readable; a file changed since is an error, not a gap.
        raise FewShotError(f"few-shot images became unreadable while fine-tuning: {exc}") from None
    return StoredViews(views, [labels[:, None].expand(views.shape[:2]), logits.float()])
