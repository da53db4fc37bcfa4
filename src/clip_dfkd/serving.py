"""The student as an MLflow pyfunc model: image files or bytes in, class name and probability out."""

from __future__ import annotations

import base64
import binascii
import logging
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, Schema
from PIL import Image

import clip_dfkd
from clip_dfkd.imaging import open_rgb
from clip_dfkd.models.student import StudentClassifier

logger = logging.getLogger(__name__)

_STUDENT_ARTIFACT = "student"

# ``image`` holds a file path (str) or encoded image bytes, hence ``Any``.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType(), "image")]),
    outputs=Schema([ColSpec("string", "class_name"), ColSpec("double", "probability")]),
)


class StudentPyfunc(mlflow.pyfunc.PythonModel):
    """Classifies images with a saved student; preprocessing comes from the student's config."""

    def load_context(self, context) -> None:
        self.student = StudentClassifier.from_pretrained(context.artifacts[_STUDENT_ARTIFACT])
        self.transform = self.student.eval_transform()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        pixels = torch.stack([self.transform(open_rgb(_image_source(value))) for value in model_input["image"]])
        with torch.inference_mode():
            probabilities = self.student(pixels).softmax(dim=-1)
        confidence, index = probabilities.max(dim=-1)
        return pd.DataFrame(
            {
                "class_name": [self.student.class_names[i] for i in index.tolist()],
                "probability": confidence.double().numpy(),
            }
        )


def _image_source(value: str | bytes) -> str | bytes:
    """A file path or encoded bytes; JSON (the REST scoring server, logged input examples)
    carries bytes as base64 text, so text that is no existing file is decoded as base64."""
    if isinstance(value, bytes | bytearray) or Path(value).is_file():
        return value
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FileNotFoundError(f"image={value[:80]!r}: no such file, and not base64-encoded image bytes") from None


def register_student_model(
    student: StudentClassifier, registered_name: str, alias: str, tags: dict[str, str]
) -> dict[str, str]:
    """Log ``student`` to the active MLflow run as a pyfunc model, register a new version of
    ``registered_name`` with ``tags`` and move ``alias`` to it."""
    with tempfile.TemporaryDirectory() as scratch:
        student_dir = Path(scratch) / _STUDENT_ARTIFACT
        student.save_pretrained(student_dir)
        size = student.config["image_size"]
        example_path = Path(scratch) / "example.png"
        Image.new("RGB", (size, size), (127, 127, 127)).save(example_path)
        info = mlflow.pyfunc.log_model(
            name="student",
            # Models from code: MLflow stores the script, not a pickle of the object.
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={_STUDENT_ARTIFACT: str(student_dir)},
            # The model needs clip_dfkd's student class at load time; shipping the package
            # keeps the registered model loadable where clip-dfkd is not installed.
            code_paths=[str(Path(clip_dfkd.__file__).parent)],
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [example_path.read_bytes()]}),
            pip_requirements=_requirements(),
            registered_model_name=registered_name,
            tags=tags,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    client.set_registered_model_alias(registered_name, alias, version)
    uri = f"models:/{registered_name}@{alias}"
    logger.info("Registered %s version %s as %s", registered_name, version, uri)
    return {"name": registered_name, "version": version, "alias": alias, "uri": uri, "run_id": info.run_id}


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{package}=={version(package)}"
        for package in ("torch", "torchvision", "timm", "safetensors", "pillow", "pandas", "pydantic")
    ]
