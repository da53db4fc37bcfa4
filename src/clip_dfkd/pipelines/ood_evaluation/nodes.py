from __future__ import annotations

import copy
import logging
import os
from functools import partial
from typing import Any

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from clip_dfkd.benchmarks import scan_benchmark, skipped_at_root
from clip_dfkd.errors import UserError
from clip_dfkd.imaging import CORRUPT_IMAGE_ERRORS, iterate_batches, open_rgb
from clip_dfkd.models import ClipTeacher, StudentClassifier, load_zero_shot_teacher
from clip_dfkd.models.student import student_fingerprint
from clip_dfkd.models.teacher import UnreadableImagesError
from clip_dfkd.params import DATA_FREE, ClassNames, OodEvaluationParams, RuntimeParams, TeacherParams
from clip_dfkd.progress import track
from clip_dfkd.promotion import promote_if_better
from clip_dfkd.runtime import FittingBatches, Runtime, seed_everything
from clip_dfkd.student_training import (
    FreshViews,
    MetricHistory,
    StoredViews,
    StudentOutOfMemoryError,
    ViewedImages,
    fit_student,
    soft_label_loss,
    with_online_teacher,
)
from clip_dfkd.teacher_cache import TeacherOutputCache, teacher_output_key
from clip_dfkd.tracking import describe_run
from clip_dfkd.views import ViewRenderer, views_of

logger = logging.getLogger(__name__)


class FewShotError(UserError, ValueError):
    """A few-shot setting the benchmark cannot serve; one line."""


METRICS = ["student_top1", "teacher_top1", "agreement", "student_teacher_ratio"]
TABLE_COLUMNS = ["setting", "benchmark", "domain", "images", "corrupt_images", "domains", *METRICS, "note"]
SKIPPED_COLUMNS = ["benchmark", "domain", "path", "reason"]
INDEX_COLUMNS = ["benchmark", "domain", "path", "label"]
NO_READABLE_IMAGE = "no readable image"


