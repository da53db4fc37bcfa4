"""The registered student as MLflow serves it: encoded images or image files in, class name
and probability out.

MLflow stores this file with the model ("models from code") beside ``imaging.py`` (the image
decoding evaluation uses too, shipped as a code path), and the student in timm's own format;
loading runs this file, which needs mlflow, timm, torch, pillow and pandas, not clip-dfkd.

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

import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import timm
import torch
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError

try:  # the copy stored with the model (code_paths), where the model is loaded
    from imaging import CORRUPT_IMAGE_ERRORS, open_rgb
except ModuleNotFoundError:  # the project's own, where MLflow runs this file to log it
    from clip_dfkd.imaging import CORRUPT_IMAGE_ERRORS, open_rgb

STUDENT_ARTIFACT = "student"
INPUT_COLUMNS = ("image", "path")


class StudentPyfunc(mlflow.pyfunc.PythonModel):
    """Classifies images with the student; preprocessing and class names come from its timm
    config. The input and error contract is in this module's docstring."""

    def load_context(self, context) -> None:
        self.student = timm.create_model(f"local-dir:{context.artifacts[STUDENT_ARTIFACT]}", pretrained=True).eval()
        self.class_names = self.student.pretrained_cfg["label_names"]
        data_config = timm.data.resolve_model_data_config(self.student)
        self.transform = timm.data.create_transform(**data_config, is_training=False)

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
                "class_name": [self.class_names[i] for i in index.tolist()],
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


mlflow.models.set_model(StudentPyfunc())
