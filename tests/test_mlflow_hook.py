"""Each `session.run` in one process gets an MLflow run of its own, closed when it ends."""

from __future__ import annotations

import contextlib

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