def index_benchmarks(classes: ClassNames, params: OodEvaluationParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every image of every enabled benchmark's chosen domains with its class index
    (``benchmark, domain, path, label``), and the files left out with the reason (not
    images, not inside a class folder, listed but missing, at the root but not a domain
    folder: those have no domain). Reads no image."""
    rows, skipped = [], []
    for name, benchmark in params.enabled_benchmarks().items():
        domains = scan_benchmark(name, benchmark, list(classes))
        skipped += [(name, "", str(path), reason) for path, reason in skipped_at_root(name, benchmark)]
        for domain in domains:
            if not domain.paths:
                # Keeps the domain in the report even when it has no image file at all.
                rows.append((name, domain.domain, None, -1))
            rows += [
                (name, domain.domain, str(path), label) for path, label in zip(domain.paths, domain.labels, strict=True)
            ]
            skipped += [(name, domain.domain, str(path), reason) for path, reason in domain.skipped]
    return pd.DataFrame(rows, columns=INDEX_COLUMNS), pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


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


def predict_teacher(
    benchmark_index: pd.DataFrame,
    classes: ClassNames,
    teacher: TeacherParams,
    params: OodEvaluationParams,
    runtime: RuntimeParams,
    cache: TeacherOutputCache,
) -> pd.DataFrame:
    """The teacher's zero-shot class index per benchmark image (``path, teacher_label,
    error``; -1 and the decoder's one-line error for an unreadable image).

    Each domain's outputs are cached under a key of everything they depend on (the teacher's
    model, weights, templates and precision, the class list, and every file's path, size and
    modification time), so evaluating another student runs no teacher pass (nor loads the
    teacher); any change makes a new key. The teacher is loaded at the first domain not in the
    cache and released when the node returns."""
    resolved = Runtime.resolve(runtime)
    teacher_model: ClipTeacher | None = None
    tables = []
    for (benchmark, domain), rows in _domains(benchmark_index):
        paths = rows["path"].tolist()
        key = teacher_output_key(teacher, resolved, list(classes), paths)
        if (cached := cache.get(key)) is not None:
            logger.info("%s/%s: teacher outputs from the cache (%s)", benchmark, domain, key[:12])
            tables.append(cached)
            continue
        if teacher_model is None:
            teacher_model, zero_shot_head = load_zero_shot_teacher(teacher, resolved, classes)
        table = _predict(
            paths,
            teacher_model.preprocess,
            partial(_zero_shot_labels, teacher_model, zero_shot_head),
            params.batch_size,
            teacher_model.runtime,
            f"teacher {benchmark}/{domain}",
            "teacher_label",
        )
        cache.put(key, table)
        tables.append(table)
    return _stacked(tables, "teacher_label")


def _zero_shot_labels(teacher_model: ClipTeacher, zero_shot_head: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    logits, _ = teacher_model.classify(pixels, zero_shot_head)
    return logits.argmax(-1)


def predict_student(
    benchmark_index: pd.DataFrame, student: StudentClassifier, params: OodEvaluationParams, runtime: RuntimeParams
) -> pd.DataFrame:
    """The student's class index per benchmark image (``path, student_label, error``), in
    mixed precision on an accelerator, decoding in DataLoader workers. A batch that does not
    fit in device memory is scored half as many images at a time, down to one, with a
    warning; later batches keep to the size that fitted."""
    resolved = Runtime.resolve(runtime)
    student = student.to(resolved.device, memory_format=resolved.memory_format).eval()

    def labels(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(resolved.device, non_blocking=True, memory_format=resolved.memory_format)
        with resolved.autocast():
            return student(pixels).argmax(-1)

    def warn(tried: int, fits: int) -> None:
        logger.warning("student: %d images at once do not fit in device memory; scoring %d at a time", tried, fits)

    def single_image_too_large() -> StudentOutOfMemoryError:
        return StudentOutOfMemoryError(
            f"ood_evaluation: out of device memory scoring a single image with the student in "
            f"{str(resolved.dtype).removeprefix('torch.')}; set runtime.precision=bf16 (or fp16)"
        )

    fitting = FittingBatches(warn, single_image_too_large)

    def classify(pixels: torch.Tensor) -> torch.Tensor:
        return fitting.run(pixels, labels, torch.cat)

    transform = student.eval_transform()
    tables = [
        _predict(
            rows["path"].tolist(), transform, classify, params.batch_size, resolved, f"student {b}/{d}", "student_label"
        )
        for (b, d), rows in _domains(benchmark_index)
    ]
    return _stacked(tables, "student_label")


def score_domains(
    benchmark_index: pd.DataFrame,
    listed_skips: pd.DataFrame,
    teacher_predictions: pd.DataFrame,
    student_predictions: pd.DataFrame,
    few_shot_index: pd.DataFrame,
    few_shot_predictions: pd.DataFrame,
    classes: ClassNames,
    params: OodEvaluationParams,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Score every domain in each setting: the data-free student on every indexed domain
    and, when ``few_shot.k`` > 0, the few-shot student on ``few_shot_index``'s domains.

    Returns one row per setting and domain: student top-1, teacher zero-shot top-1 (the
    ceiling), how often the two agree and the student/teacher ratio, over the readable
    images, with the unreadable ones counted as corrupt; a domain without any readable image
    has NaN scores and the note "no readable image". And one row per file left out
    (``benchmark, domain, path, reason``): the listed skips plus unreadable images with the
    decoder's one-line error. And one row per setting and evaluated image: its class and
    both models' predicted classes.
    """
    settings = [(DATA_FREE, benchmark_index, student_predictions)]
    if params.few_shot.k:
        settings.append((params.few_shot.describe(), few_shot_index, few_shot_predictions))
    rows, predictions = [], []
    for setting, index, students in settings:
        merged = index.merge(teacher_predictions, on="path", how="left").merge(
            students.drop(columns="error"), on="path", how="left"
        )
        rows += _domain_scores(setting, merged, listed_skips)
        predictions.append(_image_predictions(setting, merged, classes))
        if setting == DATA_FREE:
            unreadable = merged[merged["path"].notna() & (merged["error"] != "")]
            skipped = pd.concat(
                [listed_skips, unreadable.rename(columns={"error": "reason"})[SKIPPED_COLUMNS]], ignore_index=True
            )
    return pd.DataFrame(rows), skipped, pd.concat(predictions, ignore_index=True)


