"""The comparison table reads FINISHED tracked runs with an ood_evaluation table and averages
them per prompt method × synthesis backend."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import make_project_copy, plumbing_params
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from clip_dfkd.params import ComparisonParams, InvalidParameterError
from clip_dfkd.pipelines.comparison.nodes import (
    ComparisonError,
    collect_evaluations,
    plot_comparison,
    tabulate_comparison,
)
from clip_dfkd.preflight import PreflightError

# Per run: tags, params, status, and (student, teacher) top-1 per benchmark and domain; the
# agreement is set apart from both, so that a mix-up of columns shows.
RUNS = {
    "vanilla-0": (
        {"seed": "0"},
        {"prompt_generation.method": "vanilla", "image_synthesis.backend": "inversion"},
        "FINISHED",
        {"toy": {"photo": (0.80, 0.90), "night": (0.60, 0.80)}},
    ),
    "vanilla-1": (
        {"seed": "1"},
        {"prompt_generation.method": "vanilla", "image_synthesis.backend": "inversion"},
        "FINISHED",
        {"toy": {"photo": (0.60, 0.94), "night": (0.40, 0.84)}, "other": {"x": (0.50, 0.60)}},
    ),
    "mix-0": (
        {"seed": "0"},
        {"prompt_generation.method": "mix", "image_synthesis.backend": "inversion"},
        "FINISHED",
        {"toy": {"photo": (0.50, 0.90), "night": (0.30, 0.80)}},
    ),
    "diffusion-0": (
        {"seed": "0"},
        {"prompt_generation.method": "vanilla", "image_synthesis.backend": "diffusion"},
        "FINISHED",
        {"toy": {"photo": (0.30, 0.90), "night": (0.20, 0.80)}},
    ),
    # Left out: not FINISHED, or no evaluation (a run of another pipeline).
    "running": (
        {"seed": "0"},
        {"prompt_generation.method": "mix", "image_synthesis.backend": "inversion"},
        "RUNNING",
        {"toy": {"photo": (0.99, 0.99), "night": (0.99, 0.99)}},
    ),
    "failed": (
        {"seed": "0"},
        {"prompt_generation.method": "mix", "image_synthesis.backend": "inversion"},
        "FAILED",
        {"toy": {"photo": (0.99, 0.99), "night": (0.99, 0.99)}},
    ),
    "prompts-only": (
        {"seed": "0"},
        {"prompt_generation.method": "vanilla", "image_synthesis.backend": "inversion"},
        "FINISHED",
        None,
    ),
}
COMPARED = ["vanilla-0", "vanilla-1", "mix-0", "diffusion-0"]


def _evaluation_table(figures: dict[str, dict[str, tuple[float, float]]]) -> pd.DataFrame:
    """An ood_evaluation.csv as the ood_evaluation stage writes it, average rows included."""
    rows = []
    for benchmark, domains in figures.items():
        for domain, (student, teacher) in domains.items():
            rows.append((benchmark, domain, 100, 0, 1, student, teacher, student + 0.013, ""))
        students, teachers = zip(*domains.values(), strict=True)
        rows.append(
            (
                benchmark,
                "average",
                100 * len(domains),
                0,
                len(domains),
                sum(students) / len(students),
                sum(teachers) / len(teachers),
                sum(students) / len(students) + 0.013,
                f"mean over {len(domains)} of {len(domains)} domains",
            )
        )
    columns = ["benchmark", "domain", "images", "corrupt_images", "domains"]
    return pd.DataFrame(rows, columns=[*columns, "student_top1", "teacher_top1", "agreement", "note"])


def _log_run(client, experiment_id: str, name: str, scratch: Path) -> str:
    tags, params, status, figures = RUNS[name]
    table = None if figures is None else _evaluation_table(figures)
    return _log_evaluation(client, experiment_id, name, scratch, params, table, tags=tags, status=status)


def _log_evaluation(
    client,
    experiment_id: str,
    name: str,
    scratch: Path,
    params: dict[str, str],
    table: pd.DataFrame | None,
    student: dict | None = None,
    tags: dict[str, str] | None = None,
    status: str = "FINISHED",
) -> str:
    """A run with ``params`` and, as ood_evaluation logs them, its evaluation ``table`` and the
    record of the ``student`` it scored (made by the run itself when the record names no
    ``run_id``)."""
    run = client.create_run(experiment_id, run_name=name, tags=tags or {})
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    folder = scratch / name
    folder.mkdir()
    if table is not None:
        table.to_csv(folder / "ood_evaluation.csv", index=False)
        client.log_artifact(run_id, str(folder / "ood_evaluation.csv"), "ood_evaluation")
    if student is not None:
        (folder / "ood_evaluated_student.json").write_text(json.dumps({"run_id": run_id, **student}))
        client.log_artifact(run_id, str(folder / "ood_evaluated_student.json"), "ood_evaluation")
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A SQLite MLflow store with experiment ``cmp`` holding the runs of RUNS."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("cmp", artifact_location=(root / "artifacts").as_uri())
    run_ids = {name: _log_run(client, experiment_id, name, root) for name in RUNS}
    return {"uri": uri, "root": root, "run_ids": run_ids, "experiment_id": experiment_id}


@pytest.fixture
def tracking(store: dict, monkeypatch: pytest.MonkeyPatch):
    """The store as the tracking URI, and no experiment set by an earlier Kedro session."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(store["uri"])
    yield store
    mlflow.set_tracking_uri(None)


