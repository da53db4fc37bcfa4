"""The comparison table: student and teacher top-1 per domain for every prompt method ×
synthesis backend, averaged over the tracked runs of each.

The figures come from each run's ``ood_evaluation/ood_evaluation.csv`` artifact (not from
metric names), which student a run scored from its ``ood_evaluated_student.json``.
``tracked_runs.search_evaluations`` is the one function that reads MLflow; every function
here turns data into data. Nothing is averaged that is not alike: a benchmark read from
several folders has a column group per folder, and a run that scored a student made by
another run (an evaluation alone) is a row of that student, not of the method and backend it
logs.
"""

from __future__ import annotations

import logging
from typing import get_args

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from clip_dfkd.params import DATA_FREE, ComparisonParams, ImageSynthesisParams, PromptGenerationParams
from clip_dfkd.pipelines.comparison.tracked_runs import (
    BACKEND_PARAM,
    EVALUATION_ARTIFACT,
    METHOD_PARAM,
    ComparisonError,
    EvaluationSearch,
    TrackedEvaluation,
    search_evaluations,
)

logger = logging.getLogger(__name__)

# The backend column of a row of runs that evaluated a student made by another run.
EVALUATION_ONLY = "evaluation only"
# The root of a table written before the evaluation named the folder of each benchmark.
UNKNOWN_ROOT = "unknown root"
AVERAGE = "average"  # the domain of ood_evaluation's per-benchmark mean row
# Rows in the order the parameters list them.
METHODS = list(get_args(PromptGenerationParams.model_fields["method"].annotation))
BACKENDS = list(get_args(ImageSynthesisParams.model_fields["backend"].annotation))
REQUIRED_COLUMNS = ["benchmark", "domain", "student_top1", "teacher_top1"]
FIGURE_COLUMNS = ["images", "corrupt_images", "domains", "student_top1", "teacher_top1", "agreement", "note"]
RUN_COLUMNS = ["experiment", "run_id", "run_name", "start_time", "method", "backend"]
# benchmark_label: the benchmark's name, with its folder where runs read it from several.
RESULT_COLUMNS = [*RUN_COLUMNS, "setting", "benchmark", "root", "benchmark_label", "domain", *FIGURE_COLUMNS]


def collect_evaluations(params: ComparisonParams) -> pd.DataFrame:
    """One row per compared run × benchmark × domain (``average`` included, as each run's
    ood_evaluation table has it): the run (``run_id``, ``run_name``, ``start_time``, its
    ``method`` and ``backend``, or for an evaluation alone its student and ``evaluation
    only``), the benchmark's folder (``root``) and column label (``benchmark_label``), and its
    figures (``student_top1``, ``teacher_top1``, ...).

    Raises:
        ComparisonError: no run to compare, or ``benchmark`` names none that a run evaluated.
    """
    search = search_evaluations(params.experiment, params.filter_string)
    logger.info(
        "Comparing %d runs of %s; left out %d FINISHED runs without %s (other pipelines) and %d runs "
        "not FINISHED (running, failed or killed)",
        len(search.evaluations),
        search.where(),
        search.without_evaluation,
        EVALUATION_ARTIFACT,
        search.not_finished,
    )
    results = tidy_evaluations(search)
    if results.empty:
        raise ComparisonError(search.nothing_found())
    if params.setting not in set(results["setting"]):
        raise ComparisonError(
            f"comparison.setting={params.setting!r}: no compared run has rows of it; "
            f"allowed: one of {list(dict.fromkeys(results['setting']))}"
        )
    results = results[results["setting"] == params.setting].reset_index(drop=True)
    if params.benchmark is not None:
        found = list(dict.fromkeys(results["benchmark"]))
        if params.benchmark not in found:
            raise ComparisonError(
                f"comparison.benchmark={params.benchmark!r}: no compared run evaluated it; "
                f"allowed: one of {found}, or null for all"
            )
        results = results[results["benchmark"] == params.benchmark].reset_index(drop=True)
    return results


