"""Each `session.run` in one process gets an MLflow run of its own, closed when it ends."""

from __future__ import annotations

import contextlib
import json
import re
from importlib.metadata import version

from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project


def test_two_session_runs_in_one_process_log_to_two_finished_runs(new_project) -> None:
    import mlflow

    project = new_project("two_runs")
    with contextlib.chdir(project):
        bootstrap_project(project)
        for method in ("vanilla", "mix"):
            with KedroSession.create(
                project_path=project, env="demo", runtime_params={"prompt_generation": {"method": method}}
            ) as session:
                session.run(pipeline_names=["prompt_generation"])
            assert mlflow.active_run() is None  # else the next session would log into this run

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("clip-dfkd-demo")
    runs = mlflow.search_runs([experiment.experiment_id], order_by=["start_time ASC"], output_format="list")
    assert [run.info.status for run in runs] == ["FINISHED", "FINISHED"]
    assert [run.data.params["prompt_generation.method"] for run in runs] == ["vanilla", "mix"]
    assert not any("mlflow.parentRunId" in run.data.tags for run in runs)


def test_runs_are_named_after_what_ran_and_tagged_to_be_reproduced(new_project) -> None:
    import mlflow

    project = new_project("named_runs")
    with contextlib.chdir(project):
        bootstrap_project(project)
        with KedroSession.create(
            project_path=project, env="demo", runtime_params={"prompt_generation": {"method": "mix"}}
        ) as session:
            session.run(pipeline_names=["prompt_generation"])

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("clip-dfkd-demo").experiment_id], output_format="list")
    tags = run.data.tags
    assert run.info.run_name == "prompt_generation · demo · mix prompts"
    assert tags["env"] == "demo"
    assert tags["kedro_command"] == (
        "kedro run --pipelines=prompt_generation --env=demo --params=prompt_generation.method=mix"
    )
    assert tags["clip_dfkd_version"] == version("clip-dfkd")
    assert tags["runner"] == "SequentialRunner"
    assert tags["pipeline_names"] == "prompt_generation"
    assert json.loads(tags["runtime_params"]) == {"prompt_generation": {"method": "mix"}}
    # Python reprs: an object's address, single-quoted lists and dicts (JSON, which MLflow's own
    # tags use, has double quotes).
    assert not [value for value in tags.values() if re.search(r"object at 0x|^\['|^\{'", value)]


def test_the_run_name_says_the_stages_env_method_backend_and_few_shot_setting() -> None:
    from kedro.pipeline import Node, Pipeline

    from clip_dfkd.hooks import run_name

    def stage(namespace: str) -> Pipeline:
        return Pipeline([Node(lambda: 1, None, f"{namespace}_out", name="n")], namespace=namespace)

    everything = sum((stage(s) for s in ("prompt_generation", "image_synthesis", "ood_evaluation")), Pipeline([]))
    parameters = {
        "prompt_generation": {"method": "contrastive"},
        "image_synthesis": {"backend": "diffusion"},
        "ood_evaluation": {"few_shot": {"k": 5}},
    }

    assert run_name({"pipeline_names": None, "env": None}, parameters, everything) == (
        "all stages · local · contrastive prompts · diffusion · few-shot k=5"
    )
    assert run_name({"pipeline_names": ["ood_evaluation"], "env": "demo"}, {}, stage("ood_evaluation")) == (
        "ood_evaluation · demo"
    )