def _compare(**params) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    parameters = ComparisonParams.model_validate({"experiment": "cmp", **params})
    results = collect_evaluations(parameters)
    table, markdown = tabulate_comparison(results, parameters)
    return results, table, markdown


def test_runs_of_a_method_and_backend_are_averaged_with_the_teacher_beside(tracking) -> None:
    results, table, markdown = _compare()

    assert list(table.columns) == [
        "method",
        "backend",
        "runs",
        "toy/photo",
        "toy/night",
        "toy/average",
        "other/x",
        "other/average",
    ]
    assert table.to_dict("records") == [
        {
            "method": "vanilla",
            "backend": "diffusion",
            "runs": 1,
            "toy/photo": "0.30 (0.90)",
            "toy/night": "0.20 (0.80)",
            "toy/average": "0.25 (0.85)",
            "other/x": "n/a",
            "other/average": "n/a",
        },
        {
            "method": "vanilla",
            "backend": "inversion",
            "runs": 2,
            # student mean [min–max] (teacher mean): (0.80 + 0.60) / 2, (0.90 + 0.94) / 2, ...
            "toy/photo": "0.70 [0.60–0.80] (0.92)",
            "toy/night": "0.50 [0.40–0.60] (0.82)",
            # each run's own average (0.70 and 0.50; teachers 0.85 and 0.89), averaged
            "toy/average": "0.60 [0.50–0.70] (0.87)",
            "other/x": "0.50 (0.60) · 1/2 runs",
            "other/average": "0.50 (0.60) · 1/2 runs",
        },
        {
            "method": "mix",
            "backend": "inversion",
            "runs": 1,
            "toy/photo": "0.50 (0.90)",
            "toy/night": "0.30 (0.80)",
            "toy/average": "0.40 (0.85)",
            "other/x": "n/a",
            "other/average": "n/a",
        },
    ]
    assert "| vanilla  | inversion |      2 | 0.70 [0.60–0.80] (0.92)" in markdown
    assert "MLflow experiment `cmp`" in markdown
    for name in COMPARED:
        assert tracking["run_ids"][name] in markdown


