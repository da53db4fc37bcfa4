"""The evaluation's pictures: confusion matrices per domain and top-1 per domain, as figures for
the catalog's matplotlib datasets (kedro-viz previews them)."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from clip_dfkd.params import DATA_FREE, ClassNames
from clip_dfkd.pipelines.ood_evaluation.scoring import NO_READABLE_IMAGE

logger = logging.getLogger(__name__)


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
