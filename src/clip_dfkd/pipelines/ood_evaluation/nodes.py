from __future__ import annotations

import logging

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
from clip_dfkd.params import ClassNames, OodEvaluationParams, RuntimeParams
from clip_dfkd.runtime import Runtime

logger = logging.getLogger(__name__)

METRICS = ["student_top1", "teacher_top1", "agreement"]


def evaluate_domains(
    student: StudentClassifier,
    teacher_model: ClipTeacher,
    zero_shot_head: torch.Tensor,
    classes: ClassNames,
    params: OodEvaluationParams,
    runtime: RuntimeParams,
) -> pd.DataFrame:
    """One row per benchmark domain: student top-1, teacher zero-shot top-1 (the ceiling) and
    how often the two agree, over the readable images; unreadable ones are counted as corrupt."""
    device = Runtime.resolve(runtime).device
    student = student.to(device).eval()
    student_transform = student.eval_transform()
    rows = []
    for name, benchmark in params.benchmarks.items():
        for domain in scan_benchmark(name, benchmark, list(classes)):
            labels = torch.tensor(domain.labels)
            student_correct = teacher_correct = agree = evaluated = 0
            for indices, ok, (student_pixels, teacher_pixels) in tqdm(
                iterate_batches(domain.paths, [student_transform, teacher_model.preprocess], params.batch_size),
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
                student_correct += int((student_prediction == target).sum())
                teacher_correct += int((teacher_prediction == target).sum())
                agree += int((student_prediction == teacher_prediction).sum())
                evaluated += len(target)
            corrupt = len(domain.paths) - evaluated
            if corrupt:
                logger.warning("%s/%s: skipped %d unreadable images", name, domain.domain, corrupt)
            rows.append(
                {
                    "benchmark": name,
                    "domain": domain.domain,
                    "images": evaluated,
                    "corrupt_images": corrupt,
                    "student_top1": student_correct / evaluated if evaluated else np.nan,
                    "teacher_top1": teacher_correct / evaluated if evaluated else np.nan,
                    "agreement": agree / evaluated if evaluated else np.nan,
                }
            )
    return pd.DataFrame(rows)


def summarise_evaluation(domain_results: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    """Per-domain rows plus each benchmark's mean over its domains; the same as Markdown; and
    every figure as an MLflow metric (``<benchmark>.<domain>.<metric>``)."""
    averages = (
        domain_results.groupby("benchmark", sort=False)
        .agg(
            images=("images", "sum"),
            corrupt_images=("corrupt_images", "sum"),
            **{metric: (metric, "mean") for metric in METRICS},
        )
        .reset_index()
        .assign(domain="average")
    )
    table = pd.concat([domain_results, averages[domain_results.columns]], ignore_index=True)
    table = table.sort_values(["benchmark"], kind="stable", ignore_index=True)
    markdown = "# Out-of-distribution evaluation\n\n" + table.to_markdown(index=False, floatfmt=".4f") + "\n"
    metrics = {
        f"{row.benchmark}.{row.domain}.{metric}": {"value": float(getattr(row, metric)), "step": 0}
        for row in table.itertuples()
        for metric in [*METRICS, "corrupt_images"]
        if not pd.isna(getattr(row, metric))
    }
    for row in averages.itertuples():
        logger.info(
            "%s: student %.4f, teacher %.4f, agreement %.4f (mean over domains)",
            row.benchmark,
            row.student_top1,
            row.teacher_top1,
            row.agreement,
        )
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
            axis.bar_label(bars, fmt="%.2f", fontsize=7)
        axis.set_xticks(positions, rows["domain"], rotation=20)
        axis.set_ylim(0, 1.05)
        axis.set_title(benchmark)
        axis.set_ylabel("top-1 accuracy")
    axes[0][0].legend(loc="upper left", fontsize=8)
    return figure