def test_only_finished_runs_with_an_evaluation_count_and_the_rest_are_counted_in_the_log(tracking, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="clip_dfkd.pipelines.comparison.nodes"):
        results, _, _ = _compare()

    assert set(results["run_id"]) == {tracking["run_ids"][name] for name in COMPARED}
    # One row per run × benchmark × domain, each benchmark's average included.
    assert len(results) == 3 + 3 + 3 + 3 + 2
    vanilla_0 = results[(results["run_name"] == "vanilla-0") & (results["domain"] == "photo")].iloc[0]
    assert (vanilla_0["method"], vanilla_0["backend"]) == ("vanilla", "inversion")
    assert (vanilla_0["student_top1"], vanilla_0["teacher_top1"]) == (0.80, 0.90)
    assert (
        "Comparing 4 runs of MLflow experiment 'cmp' at sqlite:///" in caplog.text
        and "left out 1 FINISHED runs without ood_evaluation/ood_evaluation.csv (other pipelines) and 2 runs "
        "not FINISHED"
        in caplog.text
    )


@pytest.mark.parametrize(
    ("filter_string", "rows"),
    [
        ("tags.seed = '0'", {("vanilla", "diffusion", 1), ("vanilla", "inversion", 1), ("mix", "inversion", 1)}),
        ("params.prompt_generation.method = 'mix'", {("mix", "inversion", 1)}),
        ("params.image_synthesis.backend = 'inversion' and tags.seed = '1'", {("vanilla", "inversion", 1)}),
    ],
)
def test_the_filter_string_selects_the_runs(tracking, filter_string, rows) -> None:
    _, table, markdown = _compare(filter_string=filter_string)

    assert set(zip(table["method"], table["backend"], table["runs"], strict=True)) == rows
    assert f"matching `{filter_string}`" in markdown
    if filter_string == "tags.seed = '0'":
        assert table.set_index(["method", "backend"]).loc[("vanilla", "inversion"), "toy/photo"] == "0.80 (0.90)"


def test_benchmark_keeps_one_benchmarks_columns_and_the_runs_that_evaluated_it(tracking) -> None:
    _, table, _ = _compare(benchmark="other")

    assert table.to_dict("records") == [
        {
            "method": "vanilla",
            "backend": "inversion",
            "runs": 1,
            "other/x": "0.50 (0.60)",
            "other/average": "0.50 (0.60)",
        }
    ]
    with pytest.raises(ComparisonError, match=r"^comparison.benchmark='pacs': no compared run evaluated it; allowed"):
        _compare(benchmark="pacs")


def test_setting_keeps_the_data_free_or_the_few_shot_rows(tracking, tmp_path) -> None:
    client = mlflow.MlflowClient(tracking["uri"])
    experiment_id = client.create_experiment("cmp-few-shot", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment_id, run_name="few-shot")
    client.log_param(run.info.run_id, "prompt_generation.method", "mix")
    client.log_param(run.info.run_id, "image_synthesis.backend", "inversion")
    data_free = _evaluation_table({"toy": {"photo": (0.80, 0.90), "night": (0.60, 0.80)}})
    few_shot = _evaluation_table({"toy": {"night": (0.70, 0.80)}})
    table = pd.concat(
        [data_free.assign(setting="data-free"), few_shot.assign(setting="few-shot k=5")], ignore_index=True
    )
    table.to_csv(tmp_path / "ood_evaluation.csv", index=False)
    client.log_artifact(run.info.run_id, str(tmp_path / "ood_evaluation.csv"), "ood_evaluation")
    client.set_terminated(run.info.run_id, "FINISHED")

    _, default, markdown = _compare(experiment="cmp-few-shot")
    _, tuned, _ = _compare(experiment="cmp-few-shot", setting="few-shot k=5")

    assert default.drop(columns=["method", "backend", "runs"]).to_dict("records") == [
        {"toy/photo": "0.80 (0.90)", "toy/night": "0.60 (0.80)", "toy/average": "0.70 (0.85)"}
    ]
    assert "Setting: data-free." in markdown
    assert tuned.drop(columns=["method", "backend", "runs"]).to_dict("records") == [
        {"toy/night": "0.70 (0.80)", "toy/average": "0.70 (0.80)"}
    ]
    with pytest.raises(ComparisonError, match=r"^comparison.setting='few-shot k=1': no compared run has rows of it"):
        _compare(experiment="cmp-few-shot", setting="few-shot k=1")


