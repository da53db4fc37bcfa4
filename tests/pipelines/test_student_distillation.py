from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clip_dfkd.datasets import StudentModelDataset
from clip_dfkd.models import StudentClassifier, create_student
from clip_dfkd.models.student import student_fingerprint
from clip_dfkd.params import (
    ClassNames,
    DistillationLossParams,
    InvalidParameterError,
    RuntimeParams,
    StudentDistillationParams,
    StudentParams,
)
from clip_dfkd.pipelines.student_distillation.nodes import distillation_loss, train_student
from clip_dfkd.student_training import TooFewTrainingImagesError
from clip_dfkd.tracking import class_list_fingerprint

CLASSES = ["ball", "box", "tent"]


def _loss_params(**overrides) -> DistillationLossParams:
    return DistillationLossParams.model_validate(overrides)


def test_kd_loss_is_zero_for_identical_logits_and_matches_the_formula() -> None:
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    embedding = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0]]), dim=-1)

    same = distillation_loss(teacher.clone(), teacher, None, embedding, _loss_params(temperature=2.0))
    assert float(same["kd"]) == pytest.approx(0.0, abs=1e-6)

    student = torch.tensor([[0.0, 1.0, 0.0]])
    losses = distillation_loss(student, teacher, None, embedding, _loss_params(temperature=2.0))
    p = torch.softmax(teacher / 2, -1)
    q = torch.softmax(student / 2, -1)
    expected = 4 * float((p * (p / q).log()).sum())
    assert float(losses["kd"]) == pytest.approx(expected, rel=1e-5)
    assert float(losses["total"]) == pytest.approx(expected, rel=1e-5)


def test_embedding_alignment_terms() -> None:
    logits = torch.zeros(1, 3)
    teacher_embedding = torch.tensor([[1.0, 0.0]])
    orthogonal = torch.tensor([[0.0, 5.0]])

    cosine = distillation_loss(logits, logits, orthogonal, teacher_embedding, _loss_params(embedding_weight=0.5))
    aligned = distillation_loss(
        logits, logits, torch.tensor([[3.0, 0.0]]), teacher_embedding, _loss_params(embedding_weight=1)
    )

    assert float(cosine["embedding"]) == pytest.approx(1.0)
    assert float(cosine["total"]) == pytest.approx(0.5)
    assert float(aligned["embedding"]) == pytest.approx(0.0, abs=1e-6)


def _training_data(n: int = 12) -> tuple[dict, pd.DataFrame]:
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    images, rows = {}, []
    for i in range(n):
        label = i % 3
        noise = rng.integers(-20, 20, (32, 32, 3))
        array = np.clip(np.array(colours[label]) + noise, 0, 255).astype(np.uint8)
        images[f"img-{i}"] = lambda a=array: Image.fromarray(a)
        logits = np.full(3, -2.0, dtype=np.float32)
        logits[label] = 4.0
        embedding = np.zeros(8, dtype=np.float32)
        embedding[label] = 1.0
        rows.append({"image_id": f"img-{i}", "teacher_logits": logits, "teacher_embedding": embedding, "kept": True})
    return images, pd.DataFrame(rows)


def _train(images, labels: pd.DataFrame, params: StudentDistillationParams, view_labels: pd.DataFrame | None = None):
    """``train_student`` on the CPU, with no teacher at hand (``centre`` or ``stored_views``)."""
    return train_student(
        images,
        labels,
        pd.DataFrame(columns=["image_id", "augmentation"]) if view_labels is None else view_labels,
        ClassNames.model_validate(CLASSES),
        None,
        params,
        RuntimeParams(device="cpu"),
    )


def _stored_views_of_centre_targets(labels: pd.DataFrame, augmentation, per_image: int) -> pd.DataFrame:
    """``per_image`` views of each image, each labelled with the image's own targets."""
    from clip_dfkd.views import views_of, views_table

    ids = list(labels["image_id"])
    table = pd.DataFrame(views_table(ids, torch.stack([views_of(i, per_image, augmentation, 0) for i in ids])))
    table = table.merge(labels[["image_id", "teacher_logits", "teacher_embedding"]], on="image_id")
    return table.assign(augmentation=augmentation.model_dump_json())


