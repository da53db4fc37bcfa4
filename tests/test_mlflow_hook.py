"""Each `session.run` in one process gets an MLflow run of its own, closed when it ends."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
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
    assert run.info.run_name == "mix prompts · prompt_generation · demo"
    assert tags["env"] == "demo"
    assert tags["kedro_command"] == (
        "kedro run --env=demo --pipelines=prompt_generation --params=prompt_generation.method=mix"
    )
    assert tags["clip_dfkd_version"] == version("clip-dfkd")
    assert tags["runner"] == "SequentialRunner"
    assert tags["pipeline_names"] == "prompt_generation"
    assert json.loads(tags["runtime_params"]) == {"prompt_generation": {"method": "mix"}}
    # Python reprs: an object's address, single-quoted lists and dicts (JSON, which MLflow's own
    # tags use, has double quotes).
    assert not [value for value in tags.values() if re.search(r"object at 0x|^\['|^\{'", value)]


def test_a_run_ends_as_killed_the_runs_that_gone_processes_of_this_host_left_running(new_project, caplog) -> None:
    import mlflow

    from clip_dfkd.hooks import HOST_TAG, PID_TAG, PROCESS_STARTED_TAG, process_tags

    project = new_project("abandoned_runs")
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.create_experiment("clip-dfkd-demo", artifact_location=str(project / "mlartifacts"))
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    this = process_tags()
    left_running = {
        "gone": this | {PID_TAG: str(gone)},
        # This pid, but an earlier process's start time: the pid was reused.
        "reused": this | {PROCESS_STARTED_TAG: repr(float(this[PROCESS_STARTED_TAG]) - 3600)},
        "alive": this,
        "other host": this | {PID_TAG: str(gone), HOST_TAG: "another-host"},
    }
    ids = {
        name: client.create_run(experiment, tags=tags, run_name=name).info.run_id for name, tags in left_running.items()
    }

    with contextlib.chdir(project), caplog.at_level(logging.WARNING, logger="clip_dfkd.hooks"):
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env="demo") as session:
            session.run(pipeline_names=["prompt_generation"])

    assert {name: client.get_run(run_id).info.status for name, run_id in ids.items()} == {
        "gone": "KILLED",
        "reused": "KILLED",
        "alive": "RUNNING",
        "other host": "RUNNING",
    }
    assert (
        f"MLflow run {ids['gone']} (gone) was left RUNNING by process {gone}, which no longer exists: marked KILLED"
    ) in caplog.text
    (new,) = [run for run in client.search_runs([experiment]) if run.info.run_id not in ids.values()]
    assert new.info.status == "FINISHED"
    assert (new.data.tags[PID_TAG], new.data.tags[HOST_TAG]) == (str(os.getpid()), socket.gethostname())


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
        "contrastive prompts · diffusion · few-shot k=5 · all stages · local"
    )
    assert run_name({"pipeline_names": ["ood_evaluation"], "env": "demo"}, {}, stage("ood_evaluation")) == (
        "ood_evaluation · demo"
    )