def test_a_benchmark_read_from_two_folders_is_never_one_mean(tracking, tmp_path, caplog) -> None:
    client = mlflow.MlflowClient(tracking["uri"])
    experiment_id = client.create_experiment("cmp-roots", artifact_location=(tmp_path / "artifacts").as_uri())
    vanilla = RUNS["vanilla-0"][1]
    for name, photo, root in (("at-a", 0.80, "/data/a"), ("at-b", 0.40, "/data/b"), ("old", 0.60, None)):
        table = _evaluation_table({"toy": {"photo": (photo, 0.90)}})
        if root is not None:  # the table of an evaluation from before the folder was recorded has none
            table.insert(1, "root", root)
        _log_evaluation(client, experiment_id, name, tmp_path, vanilla, table)

    with caplog.at_level(logging.WARNING, logger="clip_dfkd.pipelines.comparison.nodes"):
        results, table, markdown = _compare(experiment="cmp-roots")

    assert table.drop(columns=["method", "backend"]).to_dict("records") == [
        {
            "runs": 3,
            "toy (/data/a)/photo": "0.80 (0.90) · 1/3 runs",
            "toy (/data/a)/average": "0.80 (0.90) · 1/3 runs",
            "toy (/data/b)/photo": "0.40 (0.90) · 1/3 runs",
            "toy (/data/b)/average": "0.40 (0.90) · 1/3 runs",
            "toy (unknown root)/photo": "0.60 (0.90) · 1/3 runs",
            "toy (unknown root)/average": "0.60 (0.90) · 1/3 runs",
        }
    ]
    assert set(results["root"]) == {"/data/a", "/data/b", "unknown root"} and set(results["benchmark"]) == {"toy"}
    assert (
        "Benchmark folders: toy: `/data/a`; toy: `/data/b`; toy: unknown root (an evaluation from before the folder "
        "was recorded). A benchmark read from several folders has a column group per folder, never one mean."
    ) in markdown
    assert (
        "toy was read from 3 folders ['/data/a', '/data/b', 'unknown root']: a column group per folder" in caplog.text
    )
    assert [axis.get_title() for axis in plot_comparison(results).axes] == [
        "toy (/data/a)",
        "toy (/data/b)",
        "toy (unknown root)",
    ]
    # One folder, however many runs: the benchmark's name alone.
    _, one_folder, markdown = _compare(experiment="cmp-roots", filter_string="attributes.run_name = 'at-a'")
    assert list(one_folder.columns[3:]) == ["toy/photo", "toy/average"]
    assert "Benchmark folders: toy: `/data/a`." in markdown


