"""The student as an MLflow pyfunc model: encoded images or image files in, class name and
probability out.

Input: a DataFrame with two optional columns, and exactly one of them set in each row:

- ``image`` (MLflow ``binary``): the bytes of an encoded image file (PNG, JPEG, …). In JSON,
  e.g. a request to ``mlflow models serve``, they are base64 text, which MLflow decodes
  before the model sees them.
- ``path`` (MLflow ``string``): an image file on the machine that runs the model, read with
  its permissions; so expose a scoring server only to clients trusted with those files.

A JSON request sends one of the two columns (MLflow's base64 decoding does not accept nulls),
e.g. ``{"dataframe_split": {"columns": ["image"], "data": [["iVBORw0…"], …]}}``; in-process
callers may mix them row by row. Output: ``class_name`` (string) and ``probability`` (double,
the softmax probability of that class) per row, in input order.

A bad row (a missing or unreadable file, a folder, bytes that are no image, both or neither
column set) fails the whole batch with an ``MlflowException`` (``INVALID_PARAMETER_VALUE``,
HTTP 400 from the scoring server) whose one-line message names the row's 0-based position,
e.g. ``row 2: path '/x.png': no such file``: the output has no place for an error, and a
placeholder answer could be mistaken for a prediction. An input without rows fails the same
way: an empty answer would look like a client's images were classified.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from mlflow.types.schema import ColSpec, Schema
from PIL import Image, UnidentifiedImageError

import clip_dfkd
from clip_dfkd.imaging import CORRUPT_IMAGE_ERRORS, open_rgb
from clip_dfkd.models.student import StudentClassifier
from clip_dfkd.onnx_export import export_onnx, synthetic_pixels
from clip_dfkd.tracking import MODEL_STEP, link_latest_metrics

logger = logging.getLogger(__name__)

_STUDENT_ARTIFACT = "student"
_ONNX_ARTIFACT, _ONNX_FILE = "student_onnx", "student.onnx"
INPUT_COLUMNS = ("image", "path")

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.binary, "image", required=False),
            ColSpec(DataType.string, "path", required=False),
        ]
    ),
    outputs=Schema([ColSpec(DataType.string, "class_name"), ColSpec(DataType.double, "probability")]),
)


class StudentPyfunc(mlflow.pyfunc.PythonModel):
    """Classifies images with a saved student; preprocessing comes from the student's config.
    The input and error contract is in this module's docstring."""

    def load_context(self, context) -> None:
        self.student = StudentClassifier.from_pretrained(context.artifacts[_STUDENT_ARTIFACT])
        self.transform = self.student.eval_transform()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # MLflow drops columns outside the signature before calling us, so a frame with only
        # misnamed columns arrives here empty; say so instead of answering with no rows.
        if not set(INPUT_COLUMNS) & set(model_input.columns):
            raise MlflowException.invalid_parameter_value(
                "no image or path column in the input; allowed: image (encoded image bytes) and/or "
                "path (image file path), one of them per row"
            )
        if model_input.empty:
            raise MlflowException.invalid_parameter_value(
                "the input has no rows; allowed: one row per image, with its image or path set"
            )
        unset = pd.Series(None, index=model_input.index, dtype=object)
        rows = zip(model_input.get("image", unset), model_input.get("path", unset), strict=True)
        pixels = torch.stack([self.transform(_read_row(row, image, path)) for row, (image, path) in enumerate(rows)])
        with torch.inference_mode():
            probabilities = self.student(pixels).softmax(dim=-1)
        confidence, index = probabilities.max(dim=-1)
        return pd.DataFrame(
            {
                "class_name": [self.student.class_names[i] for i in index.tolist()],
                "probability": confidence.double().numpy(),
            }
        )


def _read_row(row: int, image: Any, path: Any) -> Image.Image:
    """The RGB image of one input row, or an error naming the row and what is wrong with it."""
    has_image, has_path = not _is_null(image), not _is_null(path)
    if has_image == has_path:
        which = "both image and path are set" if has_image else "neither image nor path is set"
        raise _row_error(row, f"{which}; allowed: exactly one of them per row")
    if has_path:
        if not isinstance(path, str | os.PathLike):
            raise _row_error(row, f"path is a {type(path).__name__}; allowed: an image file path")
        if Path(path).is_dir():
            raise _row_error(row, f"path {str(path)!r}: is a folder; allowed: an image file path")
        if not Path(path).is_file():
            raise _row_error(row, f"path {str(path)!r}: no such file")
        source, described = path, f"path {str(path)!r}"
    else:
        if not isinstance(image, bytes | bytearray):
            raise _row_error(
                row,
                f"image is a {type(image).__name__}; allowed: encoded image bytes (file paths go in the path column)",
            )
        source, described = bytes(image), f"image ({len(image)} bytes)"
    try:
        return open_rgb(source)
    except CORRUPT_IMAGE_ERRORS as exc:
        # PIL names the unknown format's source, which for bytes is an object address.
        reason = "unknown format" if isinstance(exc, UnidentifiedImageError) else " ".join(str(exc).split())
        raise _row_error(row, f"{described}: not a readable image ({reason})") from None


def _is_null(value: Any) -> bool:
    # pandas fills the unset cells of a column with None, NaN or pd.NA.
    return pd.api.types.is_scalar(value) and pd.isna(value)


def _row_error(row: int, problem: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"row {row}: {problem}")


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

    With ``onnx``, the run also gets the student as ONNX under ``student_onnx/``
    (``student.onnx`` and ``student.preprocessing.json``, see :mod:`clip_dfkd.onnx_export`),
    and the version a tag ``onnx_uri`` with its ``runs:/`` URI."""
    with tempfile.TemporaryDirectory() as scratch:
        student_dir = Path(scratch) / _STUDENT_ARTIFACT
        student.save_pretrained(student_dir)
        size = student.config["image_size"]
        example_image = Image.new("RGB", (size, size), (127, 127, 127))
        example = io.BytesIO()
        example_image.save(example, format="PNG")
        # Exported before the model is registered, so that an export failing its parity check
        # leaves no version behind. Checked on the input example and a few synthetic images:
        # this function gets no real ones.
        if onnx:
            sample = torch.cat([student.eval_transform()(example_image)[None], synthetic_pixels(student)])
            onnx_dir = Path(scratch) / _ONNX_ARTIFACT
            export_onnx(student, onnx_dir / _ONNX_FILE, sample)
            mlflow.log_artifacts(str(onnx_dir), artifact_path=_ONNX_ARTIFACT)
        info = mlflow.pyfunc.log_model(
            name="student",
            # Models from code: MLflow stores the script, not a pickle of the object.
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={_STUDENT_ARTIFACT: str(student_dir)},
            # The model needs clip_dfkd's student class at load time; shipping the package
            # keeps the registered model loadable where clip-dfkd is not installed.
            code_paths=[str(Path(clip_dfkd.__file__).parent)],
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
        # runs:/ resolves wherever the run's artifacts are stored: mlflow.artifacts.download_artifacts(uri).
        onnx_uri = f"runs:/{info.run_id}/{_ONNX_ARTIFACT}/{_ONNX_FILE}"
        client.set_model_version_tag(registered_name, version, "onnx_uri", onnx_uri)
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
