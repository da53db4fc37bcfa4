"""The project's `kedro run`: user errors on one line, bugs with their traceback, Ctrl-C and
SIGTERM leaving the MLflow run KILLED, and no library warnings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import make_project_copy
from kedro.framework.cli.project import run as kedro_run
from kedro.io import DatasetError
from kedro.validation import ParameterValidationError

from clip_dfkd.cli import cli, guarded, run, user_error_message
from clip_dfkd.errors import UserError
from clip_dfkd.preflight import PreflightError

pytestmark = pytest.mark.heavy

# A warning as Python formats it ("<file>:<line>: <Category>: <message>"), on stderr or in
# Kedro's log.
WARNING_LINE = re.compile(r"\S+:\d+: (\w+): ")


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "400"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _kedro(project: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=project, env=_env(), capture_output=True, text=True, timeout=timeout
    )


# --- user errors and bugs, in-process -------------------------------------------------


def _kedro_report(*problems: str) -> ParameterValidationError:
    """What Kedro's ParameterValidator raises for these problems."""
    return ParameterValidationError("Parameter validation failed:\n" + "\n".join(f"- {p}" for p in problems))


def test_user_errors_are_found_in_the_exception_chain() -> None:
    try:
        try:
            raise PreflightError("teacher.pretrained='x': no such checkpoint file\nood_evaluation: no such folder")
        except PreflightError as exc:
            raise DatasetError("Failed while loading data from dataset") from exc
    except DatasetError as wrapped:
        assert user_error_message(wrapped) == (
            "teacher.pretrained='x': no such checkpoint file\nood_evaluation: no such folder"
        )
    assert user_error_message(RuntimeError("boom")) is None


def test_kedro_parameter_errors_count_as_user_errors_only_when_every_problem_is_ours() -> None:
    ours = "Parameter 'image_synthesis': Failed to instantiate ImageSynthesisParams for parameter 'image_synthesis': "
    width = "image_synthesis.generator.width=100: must be a multiple of 8"
    assert user_error_message(_kedro_report(ours + width)) == width
    assert user_error_message(
        _kedro_report(ours + width, "Parameter 'teacher': value is None but type is not Optional")
    ) == (width + "\nteacher=None: must be set, not null")
    # A validator that crashed: Kedro reports its text the same way, but it names no key.
    crashed = ours + "'NoneType' object has no attribute 'height'"
    assert user_error_message(_kedro_report(crashed)) is None
    assert user_error_message(_kedro_report(ours + width, crashed)) is None
    assert user_error_message(ParameterValidationError("")) is None


def test_a_bug_propagates_with_its_traceback() -> None:
    def buggy() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug") as caught:
        guarded(buggy)()
    # The wrapper re-raises the exception itself: its traceback still ends in buggy().
    assert caught.traceback[-1].name == "buggy"

    result = CliRunner().invoke(click.Command("cmd", callback=guarded(buggy)))
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_a_user_error_becomes_one_click_error_line() -> None:
    def wrong() -> None:
        raise UserError("teacher.batch_size=0: must be positive")

    result = CliRunner().invoke(click.Command("cmd", callback=guarded(wrong)))
    assert result.exit_code == 1
    assert result.output == "Error: teacher.batch_size=0: must be positive\n"


def _ctrl_c() -> None:
    raise KeyboardInterrupt


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler raises before this ends