def test_evaluation_only_runs_are_rows_of_the_student_they_scored(tracking, tmp_path) -> None:
    client = mlflow.MlflowClient(tracking["uri"])
    experiment_id = client.create_experiment("cmp-evaluations", artifact_location=(tmp_path / "artifacts").as_uri())
    vanilla = RUNS["vanilla-0"][1]

    def log(name: str, photo: float, params: dict, student: dict | None) -> str:
        table = _evaluation_table({"toy": {"photo": (photo, 0.90)}})
        return _log_evaluation(client, experiment_id, name, tmp_path, params, table, student)

    version_1 = {"registered_model": "clip-dfkd-student", "version": "1", "fingerprint": "aaaa"}
    trained = log("trained", 0.80, vanilla, version_1)  # the record names the run itself
    # Evaluations alone of the student above and of another one. The first logged the method and
    # backend too (it ran prompt_generation and image_synthesis as well), yet scored v1.
    log("again", 0.70, vanilla, {**version_1, "run_id": trained})
    log("v2", 0.50, {}, {"registered_model": "clip-dfkd-student", "version": "2", "fingerprint": "bbbb", "run_id": "x"})
    log("unmatched", 0.20, {}, {"registered_model": None, "version": None, "fingerprint": "cccc", "run_id": None})
    unrecorded = log("unrecorded", 0.30, {}, None)

    _, table, markdown = _compare(experiment="cmp-evaluations")

    assert table[["method", "backend", "runs", "toy/photo"]].values.tolist() == [
        ["vanilla", "inversion", 1, "0.80 (0.90)"],
        ["clip-dfkd-student version 1", "evaluation only", 1, "0.70 (0.90)"],
        ["clip-dfkd-student version 2", "evaluation only", 1, "0.50 (0.90)"],
        [f"student not logged by run {unrecorded[:8]}", "evaluation only", 1, "0.30 (0.90)"],
        ["unregistered student cccc", "evaluation only", 1, "0.20 (0.90)"],
    ]
    assert "Rows with backend `evaluation only` are runs that scored a student made by another run" in markdown


def test_the_comparisons_own_run_is_never_compared(tracking) -> None:
    client = mlflow.MlflowClient(tracking["uri"])
    own_experiment = client.create_experiment("own", artifact_location=(tracking["root"] / "own").as_uri())
    scratch = tracking["root"] / "own-runs"
    scratch.mkdir()
    finished = _log_run(client, own_experiment, "mix-0", scratch)
    with mlflow.start_run(experiment_id=own_experiment) as own:
        # Even with an evaluation of its own, the active run (RUNNING) is left out; and
        # experiment null is the active run's experiment.
        mlflow.log_artifact(str(tracking["root"] / "vanilla-0" / "ood_evaluation.csv"), "ood_evaluation")
        results = collect_evaluations(ComparisonParams())
        mlflow.end_run("KILLED")

    assert set(results["run_id"]) == {finished}
    assert own.info.run_id not in set(results["run_id"])
    assert set(results["experiment"]) == {"own"}


def test_no_matching_run_fails_on_one_line_with_the_experiment_the_filter_and_the_fix(tracking) -> None:
    with pytest.raises(ComparisonError) as caught:
        _compare(filter_string="params.prompt_generation.method = 'contrastive'")

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "comparison: no FINISHED run with ood_evaluation/ood_evaluation.csv in MLflow experiment 'cmp' at "
        f"{tracking['uri']} matching filter \"params.prompt_generation.method = 'contrastive'\""
    )
    assert "`kedro run --params=prompt_generation.method=mix`" in message
    assert "then rerun `kedro run --pipelines=comparison`" in message


def test_bad_settings_fail_on_one_line(tracking) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        ComparisonParams.model_validate({"filter_string": "params.method = mix"})
    assert str(caught.value).startswith(
        "comparison.filter_string='params.method = mix': is not an MLflow search filter (Parameter value is "
        "either not quoted"
    )
    assert "\n" not in str(caught.value)
    with pytest.raises(ComparisonError, match=r"^comparison.experiment='nope': no such MLflow experiment at .*'cmp'"):
        _compare(experiment="nope")
    # Parsed, but refused by the store: also one line, naming the key.
    with pytest.raises(ComparisonError, match=r"^comparison.filter_string=\"attributes.status > 'x'\": MLflow refused"):
        _compare(filter_string="attributes.status > 'x'")


