from __future__ import annotations

import logging
from typing import Any

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from clip_dfkd.benchmarks import scan_benchmark
from clip_dfkd.imaging import iterate_batches
from clip_dfkd.models import ClipTeacher, StudentClassifier
from clip_dfkd.models.student import student_fingerprint
from clip_dfkd.params import ClassNames, OodEvaluationParams, RuntimeParams, TeacherParams
from clip_dfkd.promotion import promote_if_better
from clip_dfkd.runtime import Runtime
from clip_dfkd.teacher_cache import TeacherOutputCache, teacher_output_key

logger = logging.getLogger(__name__)

METRICS = ["student_top1", "teacher_top1", "agreement", "student_teacher_ratio"]
TABLE_COLUMNS = ["benchmark", "domain", "images", "corrupt_images", "domains", *METRICS, "note"]
SKIPPED_COLUMNS = ["benchmark", "domain", "path", "reason"]
INDEX_COLUMNS = ["benchmark", "domain", "path", "label"]
NO_READABLE_IMAGE = "no readable image"


def index_benchmarks(classes: ClassNames, params: OodEvaluationParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every image of every enabled benchmark's chosen domains with its class index
    (``benchmark, domain, path, label``), and the files left out with the reason (not
    images, not inside a class folder, listed but missing). Reads no image."""
    rows, skipped = [], []
    for name, benchmark in params.enabled_benchmarks().items():
        for domain in scan_benchmark(name, benchmark, list(classes)):
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
    teacher_model: ClipTeacher,
    zero_shot_head: torch.Tensor,
    classes: ClassNames,
    teacher: TeacherParams,
    params: OodEvaluationParams,
    cache: TeacherOutputCache,
) -> pd.DataFrame:
    """The teacher's zero-shot class index per benchmark image (``path, teacher_label,
    error``; -1 and the decoder's one-line error for an unreadable image).

    Each domain's outputs are cached under a key of everything they depend on (the teacher's
    model, weights, templates and precision, the class list, and every file's path, size and
    modification time), so evaluating another student runs no teacher pass; any change
    makes a new key."""
    tables = []
    for (benchmark, domain), rows in _domains(benchmark_index):
        paths = rows["path"].tolist()
        key = teacher_output_key(teacher, teacher_model.runtime, list(classes), paths)
        if (cached := cache.get(key)) is not None:
            logger.info("%s/%s: teacher outputs from the cache (%s)", benchmark, domain, key[:12])
            tables.append(cached)
            continue

        def classify(pixels: torch.Tensor) -> torch.Tensor:
            logits, _ = teacher_model.classify(pixels, zero_shot_head)
            return logits.argmax(-1)

        table = _predict(
            paths,
            teacher_model.preprocess,
            classify,
            params.batch_size,
            teacher_model.runtime,
            f"teacher {benchmark}/{domain}",
            "teacher_label",
        )
        cache.put(key, table)
        tables.append(table)
    return _stacked(tables, "teacher_label")


def predict_student(
    benchmark_index: pd.DataFrame, student: StudentClassifier, params: OodEvaluationParams, runtime: RuntimeParams
) -> pd.DataFrame:
    """The student's class index per benchmark image (``path, student_label, error``), in
    mixed precision on an accelerator, decoding in DataLoader workers."""
    resolved = Runtime.resolve(runtime)
    student = student.to(resolved.device).eval()

    def classify(pixels: torch.Tensor) -> torch.Tensor:
        with resolved.autocast():
            return student(pixels.to(resolved.device, non_blocking=True)).argmax(-1)

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
    classes: ClassNames,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Score every domain.

    Returns one row per domain: student top-1, teacher zero-shot top-1 (the ceiling), how
    often the two agree and the student/teacher ratio, over the readable images, with the
    unreadable ones counted as corrupt; a domain without any readable image has NaN scores
    and the note "no readable image". And one row per file left out (``benchmark, domain,
    path, reason``): the listed skips plus unreadable images with the decoder's one-line
    error. And one row per evaluated image: its class and both models' predicted classes.
    """
    merged = benchmark_index.merge(teacher_predictions, on="path", how="left").merge(
        student_predictions.drop(columns="error"), on="path", how="left"
    )
    rows = []
    for (benchmark, domain), group in merged.groupby(["benchmark", "domain"], sort=False):
        files = group[group["path"].notna()]
        readable = files[files["error"] == ""]
        corrupt = len(files) - len(readable)
        if corrupt:
            logger.warning("%s/%s: skipped %d unreadable images", benchmark, domain, corrupt)
        evaluated = len(readable)
        if not evaluated:
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
    unreadable = merged[merged["path"].notna() & (merged["error"] != "")]
    skipped = pd.concat(
        [listed_skips, unreadable.rename(columns={"error": "reason"})[SKIPPED_COLUMNS]], ignore_index=True
    )
    evaluated = merged[merged["path"].notna() & (merged["error"] == "")]
    names = np.asarray(list(classes), dtype=object)
    predictions = pd.DataFrame(
        {
            "benchmark": evaluated["benchmark"],
            "domain": evaluated["domain"],
            "path": evaluated["path"],
            "class_name": names[evaluated["label"].to_numpy(int)],
            "student_prediction": names[evaluated["student_label"].to_numpy(int)],
            "teacher_prediction": names[evaluated["teacher_label"].to_numpy(int)],
        }
    ).reset_index(drop=True)
    return pd.DataFrame(rows), skipped, predictions


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
    batches = iterate_batches(
        paths,
        [transform],
        batch_size,
        num_workers=runtime.num_workers,
        errors=errors,
        pin_memory=runtime.device.type == "cuda",
    )
    for indices, ok, (pixels,) in tqdm(batches, desc=description, total=-(-len(paths) // batch_size), unit="batch"):
        if bool(ok.any()):
            with torch.inference_mode():
                predictions[indices[ok].numpy()] = classify(pixels[ok]).cpu().numpy()
    return pd.DataFrame({"path": paths, column: predictions, "error": [errors.get(i, "") for i in range(len(paths))]})


def _stacked(tables: list[pd.DataFrame], column: str) -> pd.DataFrame:
    """The per-domain prediction tables as one (with its columns even when there is none)."""
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path", column, "error"])


def summarise_evaluation(domain_results: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    """Per-domain rows plus each benchmark's mean over its domains that have readable images;
    the same as Markdown; and every figure as an MLflow metric (``<benchmark>.<domain>.<metric>``).

    ``domains`` says how many domains a row's scores cover: 1 for a domain with readable
    images, 0 for one without (its scores are NaN), and for an average the number averaged
    over, also spelled out in its note ("mean over 3 of 4 domains"). NaN scores are not
    logged as metrics.
    """
    counted = domain_results.assign(domains=(domain_results["images"] > 0).astype(int))
    averages = (
        counted.groupby("benchmark", sort=False)
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
    table = table.sort_values(["benchmark"], kind="stable", ignore_index=True)
    markdown = "# Out-of-distribution evaluation\n\n" + table.to_markdown(index=False, floatfmt=".4f") + "\n"
    metrics = {
        f"{row.benchmark}.{row.domain}.{metric}": {"value": float(getattr(row, metric)), "step": 0}
        for row in table.itertuples()
        for metric in [*METRICS, "corrupt_images"]
        if not pd.isna(getattr(row, metric))
    }
    for row in table.itertuples():
        if row.domains:
            logger.info(
                "%s/%s: student top-1 %.4f, teacher top-1 %.4f, agreement %.4f%s",
                row.benchmark,
                row.domain,
                row.student_top1,
                row.teacher_top1,
                row.agreement,
                f" ({row.note})" if row.note else "",
            )
        elif row.domain == "average":
            logger.warning("%s: no domain has a readable image; nothing to average", row.benchmark)
    return table, markdown, metrics


def per_class_accuracy(predictions: pd.DataFrame) -> pd.DataFrame:
    """Student and teacher top-1 per benchmark, domain and class (``images`` of that class)."""
    scored = predictions.assign(
        student_correct=predictions["student_prediction"] == predictions["class_name"],
        teacher_correct=predictions["teacher_prediction"] == predictions["class_name"],
    )
    return (
        scored.groupby(["benchmark", "domain", "class_name"], sort=False)
        .agg(
            images=("path", "size"),
            student_top1=("student_correct", "mean"),
            teacher_top1=("teacher_correct", "mean"),
        )
        .reset_index()
    )


def plot_confusion_matrices(predictions: pd.DataFrame, classes: ClassNames) -> Figure:
    """One row per benchmark: the student's and the teacher's confusion matrices over all
    its evaluated domains, each row normalised by the true class's count."""
    names = list(classes)
    benchmarks = list(dict.fromkeys(predictions["benchmark"]))
    side = min(12.0, 2.5 + 0.35 * len(names))
    figure, axes = plt.subplots(
        max(1, len(benchmarks)),
        2,
        figsize=(2 * side, side * max(1, len(benchmarks))),
        squeeze=False,
        constrained_layout=True,
    )
    index = {name: i for i, name in enumerate(names)}
    for row, benchmark in zip(axes, benchmarks, strict=False):
        rows = predictions[predictions["benchmark"] == benchmark]
        truth = rows["class_name"].map(index).to_numpy(int)
        for axis, column, model in (
            (row[0], "student_prediction", "student"),
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
    """Grouped bars per domain: student top-1 next to the teacher's zero-shot ceiling."""
    benchmarks = list(dict.fromkeys(domain_results["benchmark"]))
    figure, axes = plt.subplots(
        1,
        len(benchmarks),
        figsize=(max(4.0, 1.4 * len(domain_results) + 1.5), 3.6),
        squeeze=False,
        constrained_layout=True,
    )
    width = 0.38
    for axis, benchmark in zip(axes[0], benchmarks, strict=True):
        rows = domain_results[domain_results["benchmark"] == benchmark]
        positions = np.arange(len(rows))
        for offset, column, label in (
            (-width / 2, "student_top1", "student"),
            (width / 2, "teacher_top1", "teacher (zero-shot)"),
        ):
            bars = axis.bar(positions + offset, rows[column], width, label=label)
            axis.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}" for v in rows[column]], fontsize=7)
        # A domain without readable images has no bars; its tick says why.
        ticks = [
            f"{d}\n({NO_READABLE_IMAGE})" if n == 0 else d for d, n in zip(rows["domain"], rows["images"], strict=True)
        ]
        axis.set_xticks(positions, ticks, rotation=20)
        axis.set_ylim(0, 1.05)
        axis.set_title(benchmark)
        axis.set_ylabel("top-1 accuracy")
    axes[0][0].legend(loc="upper left", fontsize=8)
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
    promotion alias (``champion``) to it only when it beats the version holding it."""
    return promote_if_better(evaluated_student, evaluation_table, report, params)