def test_ctrl_c_and_sigterm_end_every_active_mlflow_run_as_killed(tmp_path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # An experiment of this store: an earlier test's active experiment lives in another one.
    mlflow.set_experiment("interrupted")
    client = mlflow.MlflowClient()
    handler = signal.getsignal(signal.SIGTERM)
    for stop, exit_code, reason in ((_ctrl_c, 130, "Interrupted"), (_sigterm_self, 143, "Terminated")):
        outer = mlflow.start_run()
        inner = mlflow.start_run(nested=True)

        result = CliRunner().invoke(click.Command("cmd", callback=guarded(stop)))
        assert result.exit_code == exit_code
        assert mlflow.active_run() is None
        assert client.get_run(outer.info.run_id).info.status == "KILLED"
        assert client.get_run(inner.info.run_id).info.status == "KILLED"
        assert result.output.strip() == (
            f"{reason}: MLflow run {inner.info.run_id}, {outer.info.run_id} ended as KILLED."
        )
        assert signal.getsignal(signal.SIGTERM) is handler  # installed for the command only


def test_sigterm_to_every_process_of_a_job_kills_a_forked_worker_and_the_runs_once(tmp_path: Path) -> None:
    """A DataLoader worker, forked during the run, inherits the handler; Slurm signals every
    process of the job. The worker dies of SIGTERM as without the handler, touching no run, and
    its death does not disturb the main process ending its runs (torch's SIGCHLD handler raises
    when a worker dies)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("terminated")
    run = mlflow.start_run()
    workers = []

    def worker_died(signum, frame) -> None:
        raise RuntimeError("DataLoader worker is killed by signal: Terminated")

    def job() -> None:
        signal.signal(signal.SIGCHLD, worker_died)
        ready, started = os.pipe()
        worker = os.fork()
        if worker == 0:
            try:
                # A signal that comes while os.fork() returns is dropped: say when it may come.
                os.write(started, b".")
                time.sleep(30)  # the handler ends the worker before this ends
            finally:
                os._exit(0)  # never a second pytest
        workers.append(worker)
        os.read(ready, 1)
        os.close(ready)
        os.close(started)
        for pid in (worker, os.getpid()):
            os.kill(pid, signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends

    sigchld = signal.getsignal(signal.SIGCHLD)
    try:
        result = CliRunner().invoke(click.Command("cmd", callback=guarded(job)))
        _, status = os.waitpid(workers[0], 0)
    finally:
        signal.signal(signal.SIGCHLD, sigchld)

    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert result.exit_code == 143, result.output
    assert result.output.strip() == f"Terminated: MLflow run {run.info.run_id} ended as KILLED."
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "KILLED"


def test_run_is_kedros_own_command_with_every_option() -> None:
    assert cli.commands["run"] is run
    assert run.params is kedro_run.params
    assert run.help == kedro_run.help
    assert run.callback.__wrapped__ is kedro_run.callback


# --- `kedro run` in a subprocess ------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("command", "params", "expected"),
    [
        (
            ["-m", "kedro", "run"],
            "image_synthesis.generator.width=100",
            "Error: image_synthesis.generator.width=100: must be a multiple of 8",
        ),
        (
            ["-m", "clip_dfkd"],
            "image_synthesis.generator.width=100",
            "Error: image_synthesis.generator.width=100: must be a multiple of 8",
        ),
        (
            ["-m", "kedro", "run"],
            "teacher.pretrained=/nope/x.safetensors",
            "Error: teacher.pretrained='/nope/x.safetensors': no such checkpoint file; allowed: ",
        ),
    ],
    ids=["bad-parameter", "bad-parameter-python-m", "missing-teacher-weights"],
)
def test_a_user_error_is_one_line_without_traceback(fresh_project: Path, command, params, expected) -> None:
    result = _kedro(fresh_project, *command, "--env=demo", f"--params={params}")

    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(expected)
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_a_misspelt_parameter_section_fails_before_the_demo_assets_and_the_mlflow_run(tmp_path: Path) -> None:
    import mlflow

    project = make_project_copy(tmp_path / "project")  # no demo assets: the check comes before they are built
    result = _kedro(project, "-m", "kedro", "run", "--env=demo", "--params=promt_generation.method=mix")

    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: promt_generation: not a parameter section that any pipeline reads, so its values would be ignored; "
        "did you mean prompt_generation? allowed: classes, comparison, demo_assets, image_synthesis, ood_evaluation, "
        "prompt_generation, runtime, student_distillation, teacher, teacher_labeling"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.search_runs([experiment.experiment_id for experiment in client.search_experiments()]) == []
    assert not (project / "data/06_models/demo").exists()


@pytest.mark.timeout(300)
def test_library_warnings_are_hidden(fresh_project: Path) -> None:
    # -W default also shows the deprecation warnings that Python hides by default (pytest
    # and developers see those); the project's filters come first and still apply.
    result = _kedro(fresh_project, "-W", "default", "-m", "kedro", "run", "--env=demo", "--pipelines=prompt_generation")

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert [match.group(0) for match in WARNING_LINE.finditer(output)] == []


def test_the_warning_filters_are_specific() -> None:
    from clip_dfkd.library_warnings import ignore_library_warnings

    resolver = "register_new_resolver() is deprecated and will be removed in a future release."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_library_warnings()
        warnings.warn_explicit(resolver, UserWarning, "omegaconf_config.py", 1, module="kedro.config.omegaconf_config")
        warnings.warn_explicit(resolver, UserWarning, "nodes.py", 1, module="clip_dfkd.pipelines.prompt_generation")
        warnings.warn_explicit("another", UserWarning, "omegaconf_config.py", 2, module="kedro.config.omegaconf_config")
        warnings.warn_explicit("old", DeprecationWarning, "nodes.py", 2, module="clip_dfkd.pipelines.prompt_generation")

    assert [str(w.message) for w in caught] == [resolver, "another", "old"]


@pytest.mark.timeout(420)
def test_ctrl_c_leaves_the_mlflow_run_killed(fresh_project: Path) -> None:
    import mlflow

    images = fresh_project / "data/03_primary/synthetic_images"
    with (fresh_project / "out.log").open("w") as out, (fresh_project / "err.log").open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "kedro", "run", "--env=demo"],
            cwd=fresh_project,
            env=_env(),
            stdout=out,
            stderr=err,
            # Ctrl-C as in a terminal, also when the tests were started as a background job
            # (a shell without job control starts those with SIGINT ignored, and children inherit it).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            # Image synthesis (240 images, most of a minute) runs inside the MLflow run.
            deadline = time.monotonic() + 300
            while not any(images.rglob("*.png")):
                assert process.poll() is None, (fresh_project / "err.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no image was synthesised in time"
                time.sleep(0.2)
            client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{fresh_project / 'mlflow.db'}")
            (run_before,) = client.search_runs([client.get_experiment_by_name("clip-dfkd-demo").experiment_id])
            assert run_before.info.status == "RUNNING"
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=120)
        finally:
            process.kill()

    stderr = (fresh_project / "err.log").read_text()
    assert returncode == 130, stderr[-3000:]
    assert client.get_run(run_before.info.run_id).info.status == "KILLED"
    # A progress bar that the interruption left open may print its last state after it.
    assert f"Interrupted: MLflow run {run_before.info.run_id} ended as KILLED." in stderr.splitlines()
    # Interrupted mid-synthesis, before the later stages.
    assert len(list(images.rglob("*.png"))) < 240


@pytest.mark.timeout(300)
def test_sigterm_leaves_the_mlflow_run_killed(fresh_project: Path) -> None:
    """As `timeout`, `docker stop`, Slurm or Kubernetes stop a run: SIGTERM while a node runs
    (in the main thread: Kedro's default, sequential runner). A cheap node that runs long:
    contrastive prompts learnt for a million iterations."""
    import mlflow

    long_node = "prompt_generation.method=contrastive,prompt_generation.contrastive.iterations=1000000"
    command = ["-m", "kedro", "run", "--env=demo", "--pipelines=prompt_generation", f"--params={long_node}"]
    with (fresh_project / "err.log").open("w") as err, (fresh_project / "out.log").open("w") as out:
        process = subprocess.Popen([sys.executable, *command], cwd=fresh_project, env=_env(), stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 240
            # Kedro logs (to stdout) that the node starts.
            while "Running node: build_style_bank" not in (fresh_project / "out.log").read_text():
                assert process.poll() is None, (fresh_project / "err.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the node did not start in time"
                time.sleep(0.2)
            process.terminate()
            returncode = process.wait(timeout=120)
        finally:
            process.kill()

    stderr = (fresh_project / "err.log").read_text()
    assert returncode == 143, stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{fresh_project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("clip-dfkd-demo").experiment_id])
    assert run.info.status == "KILLED"
    assert [line for line in stderr.splitlines() if line.startswith("Terminated")] == [
        f"Terminated: MLflow run {run.info.run_id} ended as KILLED."
    ]


def test_a_full_disk_under_a_kedro_datasets_output_is_one_line_naming_its_file(tmp_path, monkeypatch) -> None:
    """kedro-datasets' writers (Parquet here) raise the bare OSError, without a file name,
    inside Kedro's DatasetError: the command line still names the file and the space left."""
    import errno

    import pandas as pd
    from kedro_datasets.pandas import ParquetDataset

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    table = tmp_path / "08_reporting" / "ood_evaluation.parquet"
    with pytest.raises(DatasetError) as caught:
        ParquetDataset(filepath=str(table)).save(pd.DataFrame({"a": [1]}))

    assert re.fullmatch(
        rf"{table}: no space left on device \(\S+ \S?B free on /\S*\); free some space there or point the output "
        "elsewhere",
        user_error_message(caught.value) or "",
    ), caught.value
    # Any other OSError is no user error: it keeps its traceback.
    assert user_error_message(DatasetError("Failed while saving data to dataset X")) is None
    assert user_error_message(OSError(errno.EACCES, "Permission denied")) is None
