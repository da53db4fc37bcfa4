"""The student preprocesses exactly as timm does for its backbone, also after a save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_dfkd.models import ModelNotFoundError, StudentClassifier, create_student
from clip_dfkd.params import StudentParams

CLASSES = ["ball", "box", "tent"]


def _photo() -> Image.Image:
    """Non-square, so that resize-then-crop differs from a plain resize."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 411, 3), dtype=np.uint8))


def _timm_eval_transform(image_size: int):
    import timm

    reference = timm.create_model("resnet18", num_classes=len(CLASSES))
    config = timm.data.resolve_model_data_config(reference)
    return timm.data.create_transform(**{**config, "input_size": (3, image_size, image_size)})


@pytest.mark.parametrize("image_size", [224, 96])
def test_eval_transform_is_timms_and_survives_save_and_load(tmp_path, image_size: int) -> None:
    student = create_student(StudentParams(model_name="resnet18", image_size=image_size), CLASSES)
    photo = _photo()
    expected = _timm_eval_transform(image_size)(photo)

    assert expected.shape == (3, image_size, image_size)
    assert torch.equal(student.eval_transform()(photo), expected)

    student.save_pretrained(tmp_path / "student")
    loaded = StudentClassifier.from_pretrained(tmp_path / "student")
    assert torch.equal(loaded.eval_transform()(photo), expected)
    assert loaded.config == student.config

    data_config = json.loads((tmp_path / "student" / "config.json").read_text())["data_config"]
    assert data_config["input_size"] == [3, image_size, image_size]
    # resnet18's pretrained config, not torchvision's defaults (bilinear, no crop margin).
    assert data_config["interpolation"] == "bicubic"
    assert data_config["crop_pct"] == 0.95
    assert data_config["mean"] == [0.485, 0.456, 0.406]
    assert data_config["std"] == [0.229, 0.224, 0.225]


def test_a_student_saved_before_timm_data_configs_is_refused(tmp_path) -> None:
    student = create_student(StudentParams(model_name="test_resnet", image_size=32), CLASSES)
    student.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["data_config"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "mean": [0.5] * 3, "std": [0.5] * 3}))

    with pytest.raises(ModelNotFoundError, match="no data_config") as caught:
        StudentClassifier.from_pretrained(tmp_path)
    assert "\n" not in str(caught.value)


def test_an_image_size_that_disagrees_with_the_saved_data_config_is_refused(tmp_path) -> None:
    student = create_student(StudentParams(model_name="test_resnet", image_size=32), CLASSES)
    student.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "image_size": 48}))

    with pytest.raises(ValueError, match=r"data_config.input_size=\[3, 32, 32\]: disagrees with image_size=48"):
        StudentClassifier.from_pretrained(tmp_path)


def test_a_student_checkpoint_must_hold_its_architecture_but_the_classifier(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from clip_dfkd.models.student import missing_student_weights

    def saved(model_name: str, **kwargs) -> str:
        model = timm.create_model(model_name, **kwargs)
        path = tmp_path / f"{model_name}-{len(kwargs)}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return str(path)

    # Another class count only changes the classifier, which a new student replaces.
    assert missing_student_weights(StudentParams(model_name="resnet18", checkpoint_path=saved("resnet18"))) is None
    assert (
        missing_student_weights(StudentParams(model_name="resnet18", checkpoint_path=saved("resnet18", num_classes=7)))
        is None
    )
    problem = missing_student_weights(StudentParams(model_name="resnet50", checkpoint_path=saved("resnet18")))
    assert problem.startswith("student_distillation.student.checkpoint_path=")
    assert "does not fit timm model 'resnet50' (layer1.0.conv1.weight is [64, 64, 1, 1] in the model" in problem
    # Disjoint names: timm would load nothing, non-strictly, and train from random weights.
    problem = missing_student_weights(StudentParams(model_name="test_resnet", checkpoint_path=saved("test_vit")))
    assert "tensors are missing, e.g." in problem


@pytest.mark.parametrize("model_name", ["test_resnet", "test_mambaout"])
def test_the_projection_reads_the_pooled_features_the_classifier_reads(model_name) -> None:
    """MambaOut's head has a hidden layer: its pre-logits are wider than ``num_features``."""
    student = create_student(StudentParams(model_name=model_name, image_size=32), CLASSES, embedding_dim=8)

    logits, projected = student.forward_distill(torch.randn(2, 3, 32, 32))

    assert logits.shape == (2, len(CLASSES)) and projected.shape == (2, 8)


def test_a_narrowed_student_is_rebuilt_as_it_was_trained(tmp_path) -> None:
    """``model_kwargs`` travel in config.json: without them the saved weights would not fit the
    family's default widths and the load would fail (or, for a checkpoint, half-load)."""
    narrow = StudentParams(model_name="resnet10t", image_size=32, model_kwargs={"channels": [8, 16, 32, 64]})
    student = create_student(narrow, CLASSES).eval()
    default_size = sum(p.numel() for p in create_student(StudentParams(model_name="resnet10t"), CLASSES).parameters())
    assert sum(p.numel() for p in student.parameters()) < default_size / 20

    student.save_pretrained(tmp_path)
    loaded = StudentClassifier.from_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), student(pixels))
    assert loaded.config["model_kwargs"] == {"channels": [8, 16, 32, 64]}


def test_model_kwargs_timm_refuses_fail_in_one_line_before_any_work() -> None:
    from clip_dfkd.params import InvalidParameterError, StudentDistillationParams

    section = {"student": {"model_name": "resnet10t", "model_kwargs": {"chanels": [8, 16, 32, 64]}}}
    with pytest.raises(InvalidParameterError) as caught:
        StudentDistillationParams.model_validate(section)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("student_distillation.student.model_kwargs={'chanels': [8, 16, 32, 64]}: ")
    assert "allowed: keyword arguments" in message
