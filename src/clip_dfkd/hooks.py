"""Project hooks: typed parameters in MLflow, the demo's assets and device memory between
nodes (the checks that read the disk before a run are in :mod:`clip_dfkd.preflight`)."""

from __future__ import annotations

import json
import logging
import re
import shlex
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks import MlflowHook

from clip_dfkd.errors import UserError
from clip_dfkd.params import as_plain
from clip_dfkd.rerun import kedro_run_command
from clip_dfkd.runtime import release_device_memory

logger = logging.getLogger(__name__)

_SERVER_PROBE_SECONDS = 5.0

# The stages of a full `kedro run`, which the run name calls "all stages".
ALL_STAGES = "__default__"

# The process that runs a run: a run left RUNNING by a process that no longer exists (SIGKILL,
# out of memory, a machine restarted) is ended as KILLED by the next run. The process's start
# time tells it from a later process that was given the same pid.
PID_TAG = "clip_dfkd.pid"
HOST_TAG = "clip_dfkd.host"
PROCESS_STARTED_TAG = "clip_dfkd.process_started"
# psutil derives a start time from the boot time, which the kernel may report a second off
# from one process to the next.
_START_TIME_TOLERANCE_S = 1.0


class TypedParamsMlflowHook(MlflowHook):
    """kedro-mlflow's hook, fed plain dicts: it flattens dict parameters but would log a
    validated pydantic parameter as one long string.

    Its run is closed completely at the end of a pipeline only with ``tracking.run.nested:
    false`` in ``mlflow.yml`` (see the comment there and tests/test_mlflow_hook.py)."""

    @hook_impl
    def after_context_created(self, context) -> None:
        """kedro-mlflow's setup, after checking that a tracking server answers: MLflow would
        retry for minutes before failing with a connection error."""
        uri = (context.config_loader["mlflow"].get("server") or {}).get("mlflow_tracking_uri")
        if problem := tracking_server_problem(uri):
            raise UserError(problem)
        super().after_context_created(context)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        """kedro-mlflow's run, named after what runs and tagged so that runs can be told
        apart and reproduced: the env, the exact command, the project version and the git
        commit; kedro-mlflow's tags that are Python reprs are rewritten as plain text."""
        super().before_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
        import mlflow

        # kedro-mlflow starts no run for a pipeline it does not track.
        if mlflow.active_run() is None:
            return
        parameters = catalog.load("parameters")
        mlflow.set_tags(run_tags(run_params) | shard_tags(pipeline, catalog) | process_tags())
        mlflow.set_tag("mlflow.runName", run_name(run_params, parameters, pipeline))
        end_abandoned_runs(mlflow.active_run().info.experiment_id)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        """kedro-mlflow ends the run; then the run's last lines say where its results are."""
        import mlflow

        run = mlflow.active_run()
        super().after_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
        if run is None:
            return
        from mlflow.exceptions import MlflowException

        try:
            lines = results_summary(run.info.run_id, Path(run_params["project_path"]))
        except MlflowException as error:  # the run's outputs are whole: only the summary is lost
            logger.warning("The run finished; its summary could not be read from MLflow: %s", error)
            return
        for line in lines:
            logger.info(line)

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        plain = {name: as_plain(value) for name, value in inputs.items()}
        super().before_node_run(node=node, catalog=catalog, inputs=plain, is_async=is_async)


class DemoAssetsHook:
    """Builds the offline demo's tiny models and benchmark when the config asks for them
    (only ``conf/demo`` has a ``demo_assets`` section), once parameters have been validated
    and before the preflight checks look for them."""

    # The parameter section it reads, which no node takes (so that ParameterSectionsHook knows it).
    parameter_sections = ("demo_assets",)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        (section,) = self.parameter_sections
        raw = catalog.load("parameters").get(section)
        # The comparison reads tracked runs only: it needs no model and no benchmark.
        if raw is None or pipeline.inputs() <= {"params:comparison"}:
            return
        from clip_dfkd.demo import DemoAssetsParams, ensure_demo_assets

        ensure_demo_assets(DemoAssetsParams.model_validate(raw), Path(run_params["project_path"]))


