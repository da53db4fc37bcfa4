"""Reading the tracked runs that the comparison compares: every finished ood_evaluation run of the
experiment, its evaluation table and the student it scored, downloaded from its artifacts. The
one module of the comparison that reads MLflow."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from clip_dfkd.errors import UserError
from clip_dfkd.params import ComparisonParams
from clip_dfkd.rerun import kedro_run_command

EVALUATION_FOLDER = "ood_evaluation"
EVALUATION_ARTIFACT = f"{EVALUATION_FOLDER}/ood_evaluation.csv"
STUDENT_ARTIFACT = f"{EVALUATION_FOLDER}/ood_evaluated_student.json"
METHOD_PARAM = "prompt_generation.method"
BACKEND_PARAM = "image_synthesis.backend"
SEARCH_PAGE = 1000


class ComparisonError(UserError, ValueError):
    """No run to compare, or a comparison setting that names nothing; one line."""


@dataclass(frozen=True)
class TrackedEvaluation:
    """A FINISHED run with an ood_evaluation table and the record of the student it scored
    (``None`` when only listed, or for the record when the run logged none)."""

    run_id: str
    run_name: str
    start_time: pd.Timestamp
    params: dict[str, str]
    table: pd.DataFrame | None
    evaluated_student: dict | None = None


@dataclass(frozen=True)
class EvaluationSearch:
    """What a search of the tracked runs found, and what it left out."""

    experiment: str
    tracking_uri: str
    filter_string: str
    evaluations: list[TrackedEvaluation]
    not_finished: int
    without_evaluation: int

    def where(self) -> str:
        matching = f' matching filter "{self.filter_string}"' if self.filter_string else ""
        return f"MLflow experiment {self.experiment!r} at {self.tracking_uri}{matching}"

    def nothing_found(self, run_params: dict[str, Any] | None = None) -> str:
        """The one-line error for a search that found no run to compare; its commands have the
        env and parameters of ``run_params`` (see :func:`clip_dfkd.rerun.kedro_run_command`)."""
        found = self.not_finished + self.without_evaluation
        left_out = (
            f"{found} runs found: {self.not_finished} not FINISHED, {self.without_evaluation} without an evaluation"
            if found
            else "no run found"
        )
        fill = kedro_run_command(run_params, params={METHOD_PARAM: "mix"})
        compare = kedro_run_command(run_params, "--pipelines=comparison")
        return (
            f"comparison: no FINISHED run with {EVALUATION_ARTIFACT} in {self.where()} ({left_out}); "
            f"fill it with a run per prompt method, e.g. `{fill}` (vanilla, mix, random, contrastive), "
            f"then rerun `{compare}`"
        )


@contextlib.contextmanager
def _no_progress_bars():
    """Without MLflow's progress bar per downloaded artifact (one per run, on stderr)."""
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def search_evaluations(experiment: str | None, filter_string: str, download: bool = True) -> EvaluationSearch:
    """The FINISHED runs of ``experiment`` that match ``filter_string`` and carry an
    ood_evaluation table, oldest first, with the table and the evaluated student's record
    read from the artifacts (only listed when ``download`` is false). ``experiment`` None is
    the active run's experiment, else the one kedro-mlflow set (``mlflow.set_experiment``
    exports ``MLFLOW_EXPERIMENT_ID``). The active run (the comparison's own) is never
    returned, nor counted."""
    import mlflow
    from mlflow.entities import ViewType
    from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(uri)
    active = mlflow.active_run()
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ComparisonError(
                f"comparison.experiment={experiment!r}: no such MLflow experiment at {uri}; "
                f"allowed: one of {names}, or null for the project's own"
            )
    elif (experiment_id := active.info.experiment_id if active else MLFLOW_EXPERIMENT_ID.get()) is not None:
        found = client.get_experiment(experiment_id)
    else:
        raise ComparisonError(
            "comparison.experiment=None: no MLflow experiment is active (a `kedro run` sets the project's own); "
            "allowed: the name of the experiment to compare the runs of"
        )
    runs, token = [], None
    try:
        while True:
            page = client.search_runs(
                [found.experiment_id],
                filter_string,
                ViewType.ACTIVE_ONLY,
                max_results=SEARCH_PAGE,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            runs += page
            if not (token := page.token):
                break
    except MlflowException as exc:
        if exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise ComparisonError(
            f"comparison.filter_string={filter_string!r}: MLflow refused it ({' '.join(exc.message.split())}); "
            "allowed: an MLflow search filter, e.g. params.prompt_generation.method = 'mix'"
        ) from None
    runs = [run for run in runs if active is None or run.info.run_id != active.info.run_id]
    finished = [run for run in runs if run.info.status == "FINISHED"]
    evaluations = []
    with tempfile.TemporaryDirectory() as scratch, _no_progress_bars():
        for run in finished:
            run_id = run.info.run_id
            listed = {item.path for item in client.list_artifacts(run_id, EVALUATION_FOLDER)}
            if EVALUATION_ARTIFACT not in listed:
                continue
            table, student = None, None
            if download:
                table = pd.read_csv(_download(uri, run_id, EVALUATION_ARTIFACT, scratch))
                if STUDENT_ARTIFACT in listed:
                    student = json.loads(Path(_download(uri, run_id, STUDENT_ARTIFACT, scratch)).read_text())
            started = pd.Timestamp(run.info.start_time, unit="ms", tz="UTC")
            evaluations.append(
                TrackedEvaluation(run_id, run.info.run_name, started, dict(run.data.params), table, student)
            )
    return EvaluationSearch(
        experiment=found.name,
        tracking_uri=uri,
        filter_string=filter_string,
        evaluations=evaluations,
        not_finished=len(runs) - len(finished),
        without_evaluation=len(finished) - len(evaluations),
    )


def _download(tracking_uri: str, run_id: str, artifact: str, scratch: str) -> str:
    """The local path of run ``run_id``'s ``artifact``, downloaded under ``scratch``."""
    import mlflow

    return mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact, dst_path=f"{scratch}/{run_id}", tracking_uri=tracking_uri
    )


def comparison_problem(params: ComparisonParams, run_params: dict[str, Any] | None = None) -> str | None:
    """Why the comparison would find nothing to compare, or None; for the preflight checks,
    which run before the comparison's own MLflow run starts."""
    try:
        search = search_evaluations(params.experiment, params.filter_string, download=False)
    except ComparisonError as exc:
        return str(exc)
    return None if search.evaluations else search.nothing_found(run_params)