def tidy_evaluations(search: EvaluationSearch) -> pd.DataFrame:
    """The runs' ood_evaluation tables stacked, each row with its run (see
    :func:`collect_evaluations`) and its benchmark's folder; a table without the figures it
    needs is left out with a warning."""
    frames, evaluations_only = [], []
    for evaluation in search.evaluations:
        table = evaluation.table
        if missing := [column for column in REQUIRED_COLUMNS if column not in table.columns]:
            logger.warning(
                "Run %s: its %s lacks the columns %s; it is left out", evaluation.run_id, EVALUATION_ARTIFACT, missing
            )
            continue
        method, backend = _row_label(evaluation)
        if backend == EVALUATION_ONLY:
            evaluations_only.append(f"{evaluation.run_id} ({method})")
        if "setting" not in table.columns:  # written before the few-shot setting existed
            table = table.assign(setting=DATA_FREE)
        if "root" not in table.columns:  # written before the evaluation named its folders
            table = table.assign(root=UNKNOWN_ROOT)
        frame = table.reindex(columns=["setting", "benchmark", "root", "domain", *FIGURE_COLUMNS]).assign(
            experiment=search.experiment,
            run_id=evaluation.run_id,
            run_name=evaluation.run_name,
            start_time=evaluation.start_time,
            method=method,
            backend=backend,
        )
        frames.append(frame)
    if evaluations_only:
        logger.info(
            "Runs %s scored a student made by another run (e.g. `kedro run --pipelines=ood_evaluation`): "
            "rows of that student, backend %r",
            evaluations_only,
            EVALUATION_ONLY,
        )
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    results = pd.concat(frames, ignore_index=True)
    results["note"] = results["note"].fillna("").astype(str)
    return results.assign(benchmark_label=_benchmark_labels(results))[RESULT_COLUMNS]


def _row_label(evaluation: TrackedEvaluation) -> tuple[str, str]:
    """The run's prompt method and synthesis backend when it made the student it scored; else
    (it scored an earlier run's student, e.g. ``kedro run --pipelines=ood_evaluation``, which
    logs neither) that student and :data:`EVALUATION_ONLY`: its registered model and version,
    its weights' fingerprint when unregistered, or the run when it recorded none."""
    method, backend = evaluation.params.get(METHOD_PARAM), evaluation.params.get(BACKEND_PARAM)
    student = evaluation.evaluated_student
    made_by = (student or {}).get("run_id")
    if method and backend and made_by in (None, evaluation.run_id):
        return method, backend
    if student is None:
        return f"student not logged by run {evaluation.run_id[:8]}", EVALUATION_ONLY
    if student.get("registered_model"):
        return f"{student['registered_model']} version {student['version']}", EVALUATION_ONLY
    return f"unregistered student {student['fingerprint']}", EVALUATION_ONLY


def _benchmark_labels(results: pd.DataFrame) -> list[str]:
    """Each row's benchmark name, or ``<name> (<folder>)`` where the runs read that benchmark
    from several folders (``unknown root`` for a table that names none): one column group per
    folder, never one mean over both."""
    folders = results.groupby("benchmark", sort=False)["root"].unique()
    several = {name: list(roots) for name, roots in folders.items() if len(roots) > 1}
    for name, roots in several.items():
        logger.warning("%s was read from %d folders %s: a column group per folder", name, len(roots), roots)
    return [
        f"{name} ({root})" if name in several else name
        for name, root in zip(results["benchmark"], results["root"], strict=True)
    ]


def _rank(value: str, known: list[str]) -> tuple[int, str]:
    """Known values in their listed order, then others by name."""
    if value in known:
        return known.index(value), ""
    return len(known), value


def _group_key(group: tuple[str, str]) -> tuple:
    method, backend = group
    return _rank(method, METHODS), _rank(backend, BACKENDS)


def summarise_groups(results: pd.DataFrame) -> pd.DataFrame:
    """Per method × backend × benchmark label × domain: the student's mean, min and max top-1 and
    the teacher's mean over the runs that scored the domain (``cell_runs``), and how many
    runs the row has (``runs``); rows in method and backend order, domains as the runs list
    them with ``average`` last."""
    runs = results.groupby(["method", "backend"])["run_id"].nunique().rename("runs")
    cells = (
        results.groupby(["method", "backend", "benchmark_label", "domain"], sort=False)
        .agg(
            cell_runs=("student_top1", "count"),  # count skips NaN: a domain without readable images
            student_mean=("student_top1", "mean"),
            student_min=("student_top1", "min"),
            student_max=("student_top1", "max"),
            teacher_mean=("teacher_top1", "mean"),
        )
        .reset_index()
        .join(runs, on=["method", "backend"])
    )
    groups = sorted(dict.fromkeys(zip(cells["method"], cells["backend"], strict=True)), key=_group_key)
    columns = _columns(results)
    order = {key: i for i, key in enumerate(groups)}
    position = {key: i for i, key in enumerate(columns)}
    cells["_order"] = [
        (order[(m, b)], position[(bench, d)])
        for m, b, bench, d in zip(
            cells["method"], cells["backend"], cells["benchmark_label"], cells["domain"], strict=True
        )
    ]
    return cells.sort_values("_order", ignore_index=True).drop(columns="_order")


