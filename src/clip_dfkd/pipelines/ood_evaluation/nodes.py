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
from clip_dfkd.params import ClassNames, OodEvaluationParams, RuntimeParams
from clip_dfkd.runtime import Runtime

logger = logging.getLogger(__name__)

METRICS = ["student_top1", "teacher_top1", "agreement"]
TABLE_COLUMNS = ["benchmark", "domain", "images", "corrupt_images", "domains", *METRICS, "note"]
SKIPPED_COLUMNS = ["benchmark", "domain", "path", "reason"]
PREDICTION_COLUMNS = ["benchmark", "domain", "path", "class_name", "student_prediction", "teacher_prediction"]
NO_READABLE_IMAGE = "no readable image"


def evaluate_domains(
    student: StudentClassifier,
    teacher_model: ClipTeacher,
    zero_shot_head: torch.Tensor,
    classes: ClassNames,
    params: OodEvaluationParams,
    runtime: RuntimeParams,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Score every domain of every enabled benchmark.

    Returns one row per domain: student top-1, teacher zero-shot top-1 (the ceiling) and how
    often the two agree, over the readable images, with the unreadable ones counted as
    corrupt; a domain without any readable image has NaN scores and the note "no readable
    image". And one row per file left out (``benchmark, domain, path, reason``): files that
    are not images, and unreadable images with the decoder's one-line error. And one row per
    evaluated image: its class and both models' predicted class names.
    """
    device = Runtime.resolve(runtime).device
    student = student.to(device).eval()
    student_transform = student.eval_transform()
    rows, skipped, predictions = [], [], []
    for name, benchmark in params.enabled_benchmarks().items():
        for domain in scan_benchmark(name, benchmark, list(classes)):
            skipped += [(name, domain.domain, str(path), reason) for path, reason in domain.skipped]
            labels = torch.tensor(domain.labels)
            student_correct = teacher_correct = agree = evaluated = 0
            errors: dict[int, str] = {}
            for indices, ok, (student_pixels, teacher_pixels) in tqdm(
                iterate_batches(
                    domain.paths, [student_transform, teacher_model.preprocess], params.batch_size, errors=errors
                ),
                desc=f"{name}/{domain.domain}",
                total=-(-len(domain.paths) // params.batch_size),
                unit="batch",
            ):
                if not bool(ok.any()):
                    continue
                target = labels[indices[ok]]
                with torch.inference_mode():
                    student_prediction = student(student_pixels[ok].to(device)).argmax(-1).cpu()
                teacher_logits, _ = teacher_model.classify(teacher_pixels[ok], zero_shot_head)
                teacher_prediction = teacher_logits.argmax(-1).cpu()
                predictions += [
                    (name, domain.domain, str(domain.paths[i]), classes[t], classes[s], classes[r])
                    for i, t, s, r in zip(
                        indices[ok].tolist(),
                        target.tolist(),
                        student_prediction.tolist(),
                        teacher_prediction.tolist(),
                        strict=True,
                    )
                ]
                student_correct += int((student_prediction == target).sum())
                teacher_correct += int((teacher_prediction == target).sum())
                agree += int((student_prediction == teacher_prediction).sum())
                evaluated += len(target)
            skipped += [(name, domain.domain, str(domain.paths[i]), errors[i]) for i in sorted(errors)]
            if errors:
                logger.warning("%s/%s: skipped %d unreadable images", name, domain.domain, len(errors))
            if not evaluated:
                logger.warning(
                    "%s/%s: no readable image (%d image files, %d other files); it is left out of the average",
                    name,
                    domain.domain,
                    len(domain.paths),
                    len(domain.skipped),
                )
            rows.append(
                {
                    "benchmark": name,
                    "domain": domain.domain,
                    "images": evaluated,
                    "corrupt_images": len(errors),
                    "student_top1": student_correct / evaluated if evaluated else np.nan,
                    "teacher_top1": teacher_correct / evaluated if evaluated else np.nan,
                    "agreement": agree / evaluated if evaluated else np.nan,
                    "note": "" if evaluated else NO_READABLE_IMAGE,
                }
            )
    return (
        pd.DataFrame(rows),
        pd.DataFrame(skipped, columns=SKIPPED_COLUMNS),
        pd.DataFrame(predictions, columns=PREDICTION_COLUMNS),
    )


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
