"""The registered student as its clients use it: in-process through ``mlflow.pyfunc`` and over
HTTP through ``mlflow models serve``, with image bytes or image file paths."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clip_dfkd.imaging import open_rgb
from clip_dfkd.models import create_student
from clip_dfkd.params import StudentParams
from clip_dfkd.serving import register_student_model

CLASSES = ["ball", "box", "tent"]
MODEL_NAME = "serving-test-student"
SERVER_START_TIMEOUT_S = 120


def _photo(height: int, width: int, seed: int) -> Image.Image:
    """A smooth gradient with noise: compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A random ``test_resnet`` student registered in a fresh sqlite store, and real-size
    PNG and JPEG files to classify."""
    import mlflow

    root = tmp_path_factory.mktemp("serving")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
    student = create_student(StudentParams(model_name="test_resnet", image_size=32), CLASSES).eval()
    with mlflow.start_run(experiment_id=experiment):
        for epoch, loss in enumerate([0.9, 0.5, 0.2]):
            mlflow.log_metric("training/loss", loss, step=epoch)
        mlflow.log_metric("prompts/diversity/average", 0.3, step=0)  # another stage's figure, not the model's
        registration = register_student_model(
            student,
            MODEL_NAME,
            "candidate",
            {"student": "test_resnet"},
            description="A test_resnet classifier of three classes.",
            training_metrics=lambda key: key.startswith("training/"),
        )
    png, jpeg = root / "photo.png", root / "photo.jpg"
    _photo(480, 640, seed=0).save(png)
    _photo(375, 500, seed=1).save(jpeg, quality=90)
    return SimpleNamespace(
        tracking_uri=tracking_uri,
        uri=registration["uri"],
        registration=registration,
        student=student,
        root=root,
        files=[png, jpeg],
    )


@pytest.fixture(scope="module")
def model(registered: SimpleNamespace):
    import mlflow

    mlflow.set_tracking_uri(registered.tracking_uri)
    return mlflow.pyfunc.load_model(registered.uri)


def _check_answers(predictions: pd.DataFrame, rows: int) -> None:
    assert list(predictions.columns) == ["class_name", "probability"]
    assert len(predictions) == rows
    assert set(predictions["class_name"]) <= set(CLASSES)
    # The top class of three has at least a third of the probability mass.
    assert predictions["probability"].between(1 / 3, 1).all()


def test_bytes_and_paths_give_the_students_own_prediction(registered, model) -> None:
    files = registered.files
    by_bytes = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    by_path = model.predict(pd.DataFrame({"path": [str(f) for f in files]}))
    mixed = model.predict(pd.DataFrame({"image": [files[0].read_bytes(), None], "path": [None, str(files[1])]}))

    _check_answers(by_bytes, rows=2)
    pd.testing.assert_frame_equal(by_path, by_bytes)
    pd.testing.assert_frame_equal(mixed, by_bytes)
    # The served preprocessing is the student's own.
    transform = registered.student.eval_transform()
    with torch.no_grad():
        logits = registered.student(torch.stack([transform(open_rgb(f)) for f in files]))
    confidence, index = logits.softmax(-1).max(-1)
    assert list(by_bytes["class_name"]) == [CLASSES[i] for i in index.tolist()]
    assert by_bytes["probability"].tolist() == pytest.approx(confidence.tolist(), rel=1e-6)


def test_the_registered_model_is_timms_folder_and_the_serving_module_alone(registered, model) -> None:
    """What MLflow stores: the student as timm saves it, and as code only the serving module and
    the image decoding it shares with evaluation; it loads and answers where clip_dfkd cannot
    be imported."""
    import mlflow
    import timm

    stored = Path(mlflow.artifacts.download_artifacts(registered.uri, tracking_uri=registered.tracking_uri))
    assert sorted(p.name for p in (stored / "code").iterdir()) == ["imaging.py"]
    assert sorted(p.name for p in stored.glob("*.py")) == ["served_model.py"]
    assert sorted(p.name for p in (stored / "artifacts" / "student").iterdir()) == ["config.json", "model.safetensors"]
    backbone = timm.create_model(f"local-dir:{stored / 'artifacts' / 'student'}", pretrained=True).eval()
    assert backbone.pretrained_cfg["label_names"] == CLASSES
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(pixels), registered.student(pixels))

    script = (
        "import sys; sys.modules['clip_dfkd'] = None\n"  # any import of the package fails
        "import mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({registered.tracking_uri!r})\n"
        f"model = mlflow.pyfunc.load_model({registered.uri!r})\n"
        f"print(model.predict(pd.DataFrame({{'path': {[str(f) for f in registered.files]!r}}})).to_json())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = pd.read_json(io.StringIO(result.stdout.strip().splitlines()[-1]))
    here = model.predict(pd.DataFrame({"path": [str(f) for f in registered.files]}))
    assert alone["class_name"].tolist() == here["class_name"].tolist()
    assert alone["probability"].tolist() == pytest.approx(here["probability"].tolist(), rel=1e-6)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"path": ["{png}", "/no/such/photo.png"]}, "row 1: path '/no/such/photo.png': no such file"),
        ({"path": ["{png}", "{root}"]}, "row 1: path '{root}': is a folder; allowed: an image file path"),
        ({"image": ["{png_bytes}", b"not an image"]}, r"row 1: image \(12 bytes\): not a readable image \(unknown"),
        ({"image": ["{png_bytes}", b"\x89PNG\r\n\x1a\n" + b"\0" * 8]}, r"row 1: image \(16 bytes\): not a readable"),
        ({"image": ["{png}"]}, "row 0: image is a str; allowed: encoded image bytes"),
        ({"image": ["{png_bytes}", None], "path": [None, None]}, "row 1: neither image nor path is set"),
        ({"image": ["{png_bytes}"], "path": ["{png}"]}, "row 0: both image and path are set; allowed: exactly one"),
        ({"images": ["{png_bytes}"]}, "no image or path column in the input; allowed: image"),
    ],
)
def test_a_bad_row_is_a_one_line_error_naming_it(registered, model, columns, message) -> None:
    from mlflow.exceptions import MlflowException

    png = registered.files[0]
    values = {"{png}": str(png), "{root}": str(registered.root), "{png_bytes}": png.read_bytes()}
    frame = pd.DataFrame({name: [values.get(v, v) for v in column] for name, column in columns.items()})

    with pytest.raises(MlflowException, match=message.replace("{root}", str(registered.root))) as caught:
        model.predict(frame)
    assert "\n" not in caught.value.message


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the mlflow CLI and its uvicorn), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def scoring_server(registered: SimpleNamespace):
    """``mlflow models serve`` for the registered alias, on a free loopback port."""
    import requests

    port = _free_loopback_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered.tracking_uri,
        # The CLI starts ``uvicorn`` by name: find the one installed next to this Python.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = (registered.root / "server.log").open("w")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", registered.uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    http = requests.Session()
    http.trust_env = False  # never through a proxy: the server is on loopback
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {server.returncode}: {_tail(registered.root)}")
            try:
                if http.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve not up after {SERVER_START_TIMEOUT_S} s: {_tail(registered.root)}")
            time.sleep(0.5)
        yield lambda payload: http.post(f"{base}/invocations", json=payload, timeout=60)
    finally:
        http.close()
        _stop(server)
        log.close()


@pytest.mark.parametrize("column", ["image", "path"])
def test_an_input_without_rows_is_a_one_line_error(model, column) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as caught:
        model.predict(pd.DataFrame({column: pd.Series([], dtype=object)}))
    assert caught.value.message == "the input has no rows; allowed: one row per image, with its image or path set"


def _tail(root: Path) -> str:
    return (root / "server.log").read_text()[-2000:]


def _one_column(name: str, values: list[str]) -> dict:
    """A JSON request body as a client writes it: a pandas split frame of one column."""
    return {"dataframe_split": {"columns": [name], "data": [[value] for value in values]}}


def _predictions(response) -> pd.DataFrame:
    assert response.status_code == 200, response.text[-2000:]
    return pd.DataFrame(response.json()["predictions"])


@pytest.mark.timeout(300)
def test_scoring_server_classifies_base64_images_and_paths(registered, model, scoring_server) -> None:
    files = registered.files
    encoded = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
    assert len(encoded[0]) > 100_000  # real-size images, far beyond a file name's length

    by_bytes = _predictions(scoring_server(_one_column("image", encoded)))
    by_path = _predictions(scoring_server(_one_column("path", [str(f) for f in files])))

    _check_answers(by_bytes, rows=2)
    pd.testing.assert_frame_equal(by_path, by_bytes)
    in_process = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert list(by_bytes["class_name"]) == list(in_process["class_name"])
    # Another process may pick other CPU kernels, hence not bit-exact.
    assert by_bytes["probability"].tolist() == pytest.approx(in_process["probability"].tolist(), rel=1e-5)


@pytest.mark.timeout(300)
def test_scoring_server_accepts_the_logged_input_example(registered, scoring_server) -> None:
    import mlflow

    mlflow.set_tracking_uri(registered.tracking_uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(registered.uri, dst_path=str(registered.root / "example")))
    example = json.loads((model_dir / "serving_input_example.json").read_text())

    _check_answers(_predictions(scoring_server(example)), rows=1)


@pytest.mark.timeout(300)
def test_scoring_server_answers_a_bad_row_with_400_naming_it(registered, scoring_server) -> None:
    missing = str(registered.root / "missing.png")

    response = scoring_server(_one_column("path", [str(registered.files[0]), missing]))

    assert response.status_code == 400
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert f"row 1: path '{missing}': no such file" in response.json()["message"]
    empty = scoring_server(_one_column("image", []))
    assert empty.status_code == 400
    assert "the input has no rows; allowed: one row per image" in empty.json()["message"]


def test_the_registered_model_carries_its_final_training_metrics_and_a_description(registered) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(registered.tracking_uri)
    version = client.get_model_version(MODEL_NAME, registered.registration["version"])
    logged = client.get_logged_model(version.source.removeprefix("models:/"))

    assert [(m.key, m.value, m.step) for m in logged.metrics] == [("training/loss", 0.2, 2)]
    # Linking adds no point to the run's own history.
    assert [m.value for m in client.get_metric_history(registered.registration["run_id"], "training/loss")] == [
        0.9,
        0.5,
        0.2,
    ]
    assert version.description == "A test_resnet classifier of three classes."
    assert logged.tags["mlflow.note.content"] == version.description  # the logged model's page
    assert client.get_registered_model(MODEL_NAME).description.startswith("Students distilled from a CLIP teacher")


def test_the_registered_version_points_at_its_onnx_model(registered) -> None:
    """The ONNX export is an MLflow model of its own (onnx flavour, with a signature and the
    preprocessing recipe among its files) that pyfunc runs under onnxruntime."""
    import json

    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(registered.tracking_uri)
    version = client.get_model_version(MODEL_NAME, registered.registration["version"])
    uri = version.tags["onnx_model_uri"]
    assert uri.startswith("models:/m-")

    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert logged.name == "student_onnx" and logged.source_run_id == registered.registration["run_id"]
    onnx_model = mlflow.pyfunc.load_model(uri)
    assert onnx_model.loader_module == "mlflow.onnx"
    assert [spec.name for spec in onnx_model.metadata.get_input_schema().inputs] == ["pixels"]
    stored = Path(mlflow.artifacts.download_artifacts(uri, tracking_uri=registered.tracking_uri))
    assert (stored / "model.onnx").is_file()
    recipe = json.loads((stored / "extra_files" / "student.preprocessing.json").read_text())
    assert recipe["class_names"] == CLASSES
    # What a deployment loads by the tag answers the student's own probabilities.
    transform = registered.student.eval_transform()
    pixels = torch.stack([transform(open_rgb(f)) for f in registered.files])
    with torch.no_grad():
        expected = registered.student(pixels).softmax(-1).numpy()
    np.testing.assert_allclose(onnx_model.predict({"pixels": pixels.numpy()})["probabilities"], expected, atol=1e-4)