def _columns(results: pd.DataFrame) -> list[tuple[str, str]]:
    """(benchmark, domain) in the order the runs list them, each benchmark's average last."""
    columns = []
    for benchmark in dict.fromkeys(results["benchmark_label"]):
        domains = list(dict.fromkeys(results.loc[results["benchmark_label"] == benchmark, "domain"]))
        columns += [(benchmark, d) for d in domains if d != AVERAGE]
        columns += [(benchmark, AVERAGE)] if AVERAGE in domains else []
    return columns


def _cell(cell, decimals: int, show_range: bool) -> str:
    """``0.79 (0.94)``: the student's mean top-1 and, in brackets, the teacher's; with the
    student's ``[min–max]`` when several runs are averaged and ``· k/n runs`` when fewer runs
    than the row's scored the domain."""
    if cell is None or cell.cell_runs == 0:
        return "n/a"
    text = f"{cell.student_mean:.{decimals}f}"
    if show_range and cell.cell_runs > 1:
        text += f" [{cell.student_min:.{decimals}f}–{cell.student_max:.{decimals}f}]"
    text += f" ({cell.teacher_mean:.{decimals}f})"
    if cell.cell_runs < cell.runs:
        text += f" · {cell.cell_runs}/{cell.runs} runs"
    return text


def tabulate_comparison(results: pd.DataFrame, params: ComparisonParams) -> tuple[pd.DataFrame, str]:
    """The comparison table, one row per prompt method × synthesis backend (``runs``: how
    many runs it averages) and one column per benchmark domain (``<benchmark>/<domain>``, the
    benchmark as labelled, with its folder where runs read it from several) and benchmark
    average, each cell the student's top-1 with the teacher's zero-shot top-1 (the
    ceiling) beside it, e.g. ``0.79 (0.94)``; and the same as Markdown, with what a cell
    means and which runs each row averages."""
    summary = summarise_groups(results)
    columns = _columns(results)
    cells = {(row.method, row.backend, row.benchmark_label, row.domain): row for row in summary.itertuples(index=False)}
    groups = list(dict.fromkeys(zip(summary["method"], summary["backend"], strict=True)))
    runs = summary.drop_duplicates(["method", "backend"]).set_index(["method", "backend"])["runs"]
    table = pd.DataFrame(
        [
            {
                "method": method,
                "backend": backend,
                "runs": int(runs[(method, backend)]),
                **{
                    f"{benchmark}/{domain}": _cell(
                        cells.get((method, backend, benchmark, domain)), params.decimals, params.show_range
                    )
                    for benchmark, domain in columns
                },
            }
            for method, backend in groups
        ]
    )
    experiments = ", ".join(f"`{name}`" for name in dict.fromkeys(results["experiment"]))
    matching = f" matching `{params.filter_string}`" if params.filter_string else ""
    spread = " [min–max over them]" if params.show_range else ""
    listing = (
        results.drop_duplicates("run_id")
        .assign(_key=lambda f: [_group_key(g) for g in zip(f["method"], f["backend"], strict=True)])
        .sort_values(["_key", "start_time"], kind="stable")
    )
    markdown = "\n".join(
        [
            "# Prompt methods and synthesis backends compared",
            "",
            f"Setting: {params.setting}.",
            "",
            f"Student top-1 per domain: the mean over the row's runs{spread}, and in brackets the teacher's "
            "zero-shot top-1 (the ceiling), mean over the same runs. `runs`: how many FINISHED runs of MLflow "
            f"experiment {experiments}{matching} with an ood_evaluation table the row averages (runs of the same "
            "method and backend, e.g. seeds, are averaged); a cell that fewer of them scored says how many. "
            "`average`: each run's mean over its benchmark's domains with readable images.",
            "",
            _folders_read(results),
            *_evaluation_only_note(groups),
            "",
            table.to_markdown(index=False),
            "",
            "## Runs",
            "",
            listing.assign(start_time=listing["start_time"].dt.strftime("%Y-%m-%d %H:%M:%S UTC"))[
                ["method", "backend", "run_name", "run_id", "start_time"]
            ].to_markdown(index=False),
            "",
        ]
    )
    return table, markdown