class CutShortOutputsHook:
    """Tables, charts and JSON files are written in place by kedro-datasets: a save that fails
    half-way (a full disk) leaves a cut-short file under the output's name, which a rerun of a
    later stage would read as whole. When the run fails, the file of each save that started
    and did not finish is removed, so that an output is whole or absent."""

    def __init__(self) -> None:
        self._saving: set[str] = set()

    @hook_impl
    def before_dataset_saved(self, dataset_name: str) -> None:
        self._saving.add(dataset_name)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        self._saving.discard(dataset_name)

    @hook_impl
    def on_pipeline_error(self, catalog) -> None:
        from clip_dfkd.preflight import saved_file

        # Nothing here may raise: an error of this hook would hide the run's own.
        for name in sorted(self._saving):
            dataset = catalog.get(name)
            path = saved_file(dataset._describe()) if dataset is not None else None
            if path is not None and path.is_file():
                path.unlink(missing_ok=True)
                logger.warning("Removed %s: saving %s did not finish", path, name)
        self._saving.clear()


class DeviceMemoryHook:
    """Models live inside the node that loads them; before each node (and after the run) the
    device memory of those that are gone is handed back, so a stage starts with the GPU free
    of the last one's models and cache."""

    @hook_impl
    def before_node_run(self) -> None:
        release_device_memory()

    @hook_impl
    def after_pipeline_run(self) -> None:
        release_device_memory()


def run_name(run_params: dict[str, Any], parameters: dict[str, Any], pipeline) -> str:
    """What ran, e.g. ``vanilla prompts · inversion · all stages · demo`` or
    ``few-shot k=5 · ood_evaluation · demo``: first the settings that tell runs apart (the
    prompt method and synthesis backend when those stages ran, the few-shot setting when
    evaluation ran with one), which MLflow's narrow run-name column then shows; then the
    pipelines and the env."""
    settings = []
    ran = {node.namespace for node in pipeline.nodes}
    if "prompt_generation" in ran:
        settings.append(f"{_plain(parameters.get('prompt_generation'))['method']} prompts")
    if "image_synthesis" in ran:
        synthesis = _plain(parameters.get("image_synthesis"))
        settings.append(synthesis["backend"])
        if synthesis.get("num_shards", 1) > 1:
            settings.append(f"shard {synthesis.get('shard_index', 0)}/{synthesis['num_shards']}")
    if "ood_evaluation" in ran:
        k = _plain(parameters.get("ood_evaluation")).get("few_shot", {}).get("k", 0)
        if k:
            settings.append(f"few-shot k={k}")
    names = run_params.get("pipeline_names") or [ALL_STAGES]
    stages = " + ".join("all stages" if name == ALL_STAGES else name for name in names)
    return " · ".join([*settings, stages, _env(run_params)])


def results_summary(run_id: str, project_path: Path) -> list[str]:
    """Three or four lines for the end of a run: the MLflow run and how to open it, the models
    it registered with their aliases, and the reports on disk."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        where = f"{uri.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{run_id}"
    else:
        where = f"mlflow ui --backend-store-uri {uri}, then experiment {experiment.name}"
    lines = [f"MLflow run {run.info.run_name} ({run.info.status.lower()}): {where}"]
    for found in client.search_model_versions(f"run_id = '{run_id}'"):
        # A search does not fill in aliases; a version read by itself does.
        version = client.get_model_version(found.name, found.version)
        aliases = ", ".join(f"@{alias}" for alias in sorted(version.aliases)) or "no alias"
        lines.append(f"Registered model {version.name} version {version.version} ({aliases})")
    reports = project_path / "data" / "08_reporting"
    if reports.is_dir() and any(reports.iterdir()):
        lines.append(f"Reports: {reports}")
    return lines


def run_tags(run_params: dict[str, Any]) -> dict[str, str]:
    """The run's env, command, project version and git commit, and kedro-mlflow's own tags
    as plain text (it logs the runner, the pipeline names and the runtime parameters as
    Python reprs)."""
    project = Path(run_params["project_path"])
    tags = {
        "env": _env(run_params),
        "kedro_command": _command(run_params),
        "clip_dfkd_version": _project_version(),
        "runner": _runner_name(str(run_params.get("runner"))),
        "pipeline_names": ",".join(run_params.get("pipeline_names") or [ALL_STAGES]),
        "runtime_params": json.dumps(run_params.get("runtime_params") or {}, sort_keys=True),
    }
    if commit := _git_commit(project):
        tags["mlflow.source.git.commit"] = commit
    return tags


def process_tags() -> dict[str, str]:
    """This process: its pid, host and start time (seconds since the epoch)."""
    import psutil

    this = psutil.Process()
    return {PID_TAG: str(this.pid), HOST_TAG: socket.gethostname(), PROCESS_STARTED_TAG: repr(this.create_time())}


def end_abandoned_runs(experiment_id: str) -> None:
    """Ends as KILLED each run of the experiment that is RUNNING although the process of this
    host that ran it no longer exists, with a warning each. Runs of other hosts are left alone:
    their processes cannot be seen from here."""
    import mlflow
    import psutil

    client = mlflow.MlflowClient()
    for run in client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    ):
        pid, started = int(run.data.tags[PID_TAG]), float(run.data.tags[PROCESS_STARTED_TAG])
        try:
            if abs(psutil.Process(pid).create_time() - started) < _START_TIME_TOLERANCE_S:
                continue
        except psutil.NoSuchProcess:
            pass
        client.set_terminated(run.info.run_id, "KILLED")
        logger.warning(
            "MLflow run %s (%s) was left RUNNING by process %d, which no longer exists: marked KILLED",
            run.info.run_id,
            run.info.run_name,
            pid,
        )


def tracking_server_problem(uri: str | None) -> str | None:
    """Why the MLflow tracking server at ``uri`` cannot be used (nothing answers in a few
    seconds), or None; only http(s) URIs are servers."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        # Any answer counts: a server behind authentication answers 401 here.
        requests.get(f"{uri.rstrip('/')}/health", timeout=_SERVER_PROBE_SECONDS)
    except requests.RequestException as exc:
        return (
            f"MLflow tracking URI {uri!r}: no server answers there ({type(exc).__name__}); start it "
            "(`mlflow server ...`) or point MLFLOW_TRACKING_URI (or server.mlflow_tracking_uri in mlflow.yml) at one "
            "that runs"
        )
    return None


