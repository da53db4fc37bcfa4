"""The student as ONNX: on the demo's benchmark drawings, onnxruntime answers the probabilities
the torch student answers, and the sidecar's recipe, followed with PIL and numpy alone, gives
the pixels the student's own eval transform gives.

The student knows its world, so that its probabilities are far from uniform and top-1 is no
coin toss: the plumbing budget's pipeline student sits at chance (22 % top-1 on these
drawings, every top probability 0.25-0.28), where nearly any export would look equal.
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clip_dfkd.demo.world import draw
from clip_dfkd.imaging import open_rgb
from clip_dfkd.models import StudentClassifier
from clip_dfkd.onnx_export import (
    OnnxParityError,
    _Probabilities,
    export_onnx,
    onnx_parity,
    preprocessing_path,
)

# The deployment contract, pinned here rather than read from clip_dfkd.onnx_export.
TOLERANCE = 1e-4
IMAGES_PER_CLASS_AND_DOMAIN = 2  # 4 domains x 4 classes x 2 = 32 benchmark drawings
DRAWINGS_PER_CLASS_AND_STYLE = 30  # the student's training set: 4 classes x 3 styles x 30


@pytest.fixture(scope="module")
def student(demo_project, demo_assets) -> StudentClassifier:
    """A test_resnet distilled from the demo teacher by the pipeline's own train_student, on
    drawings of the teacher's training styles that the teacher labelled (seconds on a CPU)."""
    from clip_dfkd.models import load_teacher
    from clip_dfkd.params import ClassNames, RuntimeParams, StudentDistillationParams, TeacherParams
    from clip_dfkd.pipelines.student_distillation.nodes import train_student
    from clip_dfkd.runtime import Runtime

    parameters = demo_project.catalog().load("parameters")
    teacher_params = TeacherParams.model_validate(parameters["teacher"])
    classes = ClassNames.model_validate(parameters["classes"])
    runtime = RuntimeParams(device="cpu")
    teacher = load_teacher(teacher_params, Runtime.resolve(runtime))
    rng = random.Random("onnx-export-test")  # drawing seeds apart from the benchmark's
    drawings = {
        f"{class_name}-{style}-{n}": partial(draw, class_name, style, rng.randrange(2**31), demo_assets.image_size)
        for class_name in classes
        for style in demo_assets.teacher_training.styles
        for n in range(DRAWINGS_PER_CLASS_AND_STYLE)
    }
    head = teacher.zero_shot_weights(list(classes), teacher_params.templates)
    logits, embeddings = teacher.classify_images(list(drawings.values()), head, 64, "Labelling drawings")
    labels = pd.DataFrame(
        {
            "image_id": list(drawings),
            "kept": True,
            "teacher_logits": list(logits.numpy()),
            "teacher_embedding": list(embeddings.numpy()),
        }
    )
    params = StudentDistillationParams.model_validate(
        {
            "student": {"model_name": "test_resnet", "image_size": demo_assets.image_size},
            "training": {"epochs": 10, "batch_size": 32, "learning_rate": 3e-3},
            "teacher_targets": "centre",
        }
    )
    no_views = pd.DataFrame(columns=["image_id", "augmentation"])
    return train_student(drawings, labels, no_views, classes, teacher_params, params, runtime)[0]


@pytest.fixture(scope="module")
def benchmark(demo_assets) -> tuple[list[Image.Image], np.ndarray]:
    """Drawings of every class in every domain of the demo benchmark, the unseen night
    included, and their class indices."""
    root = Path(demo_assets.benchmark_root)
    images, labels = [], []
    for domain in demo_assets.benchmark_domains:
        for label, class_name in enumerate(demo_assets.benchmark_classes):
            for file in sorted((root / domain / class_name).glob("*.png"))[:IMAGES_PER_CLASS_AND_DOMAIN]:
                images.append(open_rgb(file))
                labels.append(label)
    return images, np.array(labels)


def _pixels(student: StudentClassifier, images: list[Image.Image]) -> torch.Tensor:
    transform = student.eval_transform()
    return torch.stack([transform(image) for image in images])