@pytest.mark.parametrize("teacher_targets", ["centre", "stored_views"])
def test_training_lowers_the_loss_and_learns_the_teacher(teacher_targets) -> None:
    images, labels = _training_data()
    params = StudentDistillationParams.model_validate(
        {
            "student": {"model_name": "test_resnet", "image_size": 32},
            "training": {"epochs": 12, "batch_size": 6, "learning_rate": 3e-3, "weight_decay": 0.0},
            "loss": {"embedding_weight": 0.5},
            "augmentation": {"crop_scale": [0.9, 1.0], "color_jitter": 0.0},
            "teacher_targets": teacher_targets,
        }
    )
    views = (
        _stored_views_of_centre_targets(labels, params.augmentation, 2) if teacher_targets == "stored_views" else None
    )

    student, history = _train(images, labels, params, views)

    losses = [step["value"] for step in history["total_loss"]]
    assert len(losses) == 12 and [s["step"] for s in history["total_loss"]] == list(range(12))
    assert losses[-1] < 0.5 * losses[0]
    assert "embedding_loss" in history
    pixels = torch.stack([student.eval_transform()(images[f"img-{i}"]()) for i in range(12)])
    with torch.no_grad():
        predictions = student(pixels).argmax(-1)
    assert (predictions == torch.arange(12) % 3).float().mean() >= 0.9


def test_student_round_trips_through_its_dataset(tmp_path) -> None:
    student = create_student(StudentParams(model_name="test_resnet", image_size=32), CLASSES, embedding_dim=8).eval()
    dataset = StudentModelDataset(path=str(tmp_path / "student"))
    dataset.save(student)
    dataset.save(student)  # an existing folder is replaced whole

    loaded = dataset.load()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(pixels), student(pixels))
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["class_names"] == CLASSES and config["image_size"] == 32
    # test_resnet's pretrained preprocessing, at our input size
    assert config["data_config"]["input_size"] == [3, 32, 32]
    assert config["data_config"]["mean"] == [0.5, 0.5, 0.5]
    assert config["data_config"]["interpolation"] == "bilinear"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_filter_leaving_no_image_is_an_error(tmp_path) -> None:
    images, labels = _training_data(3)
    labels["kept"] = False
    params = StudentDistillationParams.model_validate(
        {"student": {"model_name": "test_resnet", "image_size": 32}, "teacher_targets": "centre"}
    )
    with pytest.raises(ValueError, match="teacher_labels keeps no image"):
        _train(images, labels, params)


# (images, batch size, epochs). Ten steps in all (3 images in batches of 2 for 10 epochs, 2 in
# a batch of 32, 11 in batches of 4 for 5 epochs) made OneCycleLR's 10 % warm-up end at step 0,
# where it divided by zero; then many steps of one batch, one step, a dropped odd image.
@pytest.mark.parametrize(
    ("count", "batch_size", "epochs"), [(3, 2, 10), (2, 32, 10), (11, 4, 5), (20, 2, 1), (2, 2, 1), (3, 2, 1)]
)
def test_every_legal_count_batch_and_epoch_combination_trains(count, batch_size, epochs) -> None:
    images, labels = _training_data(count)
    params = StudentDistillationParams.model_validate(
        {
            "student": {"model_name": "test_resnet", "image_size": 32},
            "training": {"epochs": epochs, "batch_size": batch_size},
            "teacher_targets": "centre",
        }
    )

    _, history = _train(images, labels, params)

    assert len(history["total_loss"]) == epochs
    assert all(math.isfinite(step["value"]) for step in history["total_loss"])


def test_a_training_set_or_batch_of_one_image_is_refused_in_one_line() -> None:
    images, labels = _training_data(1)
    params = StudentDistillationParams.model_validate(
        {"student": {"model_name": "test_resnet", "image_size": 32}, "teacher_targets": "centre"}
    )
    with pytest.raises(TooFewTrainingImagesError, match=r"^Distilling student: 1 training image; .* at least 2$"):
        _train(images, labels, params)
    with pytest.raises(
        InvalidParameterError,
        match=r"^student_distillation\.training\.batch_size=1: a training batch needs at least 2 images .*>= 2$",
    ):
        StudentDistillationParams.model_validate(
            {"student": {"model_name": "test_resnet"}, "training": {"batch_size": 1}}
        )


