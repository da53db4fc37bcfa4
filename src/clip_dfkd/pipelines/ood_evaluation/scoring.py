"""Scoring on domain-shift benchmarks: the images per domain, the teacher's zero-shot and the
student's predictions on each, and per-domain top-1, agreement and ratio in one table."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import numpy as np
import pandas as pd
import torch

from clip_dfkd.benchmarks import scan_benchmark, skipped_at_root
from clip_dfkd.imaging import iterate_batches
from clip_dfkd.models import ClipTeacher, StudentClassifier, load_zero_shot_teacher
from clip_dfkd.params import DATA_FREE, ClassNames, OodEvaluationParams, RuntimeParams, TeacherParams
from clip_dfkd.progress import track
from clip_dfkd.runtime import FittingBatches, Runtime
from clip_dfkd.student_training import (
    StudentOutOfMemoryError,
)
from clip_dfkd.teacher_cache import TeacherOutputCache, teacher_output_key

logger = logging.getLogger(__name__)


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