def test_the_chart_has_a_bar_per_method_and_backend_and_the_teacher_marked(tracking) -> None:
    results, _, _ = _compare()
    figure = plot_comparison(results)

    toy, other = figure.axes
    assert (toy.get_title(), other.get_title()) == ("toy", "other")
    assert [t.get_text() for t in toy.get_xticklabels()] == ["photo", "night", "average"]
    bars = {c.get_label(): [b.get_height() for b in c] for c in toy.containers if hasattr(c, "patches")}
    assert list(bars) == ["vanilla · diffusion (1 run)", "vanilla · inversion (2 runs)", "mix · inversion (1 run)"]
    assert bars["vanilla · inversion (2 runs)"] == pytest.approx([0.70, 0.50, 0.60])
    teacher = [c for c in toy.collections if c.get_label() == "teacher zero-shot (ceiling)"][0]
    assert [segment[0][1] for segment in teacher.get_segments()] == pytest.approx([0.90, 0.80, 0.85])


def test_the_comparison_is_a_pipeline_but_not_part_of_kedro_run() -> None:
    from kedro.framework.project import configure_project

    configure_project("clip_dfkd")
    from clip_dfkd.pipeline_registry import STAGES, register_pipelines

    pipelines = register_pipelines()
    assert pipelines["comparison"].inputs() == {"params:comparison"}
    stage_nodes = {node.name for stage in STAGES for node in pipelines[stage].nodes}
    assert {node.name for node in pipelines["__default__"].nodes} == stage_nodes
    assert not {node.name for node in pipelines["comparison"].nodes} & stage_nodes


def _session_run(project: Path, pipelines: list[str] | None = None, params: dict | None = None) -> None:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="demo", runtime_params=params) as session:
        session.run(pipeline_names=pipelines)


def test_an_empty_experiment_fails_before_any_run_or_demo_asset_is_made(tmp_path, monkeypatch) -> None:
    project = make_project_copy(tmp_path / "project")  # no demo assets: they must not be built
    monkeypatch.chdir(project)

    with pytest.raises(PreflightError) as caught:
        _session_run(project, ["comparison"])

    assert str(caught.value).startswith(
        "comparison: no FINISHED run with ood_evaluation/ood_evaluation.csv in MLflow experiment 'clip-dfkd-demo'"
    )
    assert "`kedro run --env=demo --pipelines=comparison`" in str(caught.value)
    assert not (project / "data/06_models/demo").exists()
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("clip-dfkd-demo")
    assert client.search_runs([experiment.experiment_id]) == []


def test_two_demo_runs_make_a_two_row_comparison_logged_to_mlflow(fresh_project, monkeypatch) -> None:
    monkeypatch.chdir(fresh_project)
    for method in ("vanilla", "mix"):
        _session_run(fresh_project, params=plumbing_params({"prompt_generation": {"method": method}}))
    for _ in range(2):  # the first comparison's FINISHED run is no evaluation: the second skips it
        _session_run(fresh_project, ["comparison"])

    table = pd.read_csv(fresh_project / "data/08_reporting/comparison.csv")
    assert list(zip(table["method"], table["backend"], table["runs"], strict=True)) == [
        ("vanilla", "inversion", 1),
        ("mix", "inversion", 1),
    ]
    evaluation = pd.read_csv(fresh_project / "data/08_reporting/ood_evaluation.csv")  # the mix run's
    assert list(table.columns[3:]) == [f"demo_shapes/{d}" for d in evaluation["domain"]]
    assert set(evaluation["domain"]) == {"photo", "sketch", "cartoon", "night", "average"}
    results = pd.read_parquet(fresh_project / "data/07_model_output/comparison_results.parquet")
    mix = results[(results["method"] == "mix")].set_index("domain")
    assert mix.loc["average", "student_top1"] == pytest.approx(
        evaluation.set_index("domain").loc["average", "student_top1"]
    )
    client = mlflow.MlflowClient(f"sqlite:///{fresh_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("clip-dfkd-demo")
    comparison_run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert comparison_run.info.status == "FINISHED"
    assert comparison_run.data.params["comparison.filter_string"] == ""
    logged = {item.path for item in client.list_artifacts(comparison_run.info.run_id, "comparison")}
    assert logged == {"comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"}
