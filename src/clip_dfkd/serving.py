"""Registration of the student as an MLflow model: the student in timm's own format (a folder
that ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads), served by
:mod:`clip_dfkd.served_model`, which MLflow stores with it beside :mod:`clip_dfkd.imaging`, the
image decoding it shares with evaluation. That module states the served input and output."""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

from clip_dfkd.models.student import StudentClassifier
from clip_dfkd.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, preprocessing_path, synthetic_pixels
from clip_dfkd.tracking import MODEL_STEP, link_latest_metrics

logger = logging.getLogger(__name__)

STUDENT_ARTIFACT = "student"  # the artifact name served_model.py reads
_ONNX_MODEL, _ONNX_FILE = "student_onnx", "student.onnx"

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.binary, "image", required=False),
            ColSpec(DataType.string, "path", required=False),
        ]
    ),
    outputs=Schema([ColSpec(DataType.string, "class_name"), ColSpec(DataType.double, "probability")]),
)


def register_student_model(
    student: StudentClassifier,
    registered_name: str,
    alias: str,
    tags: dict[str, str],
    description: str,
    training_metrics: Callable[[str], bool],
    onnx: bool = True,
) -> dict[str, str]:
    """Log ``student`` to the active MLflow run as a pyfunc model carrying the latest point of
    the run's ``training_metrics`` (the final epoch's) and ``description``, register a new
    version of ``registered_name`` with ``tags`` and ``description`` and move ``alias`` to it.

    With ``onnx``, the run also logs the student as an ONNX model ``student_onnx`` (MLflow's
    onnx flavour, with ``student.preprocessing.json`` among its files; see
    :mod:`clip_dfkd.onnx_export`), and the version gets a tag ``onnx_model_uri`` with its
    ``models:/`` URI."""
    with tempfile.TemporaryDirectory() as scratch:
        student_dir = Path(scratch) / STUDENT_ARTIFACT
        student.save_for_timm(student_dir)
        size = student.config["image_size"]
        example_image = Image.new("RGB", (size, size), (127, 127, 127))
        example = io.BytesIO()
        example_image.save(example, format="PNG")
        # Exported before the model is registered, so that an export failing its parity check
        # leaves no version behind. Checked on the input example and a few synthetic images:
        # this function gets no real ones.
        if onnx:
            sample = torch.cat([student.eval_transform()(example_image)[None], synthetic_pixels(student)])
            onnx_model_uri = _log_onnx_model(student, Path(scratch) / _ONNX_FILE, sample, description)
        info = mlflow.pyfunc.log_model(
            name="student",
            # Models from code: MLflow stores the script, not a pickle of the object.
            python_model=str(Path(__file__).with_name("served_model.py")),
            artifacts={STUDENT_ARTIFACT: str(student_dir)},
            # The image decoding that evaluation uses, so that served images are read alike;
            # it imports no other module of the project.
            code_paths=[str(Path(__file__).with_name("imaging.py"))],
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [example.getvalue()]}),
            pip_requirements=_requirements(),
            registered_model_name=registered_name,
            # The logged model's page shows this tag as its description.
            tags={**tags, "mlflow.note.content": description},
            step=MODEL_STEP,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    link_latest_metrics(client, info.run_id, info.model_id, training_metrics)
    client.update_model_version(registered_name, version, description=description)
    client.update_registered_model(
        registered_name,
        description=(
            "Students distilled from a CLIP teacher by clip-dfkd, without real training images. Each version's "
            "description says what it classifies and how it was made, then its latest evaluation; "
            f"@{alias} is the newest; ood_evaluation moves its promotion alias (@champion by default) only to "
            "versions that beat it on the same class list and benchmark folder."
        ),
    )
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    if onnx:
        client.set_model_version_tag(registered_name, version, "onnx_model_uri", onnx_model_uri)
    client.set_registered_model_alias(registered_name, alias, version)
    uri = f"models:/{registered_name}@{alias}"
    logger.info("Registered %s version %s as %s", registered_name, version, uri)
    return {"name": registered_name, "version": version, "alias": alias, "uri": uri, "run_id": info.run_id}


def _log_onnx_model(student: StudentClassifier, path: Path, sample: torch.Tensor, description: str) -> str:
    """Export ``student`` to ``path`` (checked against torch on ``sample``), log it as an MLflow
    ONNX model with its preprocessing recipe, and return the model's ``models:/`` URI."""
    import numpy as np
    import onnx
    from mlflow.types.schema import TensorSpec

    export_onnx(student, path, sample)
    size, classes = student.config["image_size"], len(student.class_names)
    info = mlflow.onnx.log_model(
        onnx.load(str(path)),
        name=_ONNX_MODEL,
        signature=ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size), INPUT_NAME)]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), OUTPUT_NAME)]),
        ),
        input_example={INPUT_NAME: sample[:1].numpy()},
        extra_files=[str(preprocessing_path(path))],
        save_as_external_data=False,
        tags={"mlflow.note.content": f"{description}\n\nAs ONNX: preprocess as student.preprocessing.json says."},
        step=MODEL_STEP,
    )
    return f"models:/{info.model_id}"


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{package}=={version(package)}"
        for package in ("torch", "torchvision", "timm", "safetensors", "pillow", "pandas")
    ]