def test_pipeline_trains_saves_and_registers_the_student(demo_project) -> None:
    import mlflow

    demo_project.run("student_distillation")

    student = StudentClassifier.from_pretrained(demo_project.path / "data/06_models/student")
    assert student.class_names == ["ball", "box", "tent", "kite"]
    registration = json.loads((demo_project.path / "data/08_reporting/student_registration.json").read_text())
    assert registration["uri"] == "models:/clip-dfkd-demo-student@candidate"
    mlflow.set_tracking_uri(f"sqlite:///{demo_project.path / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version_by_alias("clip-dfkd-demo-student", "candidate")
    assert str(version.version) == registration["version"]
    assert version.tags["prompt_method"] == "vanilla"
    assert version.tags["classes"] == "ball,box,tent,kite"
    assert version.tags["classes_fingerprint"] == class_list_fingerprint(["ball", "box", "tent", "kite"])
    assert version.tags["teacher"].startswith("open_clip:clip-dfkd-tiny/")
    # The saved student is the registered one, by the weights' fingerprint.
    assert registration["fingerprint"] == version.tags["fingerprint"] == student_fingerprint(student)
    assert math.isfinite(mlflow.get_run(registration["run_id"]).data.metrics["training/total_loss"])


def test_student_starts_from_a_local_imagenet_checkpoint(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    imagenet = timm.create_model("test_resnet", num_classes=1000)
    checkpoint = tmp_path / "test_resnet_in1k.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, checkpoint)

    student = create_student(
        StudentParams(model_name="test_resnet", image_size=32, checkpoint_path=str(checkpoint)), CLASSES
    )

    backbone = student.backbone.state_dict()
    assert torch.equal(backbone["conv1.0.weight"], imagenet.state_dict()["conv1.0.weight"])
    assert backbone["fc.weight"].shape == (3, imagenet.num_features)  # a fresh head for our classes


def test_a_step_that_does_not_fit_accumulates_the_gradient_over_parts(caplog) -> None:
    """Parts of unequal size (2, 2, 1) weighted by their share give the batch's own gradient;
    a part that fails after another's backward leaves no gradient behind."""
    import copy
    import logging

    import torch.nn.functional as F

    from clip_dfkd.params import AugmentationParams, TrainingParams
    from clip_dfkd.runtime import Runtime
    from clip_dfkd.student_training import (
        FreshViews,
        StudentOutOfMemoryError,
        ViewedImages,
        fit_student,
        soft_label_loss,
    )
    from clip_dfkd.views import ViewRenderer

    torch.manual_seed(0)
    student = create_student(StudentParams(model_name="test_resnet", image_size=32), CLASSES, None)
    constrained = copy.deepcopy(student)
    images, labels = _training_data(10)
    teacher_logits = torch.as_tensor(np.stack(labels["teacher_logits"].to_numpy()))
    whole_images = AugmentationParams(crop_scale=(1.0, 1.0), horizontal_flip=False, color_jitter=0.0)
    renderer = ViewRenderer.for_student(student.config["data_config"])
    data = ViewedImages(list(images.values()), renderer, FreshViews(whole_images, [teacher_logits]))  # no randomness
    training = TrainingParams(epochs=2, batch_size=5, learning_rate=1e-2, weight_decay=0.0)
    runtime = Runtime.resolve(RuntimeParams(device="cpu"))

    def step_loss(logits, embedding, targets):
        losses = {"kd": soft_label_loss(logits, targets[0], 2.0), "ce": F.cross_entropy(logits, targets[0].argmax(-1))}
        losses["total"] = losses["kd"] + losses["ce"]
        return losses, {"agreement": (logits.argmax(-1) == targets[0].argmax(-1)).float().mean()}

    attempts = []
    whole_forward = constrained.forward_distill

    def forward_in_little_memory(pixels):
        attempts.append(len(pixels))
        # More than 3 images never fit; the third call fails after a part of 3 went backward.
        if len(pixels) > 3 or len(attempts) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return whole_forward(pixels)

    constrained.forward_distill = forward_in_little_memory
    # Batch norm on its running statistics, so that parts see what the whole batch sees.
    expected = fit_student(student, data, step_loss, training, runtime, "whole", freeze_batch_norm=True)
    with caplog.at_level(logging.WARNING, logger="clip_dfkd.student_training"):
        history = fit_student(constrained, data, step_loss, training, runtime, "parts", freeze_batch_norm=True)

    assert attempts == [5, 3, 2, 2, 2, 1] + [2, 2, 1] * 3
    for name in ("total_loss", "kd_loss", "ce_loss", "agreement"):
        assert [s["value"] for s in history[name]] == pytest.approx([s["value"] for s in expected[name]], rel=1e-5)
    # Adam's steps of lr 1e-2 carry the parts' float rounding to a few 1e-6 here.
    for (name, trained), reference in zip(constrained.state_dict().items(), student.state_dict().values(), strict=True):
        assert torch.allclose(trained.float(), reference.float(), atol=5e-5), name
    assert "parts: a step on 5 images at once does not fit in device memory; accumulating the gradient" in caplog.text

    def no_memory(pixels):
        raise torch.OutOfMemoryError("CUDA out of memory")

    constrained.forward_distill = no_memory
    with pytest.raises(StudentOutOfMemoryError) as error:
        fit_student(constrained, data, step_loss, training, runtime, "Distillation")
    assert str(error.value) == (
        "Distillation: out of device memory training on a single image in float32; set runtime.precision=bf16 "
        "(or fp16), or a smaller student.model_name or student.image_size"
    )