def shard_tags(pipeline, catalog) -> dict[str, str]:
    """A sharded synthesis run's shard (``k/N``) and the group its sibling runs share: a hash
    of what decides the images the N shards render together (the saved prompt table's bytes
    and the synthesis recipe), so the runs of one sharded job find each other
    (``tags.synthesis_shard_group = '…'``) without being told, and without reading a row."""
    if "params:image_synthesis" not in pipeline.inputs():
        return {}
    synthesis = catalog.load("params:image_synthesis")
    if synthesis.num_shards == 1:
        return {}
    from clip_dfkd.naming import stable_hash
    from clip_dfkd.pipelines.image_synthesis.nodes import synthesis_recipe

    recipe = synthesis_recipe(synthesis, catalog.load("params:teacher"))
    prompts = catalog["prompt_table"].content_digest()
    return {
        "synthesis_shard": f"{synthesis.shard_index}/{synthesis.num_shards}",
        "synthesis_shard_group": stable_hash(prompts, *recipe.values(), synthesis.num_shards, length=12),
    }


def _env(run_params: dict[str, Any]) -> str:
    # Kedro runs with the default run env (conf/local) on top of base when none is given.
    return run_params.get("env") or "local"


def _plain(section: Any) -> dict[str, Any]:
    return dict(as_plain(section) or {})


def _command(run_params: dict[str, Any]) -> str:
    """The command line when this process is ``kedro`` (or ``python -m kedro``); else (a
    notebook, a test) the equivalent ``kedro run`` command."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if program in ("kedro", "clip-dfkd") or sys.argv[0].endswith(("kedro/__main__.py", "clip_dfkd/__main__.py")):
        return shlex.join(["kedro", *sys.argv[1:]])
    options = []
    if names := run_params.get("pipeline_names"):
        options.append(f"--pipelines={','.join(names)}")
    for option in ("tags", "node_names", "from_nodes", "to_nodes", "from_inputs", "to_outputs", "namespaces"):
        if values := run_params.get(option):
            options.append(f"--{option.replace('_', '-').replace('node-names', 'nodes')}={','.join(values)}")
    return kedro_run_command(run_params, *options)


def _runner_name(text: str) -> str:
    """``<kedro.runner.sequential_runner.SequentialRunner object at 0x7f…>`` → ``SequentialRunner``;
    "None" (``session.run`` without a runner) is Kedro's default, the sequential runner."""
    if text == "None":
        return "SequentialRunner"
    match = re.fullmatch(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", text)
    return match.group(1).rsplit(".", 1)[-1] if match else text


def _project_version() -> str:
    try:
        return version("clip-dfkd")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _git_commit(project: Path) -> str | None:
    """The commit checked out in the project folder, or None outside a git work tree or
    without git."""
    try:
        result = subprocess.run(
            ["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
