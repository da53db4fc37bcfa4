"""The student as an ONNX model, for deployment without torch, timm or clip-dfkd.

``export_onnx`` writes ``student.onnx``: input ``pixels`` (float32, N×3×H×W, the student's
eval preprocessing already applied), output ``probabilities`` (N×classes, softmax), and beside
it ``student.preprocessing.json``: the class names in output order and the preprocessing as a
recipe that needs only PIL and numpy. Every export is checked against the torch student on a
sample batch; one that disagrees by more than ``PARITY_TOLERANCE`` is not written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clip_dfkd.atomic import atomic_file
from clip_dfkd.models.student import StudentClassifier

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
# Max abs difference in any probability between onnxruntime and torch. Their fp32 kernels differ
# by at most ~5e-7 on the students measured; a missing softmax or a wrong weight is far above.
PARITY_TOLERANCE = 1e-4
# timm's default when a data config has no crop_pct (timm.data.transforms_factory).
_DEFAULT_CROP_PCT = 0.875


class OnnxParityError(RuntimeError):
    """The exported model's probabilities differ from the torch student's."""


class _Probabilities(nn.Module):
    """The student with its softmax, so that the deployed model answers probabilities as the
    MLflow pyfunc model does."""

    def __init__(self, student: StudentClassifier) -> None:
        super().__init__()
        self.student = student

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.student(pixels).softmax(dim=-1)


def preprocessing_path(onnx_path: str | Path) -> Path:
    """Where the preprocessing sidecar of ``onnx_path`` lives: ``student.onnx`` ->
    ``student.preprocessing.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.preprocessing.json")


def export_onnx(student: StudentClassifier, path: str | Path, sample: torch.Tensor | None = None) -> Path:
    """Write ``student`` as ONNX to ``path`` and its preprocessing sidecar beside it, after
    checking the export against torch on ``sample`` (preprocessed pixels; default: a few
    deterministic synthetic ones). Both files appear together or not at all."""
    path = Path(path)
    # Before the export, so an unsupported preprocessing fails in a second, not after it.
    recipe = preprocessing_recipe(student)
    sample = synthetic_pixels(student) if sample is None else sample
    size = student.config["image_size"]
    device = next(student.parameters()).device
    with (
        _eval_mode(student),
        atomic_file(path) as onnx_staging,
        atomic_file(preprocessing_path(path)) as recipe_staging,
    ):
        # The dynamo exporter (torch.export + onnxscript): torch's default since 2.9; the
        # TorchScript one is deprecated. A batch of 2 to trace: torch.export specialises a
        # dimension whose example size is 1, which would fix the batch axis.
        torch.onnx.export(
            _Probabilities(student).eval(),
            (torch.zeros(2, 3, size, size, device=device),),
            onnx_staging,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            # One self-contained file; a student is far below protobuf's 2 GB limit.
            external_data=False,
            verbose=False,
        )
        parity = onnx_parity(student, onnx_staging, sample)
        # Written as "not <=" so that a NaN difference fails too.
        if not parity["max_abs_diff"] <= PARITY_TOLERANCE:
            raise OnnxParityError(
                f"ONNX export of {student.config['model_name']} disagrees with torch: max abs probability "
                f"difference {parity['max_abs_diff']:.3g} > tolerance {PARITY_TOLERANCE:g} on {parity['images']} "
                f"images (top-1 agreement {parity['top1_agreement']:.0%})"
            )
        recipe_staging.write_text(json.dumps(recipe, indent=2))
    return path


def onnx_parity(student: StudentClassifier, onnx_path: str | Path, pixels: torch.Tensor) -> dict[str, float | int]:
    """onnxruntime (CPU) against torch on the same preprocessed ``pixels``: the max abs
    difference of any probability, the share of images whose top-1 class agrees, and the
    number of images."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (exported,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.detach().float().cpu().numpy()})
    device = next(student.parameters()).device
    with _eval_mode(student), torch.inference_mode():
        expected = student(pixels.float().to(device)).softmax(dim=-1).cpu().numpy()
    return {
        "max_abs_diff": float(np.abs(exported - expected).max()),
        "top1_agreement": float((exported.argmax(axis=-1) == expected.argmax(axis=-1)).mean()),
        "images": len(pixels),
    }


def synthetic_pixels(student: StudentClassifier, count: int = 8, seed: int = 0) -> torch.Tensor:
    """Deterministic stand-ins for preprocessed images: uniform 0..1 RGB noise normalised with
    the student's mean and std, so the values span the range real inputs take."""
    data = student.config["data_config"]
    size = student.config["image_size"]
    rgb = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (rgb - torch.tensor(data["mean"]).view(1, 3, 1, 1)) / torch.tensor(data["std"]).view(1, 3, 1, 1)


def preprocessing_recipe(student: StudentClassifier) -> dict[str, Any]:
    """What ``student.eval_transform()`` does, as data and as steps a user follows with PIL and
    numpy (the sidecar's content)."""
    data = student.config["data_config"]
    size = student.config["image_size"]
    crop_mode = data.get("crop_mode") or "center"
    # timm: the image is resized to floor(size / crop_pct), then the centre is cropped.
    resize = math.floor(size / (data.get("crop_pct") or _DEFAULT_CROP_PCT))
    if crop_mode not in ("center", "squash") or resize < size:
        # "border" pads, and crop_pct > 1 pads the crop: neither is described below.
        raise ValueError(
            f"data_config crop_mode={crop_mode!r}, crop_pct={data.get('crop_pct')}: no ONNX preprocessing recipe; "
            "allowed: crop_mode center or squash with crop_pct <= 1"
        )
    interpolation = data["interpolation"]
    if crop_mode == "center":
        edge = "shorter"
        resize_step = (
            f"Resize with PIL {interpolation} so that the shorter side is {resize} px and the longer "
            f"floor({resize} * longer / shorter) px."
        )
    else:
        edge = "both"
        resize_step = f"Resize with PIL {interpolation} to {resize}x{resize} px (the aspect ratio is not kept)."
    return {
        "model": {"input": INPUT_NAME, "output": OUTPUT_NAME},
        "class_names": list(student.class_names),
        "image_size": size,
        "resize": {"edge": edge, "size": resize, "interpolation": interpolation},
        "center_crop": size,
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "steps": [
            "Decode the image as 8-bit RGB.",
            resize_step,
            f"Crop the centre {size}x{size} px: left = round((width - {size}) / 2), "
            f"top = round((height - {size}) / 2), halves rounded to even (Python's round).",
            "Divide by 255, then per channel (R, G, B) subtract mean and divide by std.",
            f"Feed float32 '{INPUT_NAME}' of shape N x 3 x {size} x {size} (channels first); "
            f"'{OUTPUT_NAME}'[n, i] is the probability of class_names[i].",
        ],
        # The same preprocessing for timm users: timm.data.create_transform(**timm_data_config).
        "timm_data_config": dict(data),
    }


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    # Export and compare in eval mode (BatchNorm's running statistics), then leave the
    # caller's module in the mode it was in.
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
