"""MLflow for teams: the demo tracked by an `mlflow server` (database backend, artifact
store), as a team would share one, and a server that does not answer."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import mlflow
import pytest
import requests
from conftest import StagedDemoProject

from clip_dfkd.errors import UserError

pytestmark = pytest.mark.heavy

REGISTERED = "clip-dfkd-demo-student"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a local artifact folder."""
    root = tmp_path_factory.mktemp("mlflow_server")
    uri = f"http://127.0.0.1:{_free_port()}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        uri.rsplit(":", 1)[1],
        "--workers",
        "1",
    ]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield uri, root
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_demo_tracks_and_registers_on_an_mlflow_server(tracking_server, new_project, monkeypatch) -> None:
    uri, root = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    project = new_project("server_demo")
    monkeypatch.chdir(project)
    staged = StagedDemoProject(project)
    with staged.session(runtime_params={"student_distillation": {"registry": {"export_onnx": True}}}) as session:
        session.run()

    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias(REGISTERED, "candidate")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert "ood/demo_shapes/average/student_top1" in run.data.metrics
    # Artifacts went through the server into its artifact store, not into the project.
    assert any((root / "artifacts").rglob("MLmodel")) and any((root / "artifacts").rglob("model.onnx"))
    onnx_model = client.get_logged_model(version.tags["onnx_model_uri"].removeprefix("models:/"))
    assert onnx_model.name == "student_onnx" and onnx_model.source_run_id == version.run_id
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@candidate")
    assert model.metadata.run_id == version.run_id


def test_a_tracking_server_that_does_not_answer_fails_in_one_line(fresh_project, monkeypatch) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(fresh_project)
    with pytest.raises(UserError) as error, StagedDemoProject(fresh_project).session() as session:
        session.run(pipeline_names=["prompt_generation"])
    assert str(error.value) == (
        f"MLflow tracking URI {uri!r}: no server answers there (ConnectionError); start it (`mlflow server ...`) "
        "or point MLFLOW_TRACKING_URI (or server.mlflow_tracking_uri in mlflow.yml) at one that runs"
    )