def _domain_scores(setting: str, merged: pd.DataFrame, listed_skips: pd.DataFrame) -> list[dict[str, Any]]:
    """One scored row per domain of ``merged`` (the index with both models' predictions)."""
    rows = []
    for (benchmark, domain), group in merged.groupby(["benchmark", "domain"], sort=False):
        files = group[group["path"].notna()]
        readable = files[files["error"] == ""]
        corrupt = len(files) - len(readable)
        evaluated = len(readable)
        # Every setting scores the same files; one warning per domain is enough.
        if setting == DATA_FREE and corrupt:
            logger.warning("%s/%s: skipped %d unreadable images", benchmark, domain, corrupt)
        if setting == DATA_FREE and not evaluated:
            others = int(((listed_skips["benchmark"] == benchmark) & (listed_skips["domain"] == domain)).sum())
            logger.warning(
                "%s/%s: no readable image (%d image files, %d other files); it is left out of the average",
                benchmark,
                domain,
                len(files),
                others,
            )
        student_top1 = (readable["student_label"] == readable["label"]).mean() if evaluated else np.nan
        teacher_top1 = (readable["teacher_label"] == readable["label"]).mean() if evaluated else np.nan
        rows.append(
            {
                "setting": setting,
                "benchmark": benchmark,
                "domain": domain,
                "images": evaluated,
                "corrupt_images": corrupt,
                "student_top1": student_top1,
                "teacher_top1": teacher_top1,
                "agreement": (readable["student_label"] == readable["teacher_label"]).mean() if evaluated else np.nan,
                "student_teacher_ratio": student_top1 / teacher_top1 if evaluated and teacher_top1 else np.nan,
                "note": "" if evaluated else NO_READABLE_IMAGE,
            }
        )
    return rows


def _image_predictions(setting: str, merged: pd.DataFrame, classes: ClassNames) -> pd.DataFrame:
    """One row per readable image: its class and both models' predicted class names."""
    evaluated = merged[merged["path"].notna() & (merged["error"] == "")]
    names = np.asarray(list(classes), dtype=object)
    return pd.DataFrame(
        {
            "setting": setting,
            "benchmark": evaluated["benchmark"],
            "domain": evaluated["domain"],
            "path": evaluated["path"],
            "class_name": names[evaluated["label"].to_numpy(int)],
            "student_prediction": names[evaluated["student_label"].to_numpy(int)],
            "teacher_prediction": names[evaluated["teacher_label"].to_numpy(int)],
        }
    )


def _domains(benchmark_index: pd.DataFrame):
    """``((benchmark, domain), rows with an image path)`` per domain, in index order."""
    files = benchmark_index[benchmark_index["path"].notna()]
    return files.groupby(["benchmark", "domain"], sort=False)