def _folders_read(results: pd.DataFrame) -> str:
    """Which folder each benchmark was read from; a benchmark read from several has a column
    group per folder."""
    folders = results.drop_duplicates(["benchmark", "root"])
    several = (folders["benchmark_label"] != folders["benchmark"]).any()
    listed = "; ".join(
        f"{name}: {UNKNOWN_ROOT} (an evaluation from before the folder was recorded)"
        if root == UNKNOWN_ROOT
        else f"{name}: `{root}`"
        for name, root in zip(folders["benchmark"], folders["root"], strict=True)
    )
    apart = " A benchmark read from several folders has a column group per folder, never one mean." if several else ""
    return f"Benchmark folders: {listed}.{apart}"


def _evaluation_only_note(groups: list[tuple[str, str]]) -> list[str]:
    """What the rows of evaluations alone are, when there are any."""
    if not any(backend == EVALUATION_ONLY for _, backend in groups):
        return []
    return [
        "",
        f"Rows with backend `{EVALUATION_ONLY}` are runs that scored a student made by another run (e.g. "
        "`kedro run --pipelines=ood_evaluation`), named after that student: its registered model and version, "
        "else its weights' fingerprint.",
    ]


def plot_comparison(results: pd.DataFrame) -> Figure:
    """Grouped bars per domain, one bar per method × backend (the student's mean top-1, with
    its min–max over the runs as an error bar), the teacher's zero-shot top-1 (the ceiling)
    marked as a black line across each bar; one panel per benchmark label."""
    summary = summarise_groups(results)
    columns = _columns(results)
    benchmarks = list(dict.fromkeys(b for b, _ in columns))
    groups = list(dict.fromkeys(zip(summary["method"], summary["backend"], strict=True)))
    widest = max(sum(b == benchmark for b, _ in columns) for benchmark in benchmarks)
    figure, axes = plt.subplots(
        1,
        len(benchmarks),
        figsize=(max(5.0, len(benchmarks) * (1.0 + widest * (0.25 * len(groups) + 0.4))), 4.2),
        squeeze=False,
        layout="constrained",
    )
    width = 0.8 / len(groups)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, benchmark in zip(axes[0], benchmarks, strict=True):
        domains = [d for b, d in columns if b == benchmark]
        positions = np.arange(len(domains))
        for i, (method, backend) in enumerate(groups):
            rows = summary[
                (summary["method"] == method)
                & (summary["backend"] == backend)
                & (summary["benchmark_label"] == benchmark)
            ]
            rows = rows.set_index("domain").reindex(domains)
            x = positions - 0.4 + width * (i + 0.5)
            mean = rows["student_mean"].to_numpy(float)
            runs = int(summary.loc[(summary["method"] == method) & (summary["backend"] == backend), "runs"].iloc[0])
            bars = axis.bar(
                x,
                mean,
                width,
                color=colours[i % len(colours)],
                label=f"{method} · {backend} ({runs} run{'s' if runs > 1 else ''})",
            )
            axis.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}" for v in mean], fontsize=6)
            several = rows["cell_runs"].to_numpy(float) > 1  # the student's min–max over them
            axis.errorbar(
                x[several],
                mean[several],
                yerr=np.vstack([mean - rows["student_min"], rows["student_max"] - mean])[:, several],
                fmt="none",
                ecolor="dimgray",
                capsize=2,
            )
            axis.hlines(
                rows["teacher_mean"].to_numpy(float),
                x - width / 2,
                x + width / 2,
                colors="black",
                linewidth=2,
                label="teacher zero-shot (ceiling)" if i == 0 else None,
            )
        axis.set_xticks(positions, domains, rotation=20)
        axis.set_ylim(0, 1.05)
        axis.set_title(benchmark)
        axis.set_ylabel("top-1 accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8)
    return figure