@pytest.fixture(scope="module")
def exported(student, benchmark, tmp_path_factory) -> Path:
    return export_onnx(student, tmp_path_factory.mktemp("onnx") / "student.onnx", _pixels(student, benchmark[0]))


def test_onnxruntime_answers_the_students_probabilities_on_benchmark_drawings(student, benchmark, exported) -> None:
    import onnxruntime

    images, labels = benchmark
    pixels = _pixels(student, images)

    parity = onnx_parity(student, exported, pixels)

    assert parity["images"] == len(images) >= 16
    assert parity["max_abs_diff"] <= TOLERANCE, parity
    assert parity["top1_agreement"] == 1.0, parity
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"pixels": pixels.numpy()})[0]
    # Probabilities, not logits, from a student that knows the drawings (chance is 25 %).
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert (probabilities.argmax(axis=1) == labels).mean() >= 0.6
    assert np.median(probabilities.max(axis=1)) >= 0.8
    # The batch axis is free: one image answers as it does in a batch of 32.
    single = session.run(["probabilities"], {"pixels": pixels[:1].numpy()})[0]
    np.testing.assert_allclose(single, probabilities[:1], atol=TOLERANCE)


def test_an_export_failing_its_parity_check_is_a_one_line_error_and_leaves_nothing(
    student, benchmark, tmp_path, monkeypatch
) -> None:
    # The classic export slip: the deployed graph answers logits.
    monkeypatch.setattr(_Probabilities, "forward", lambda self, pixels: self.student(pixels))

    with pytest.raises(OnnxParityError, match=r"max abs probability difference \S+ > tolerance 0\.0001") as caught:
        export_onnx(student, tmp_path / "student.onnx", _pixels(student, benchmark[0]))
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def _photo(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _preprocess(image: Image.Image, recipe: dict) -> np.ndarray:
    """The sidecar's recipe with PIL and numpy only, as a deployment without torch runs it."""
    resize = recipe["resize"]
    width, height = image.size
    if resize["edge"] == "both":
        size = (resize["size"], resize["size"])
    elif width <= height:
        size = (resize["size"], int(resize["size"] * height / width))
    else:
        size = (int(resize["size"] * width / height), resize["size"])
    image = image.convert("RGB").resize(size, Image.Resampling[resize["interpolation"].upper()])
    array = np.asarray(image, dtype=np.float32) / 255
    crop = recipe["center_crop"]
    top, left = round((array.shape[0] - crop) / 2), round((array.shape[1] - crop) / 2)
    array = array[top : top + crop, left : left + crop]
    array = (array - np.array(recipe["mean"], dtype=np.float32)) / np.array(recipe["std"], dtype=np.float32)
    return array.transpose(2, 0, 1)


# Other preprocessing than the demo student's (bilinear, mean 0.5, crop_pct 0.95): an ImageNet
# ResNet's, and a squashing one.
IMAGENET = {"interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
OTHER_PREPROCESSING = {
    "imagenet-center": {**IMAGENET, "crop_pct": 0.875, "crop_mode": "center"},
    "squash": {**IMAGENET, "crop_pct": 0.9, "crop_mode": "squash"},
}


@pytest.mark.parametrize("preprocessing", ["demo student", *OTHER_PREPROCESSING])
def test_the_sidecar_recipe_reproduces_the_eval_transform(
    preprocessing, student, exported, benchmark, tmp_path
) -> None:
    if preprocessing != "demo student":
        data_config = {"input_size": [3, 32, 32], **OTHER_PREPROCESSING[preprocessing]}
        student = StudentClassifier("test_resnet", student.class_names, 32, data_config=data_config)
        exported = export_onnx(student, tmp_path / "student.onnx")
    recipe = json.loads(preprocessing_path(exported).read_text())
    # Drawings and odd-sized photos: the longer side's rounding and the crop offsets matter.
    images = benchmark[0][:8] + [_photo(h, w, seed) for seed, (h, w) in enumerate([(375, 500), (481, 640), (47, 33)])]

    ours = np.stack([_preprocess(image, recipe) for image in images])

    assert recipe["class_names"] == student.class_names
    assert recipe["image_size"] == 32
    np.testing.assert_allclose(ours, _pixels(student, images).numpy(), rtol=0, atol=1e-6)