def _predict(
    paths: list[str],
    transform,
    classify,
    batch_size: int,
    runtime: Runtime,
    description: str,
    column: str,
) -> pd.DataFrame:
    """``classify`` (pixels → class indices) over the decoded images, in order: ``path``,
    the class index as ``column`` (-1 when unreadable) and ``error``."""
    predictions = np.full(len(paths), -1, dtype=np.int64)
    errors: dict[int, str] = {}
    batches = iterate_batches(paths, transform, batch_size, runtime.device, runtime.num_workers, errors)
    for indices, ok, pixels in track(batches, -(-len(paths) // batch_size), description, unit="batch"):
        if not bool(ok.all()):  # masking copies the batch (150 MB at 256 × 224 px): only when needed
            indices, pixels = indices[ok], pixels[ok.to(pixels.device)]
        if len(pixels):
            with torch.inference_mode():
                predictions[indices.numpy()] = classify(pixels).cpu().numpy()
    return pd.DataFrame({"path": paths, column: predictions, "error": [errors.get(i, "") for i in range(len(paths))]})


def _stacked(tables: list[pd.DataFrame], column: str) -> pd.DataFrame:
    """The per-domain prediction tables as one (with its columns even when there is none)."""
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path", column, "error"])


def summarise_evaluation(
    domain_results: pd.DataFrame, params: OodEvaluationParams
) -> tuple[pd.DataFrame, str, dict, dict]:
    """Per-domain rows plus each benchmark's mean over its domains that have readable images,
    per setting (data-free first), each row with its benchmark's folder (``root``, absolute);
    the same as Markdown, saying what each setting is and which folders were read; and every
    figure as an MLflow metric ``<benchmark>/<domain>/<metric>``, those of the data-free
    student and those of the few-shot one apart (each has its own section).

    ``domains`` says how many domains a row's scores cover: 1 for a domain with readable
    images, 0 for one without (its scores are NaN), and for an average the number averaged
    over, also spelled out in its note ("mean over 3 of 4 domains"). NaN scores are not
    logged as metrics.
    """
    counted = domain_results.assign(domains=(domain_results["images"] > 0).astype(int))
    averages = (
        counted.groupby(["setting", "benchmark"], sort=False)
        .agg(
            images=("images", "sum"),
            corrupt_images=("corrupt_images", "sum"),
            domains=("domains", "sum"),
            listed=("domain", "size"),
            # pandas' mean skips NaN, so domains without readable images do not count.
            **{metric: (metric, "mean") for metric in METRICS},
        )
        .reset_index()
        .assign(domain="average")
    )
    averages["note"] = [f"mean over {row.domains} of {row.listed} domains" for row in averages.itertuples()]
    # The share of the teacher's accuracy that the student reaches over the benchmark.
    averages["student_teacher_ratio"] = averages["student_top1"] / averages["teacher_top1"]
    table = pd.concat([counted[TABLE_COLUMNS], averages[TABLE_COLUMNS]], ignore_index=True)
    # Beside each benchmark, the folder it was read from: the comparison and the promotion tell
    # scores of two folders under one benchmark name apart by it.
    roots = {name: benchmark.resolved_root() for name, benchmark in params.benchmarks.items()}
    table.insert(table.columns.get_loc("benchmark") + 1, "root", table["benchmark"].map(roots))
    # Settings in the order scored (data-free first), each benchmark's domains then its average.
    order = {setting: i for i, setting in enumerate(dict.fromkeys(domain_results["setting"]))}
    table = table.sort_values(
        ["setting", "benchmark"],
        key=lambda column: column.map(order) if column.name == "setting" else column,
        kind="stable",
        ignore_index=True,
    )
    markdown = "\n".join(
        [
            "# Out-of-distribution evaluation",
            "",
            *[f"- **{setting}**: {_setting_description(setting, params)}" for setting in order],
            "",
            "Benchmark folders: " + "; ".join(f"{name} `{roots[name]}`" for name in dict.fromkeys(table["benchmark"])),
            "",
            table.drop(columns="root").to_markdown(index=False, floatfmt=".4f"),
            "",
        ]
    )
    data_free_metrics: dict[str, dict[str, float]] = {}
    few_shot_metrics: dict[str, dict[str, float]] = {}
    for row in table.itertuples():
        section = data_free_metrics if row.setting == DATA_FREE else few_shot_metrics
        for metric in [*METRICS, "corrupt_images"]:
            if not pd.isna(value := getattr(row, metric)):
                section[f"{row.benchmark}/{row.domain}/{metric}"] = {"value": float(value), "step": 0}
    for row in table.itertuples():
        if row.domains:
            logger.info(
                "%s, %s/%s: student top-1 %.4f, teacher top-1 %.4f, agreement %.4f%s",
                row.setting,
                row.benchmark,
                row.domain,
                row.student_top1,
                row.teacher_top1,
                row.agreement,
                f" ({row.note})" if row.note else "",
            )
        elif row.domain == "average":
            logger.warning("%s: no domain has a readable image; nothing to average", row.benchmark)
    return table, markdown, data_free_metrics, few_shot_metrics


def _setting_description(setting: str, params: OodEvaluationParams) -> str:
    if setting == DATA_FREE:
        return "the distilled student, which has seen no real image; every evaluated domain."
    few_shot = params.few_shot
    sources = ", ".join(few_shot.source_names())
    layers = "its classifier only" if few_shot.layers == "classifier" else "all its layers"
    interpolation = (
        f", weights {few_shot.interpolation:g} of the way to the fine-tuned ones" if few_shot.interpolation < 1 else ""
    )
    return (
        f"that student fine-tuned on {few_shot.k} real images per class drawn with seed {few_shot.seed} from "
        f"{sources} ({layers}, true class weight {few_shot.label_weight:g}, teacher soft labels weight "
        f"{few_shot.kd_weight:g} at T = {few_shot.temperature:g}, {few_shot.training.epochs} epochs"
        f"{interpolation}); scored on the other domains only."
    )


def per_class_accuracy(predictions: pd.DataFrame) -> pd.DataFrame:
    """Student and teacher top-1 per setting, benchmark, domain and class (``images`` of that
    class)."""
    scored = predictions.assign(
        student_correct=predictions["student_prediction"] == predictions["class_name"],
        teacher_correct=predictions["teacher_prediction"] == predictions["class_name"],
    )
    return (
        scored.groupby(["setting", "benchmark", "domain", "class_name"], sort=False)
        .agg(
            images=("path", "size"),
            student_top1=("student_correct", "mean"),
            teacher_top1=("teacher_correct", "mean"),
        )
        .reset_index()
    )


def plot_confusion_matrices(predictions: pd.DataFrame, classes: ClassNames) -> Figure:
    """One row per setting and benchmark: the student's and the teacher's confusion matrices
    over the domains scored in that setting, each row normalised by the true class's count."""
    names = list(classes)
    panels = list(dict.fromkeys(zip(predictions["setting"], predictions["benchmark"], strict=True)))
    side = min(12.0, 2.5 + 0.35 * len(names))
    figure, axes = plt.subplots(
        max(1, len(panels)),
        2,
        figsize=(2 * side, side * max(1, len(panels))),
        squeeze=False,
        constrained_layout=True,
    )
    index = {name: i for i, name in enumerate(names)}
    for row, (setting, benchmark) in zip(axes, panels, strict=False):
        rows = predictions[(predictions["setting"] == setting) & (predictions["benchmark"] == benchmark)]
        truth = rows["class_name"].map(index).to_numpy(int)
        for axis, column, model in (
            (row[0], "student_prediction", f"{setting} student"),
            (row[1], "teacher_prediction", "teacher"),
        ):
            matrix = np.zeros((len(names), len(names)))
            np.add.at(matrix, (truth, rows[column].map(index).to_numpy(int)), 1)
            matrix /= np.maximum(matrix.sum(axis=1, keepdims=True), 1)
            axis.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
            axis.set_title(f"{benchmark}: {model} ({len(rows)} images)")
            axis.set_xlabel("predicted")
            axis.set_ylabel("true")
            if len(names) <= 30:  # beyond that, labels would overprint each other
                axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
                axis.set_yticks(range(len(names)), names, fontsize=7)
                for (i, j), value in np.ndenumerate(matrix):
                    if value >= 0.005:
                        axis.text(
                            j,
                            i,
                            f"{value:.2f}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if value > 0.5 else "black",
                        )
    return figure


def plot_domain_accuracy(domain_results: pd.DataFrame) -> Figure:
    """Grouped bars per domain: the student's top-1 in each setting next to the teacher's
    zero-shot ceiling; a few-shot source domain has no few-shot bar."""
    benchmarks = list(dict.fromkeys(domain_results["benchmark"]))
    settings = list(dict.fromkeys(domain_results["setting"]))
    data_free = domain_results[domain_results["setting"] == DATA_FREE]
    figure, axes = plt.subplots(
        1,
        len(benchmarks),
        figsize=(max(4.0, (0.7 + 0.35 * len(settings)) * len(data_free) + 1.5), 3.6),
        squeeze=False,
        constrained_layout=True,
    )
    width = 0.8 / (len(settings) + 1)
    for axis, benchmark in zip(axes[0], benchmarks, strict=True):
        rows = data_free[data_free["benchmark"] == benchmark].set_index("domain")
        positions = np.arange(len(rows))
        bars = [
            (
                f"student ({setting})" if len(settings) > 1 else "student",
                domain_results[(domain_results["setting"] == setting) & (domain_results["benchmark"] == benchmark)]
                .set_index("domain")["student_top1"]
                .reindex(rows.index),
            )
            for setting in settings
        ]
        bars.append(("teacher (zero-shot)", rows["teacher_top1"]))
        for number, (label, values) in enumerate(bars):
            offset = (number - (len(bars) - 1) / 2) * width
            drawn = axis.bar(positions + offset, values.to_numpy(float), width, label=label)
            axis.bar_label(drawn, labels=["" if np.isnan(v) else f"{v:.2f}" for v in values], fontsize=7)
        # A domain without readable images has no bars, a few-shot source no few-shot bar; the
        # tick says why.
        scored_in_every_setting = set.intersection(*(set(values.dropna().index) for _, values in bars))
        ticks = [
            f"{d}\n({NO_READABLE_IMAGE})"
            if n == 0
            else d
            if d in scored_in_every_setting
            else f"{d}\n(few-shot source)"
            for d, n in zip(rows.index, rows["images"], strict=True)
        ]
        axis.set_xticks(positions, ticks, rotation=20)
        axis.set_ylim(0, 1.05)
        axis.set_title(benchmark)
        axis.set_ylabel("top-1 accuracy")
    # Below the panels: inside, the legend would cover the tallest bars.
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    return figure


def describe_evaluated_student(student: StudentClassifier, registration: dict[str, Any]) -> dict[str, Any]:
    """Which student the evaluation scored: its config, its weights' fingerprint and, when the
    saved registration (``student_registration``) carries the same fingerprint, the
    registered model name, version and MLflow run. A registration without a fingerprint, or
    with another one, may be for a different student (the student folder can be retrained or
    replaced after registering), so it is not claimed; ``reason`` says why."""
    fingerprint = student_fingerprint(student)
    record: dict[str, Any] = {
        "config": dict(student.config),
        "fingerprint": fingerprint,
        "registered_model": None,
        "version": None,
        "run_id": None,
        "reason": None,
    }
    registered = registration.get("fingerprint")
    if registered == fingerprint:
        record.update(
            registered_model=registration["name"], version=registration["version"], run_id=registration["run_id"]
        )
    elif registered is None:
        record["reason"] = (
            f"student_registration of {registration.get('name')} version {registration.get('version')} records "
            "no fingerprint, so it cannot be matched to the evaluated student"
        )
    else:
        record["reason"] = (
            f"student_registration of {registration.get('name')} version {registration.get('version')} is for a "
            f"student with fingerprint {registered}, not the evaluated {fingerprint}"
        )
    if record["reason"]:
        logger.warning("Evaluated student %s is not matched to a registered model: %s", fingerprint, record["reason"])
    return record


def promote_student(
    evaluated_student: dict[str, Any], evaluation_table: pd.DataFrame, report: str, params: OodEvaluationParams
) -> dict[str, Any]:
    """Record the evaluation on the scored student's registered version and move the
    promotion alias (``champion``) to it only when it beats the version holding it. Only the
    data-free rows score that version; a few-shot student is another model."""
    data_free = evaluation_table[evaluation_table["setting"] == DATA_FREE]
    decision = promote_if_better(evaluated_student, data_free, report, params)
    describe_run(decision, report)
    return decision
