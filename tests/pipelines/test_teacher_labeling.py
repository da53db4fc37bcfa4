from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_dfkd.models import load_teacher
from clip_dfkd.models.teacher import TeacherOutOfMemoryError
from clip_dfkd.params import RuntimeParams, TeacherLabelingParams, TeacherParams
from clip_dfkd.pipelines.teacher_labeling.nodes import summarise_labels, teacher_labels
from clip_dfkd.runtime import Runtime

CLASSES = ["ball", "box", "tent"]


@pytest.fixture(scope="module")
def teacher_params(demo_assets) -> TeacherParams:
    return TeacherParams.model_validate(
        {
            "model_name": "clip-dfkd-tiny",
            "pretrained": demo_assets.teacher_checkpoint,
            "templates": ["a photo of a {class_name}.", "a sketch of a {class_name}."],
            "batch_size": 4,
        }
    )


@pytest.fixture(scope="module")
def teacher(teacher_params):
    return load_teacher(teacher_params, Runtime.resolve(RuntimeParams(device="cpu")))


def _images(n: int) -> tuple[dict, pd.DataFrame]:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    images = {f"img-{i}": (lambda a=a: Image.fromarray(a)) for i, a in enumerate(arrays)}
    manifest = pd.DataFrame(
        {
            "image_id": list(images),
            "class_name": [CLASSES[i % 3] for i in range(n)],
            "class_index": [i % 3 for i in range(n)],
            "style": ["photo", "sketch"] * (n // 2),
            "method": "vanilla",
        }
    )
    return images, manifest


def test_zero_shot_head_is_the_normalised_mean_of_template_embeddings(teacher, teacher_params) -> None:
    head = teacher.zero_shot_weights(CLASSES, teacher_params.templates)

    assert head.shape == (3, 32)
    assert torch.allclose(head.norm(dim=-1), torch.ones(3), atol=1e-5)
    tokens = teacher.tokenizer(["a photo of a box.", "a sketch of a box."])
    with torch.no_grad():
        manual = F.normalize(teacher.model.encode_text(tokens), dim=-1).mean(0)
    assert torch.allclose(head[1], F.normalize(manual, dim=0), atol=1e-5)


def test_labels_hold_scaled_logits_probabilities_and_unit_embeddings(teacher, teacher_params) -> None:
    head = teacher.zero_shot_weights(CLASSES, teacher_params.templates)
    images, manifest = _images(10)

    labels = teacher_labels(images, manifest, teacher, head, teacher_params.batch_size, TeacherLabelingParams())

    pixels = teacher.preprocess(images["img-3"]()).unsqueeze(0)
    with torch.no_grad():
        embedding = F.normalize(teacher.model.encode_image(pixels), dim=-1)[0]
    row = labels.iloc[3]
    assert np.allclose(row.teacher_embedding, embedding.numpy(), atol=1e-5)
    expected_logits = teacher.logit_scale * embedding @ head.T
    assert np.allclose(row.teacher_logits, expected_logits.numpy(), atol=1e-4)
    assert "teacher_probs" not in labels  # the softmax of the logits, which every reader computes
    assert row.teacher_prediction == int(expected_logits.argmax())
    assert labels["kept"].all()
    assert (labels["teacher_agrees"] == (labels["teacher_prediction"] == labels["class_index"])).all()


def test_filter_drops_disagreeing_and_unconfident_images(teacher, teacher_params) -> None:
    head = teacher.zero_shot_weights(CLASSES, teacher_params.templates)
    images, manifest = _images(12)
    threshold = 0.6
    params = TeacherLabelingParams.model_validate({"filter": {"enabled": True, "min_confidence": threshold}})

    labels = teacher_labels(images, manifest, teacher, head, teacher_params.batch_size, params)
    summary, metrics = summarise_labels(labels)

    expected = labels["teacher_agrees"] & (labels["teacher_confidence"] >= threshold)
    assert labels["kept"].tolist() == expected.tolist()
    assert summary["images"].sum() == 12
    assert summary["dropped"].sum() == int((~expected).sum())
    assert metrics["kept"] == {"value": float(expected.sum()), "step": 0}


def test_missing_images_are_an_error(teacher, teacher_params) -> None:
    """(Saved ones are found before the run, with the command that renders them: test_preflight.py.)"""
    head = teacher.zero_shot_weights(CLASSES, teacher_params.templates)
    images, manifest = _images(4)
    del images["img-2"]

    with pytest.raises(ValueError, match=r"^synthetic_images lacks 1 of the 4 images .*\(first: 'img-2'\)$"):
        teacher_labels(images, manifest, teacher, head, teacher_params.batch_size, TeacherLabelingParams())


def test_pipeline_labels_every_synthetic_image(demo_project) -> None:
    demo_project.run("teacher_labeling")

    labels = pd.read_parquet(demo_project.path / "data/04_feature/teacher_labels.parquet")
    manifest = pd.read_parquet(demo_project.path / "data/03_primary/synthesis_manifest.parquet")
    assert sorted(labels["image_id"]) == sorted(manifest["image_id"])
    # Each row is what the demo's teacher says of that very PNG, over the demo's classes in
    # their configured order: recomputed here, image by image, from the files.
    parameters = demo_project.catalog().load("parameters")  # validated by Kedro
    demo_teacher = parameters["teacher"]
    teacher = load_teacher(demo_teacher, Runtime.resolve(RuntimeParams(device="cpu")))
    head = teacher.zero_shot_weights(list(parameters["classes"]), demo_teacher.templates)
    sample = labels.iloc[:: max(1, len(labels) // 6)]
    folder = demo_project.path / "data/03_primary/synthetic_images"
    pixels = torch.stack(
        [teacher.preprocess(Image.open(folder / f"{image_id}.png")) for image_id in sample["image_id"]]
    )
    logits, embeddings = teacher.classify(pixels, head)
    np.testing.assert_allclose(np.stack(sample["teacher_logits"].to_numpy()), logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.stack(sample["teacher_embedding"].to_numpy()), embeddings.numpy(), atol=1e-5)
    assert (sample["teacher_prediction"] == logits.argmax(dim=-1).numpy()).all()


def test_a_batch_that_does_not_fit_is_encoded_in_smaller_batches(teacher, teacher_params, caplog) -> None:
    import dataclasses
    import logging

    head = teacher.zero_shot_weights(CLASSES, teacher_params.templates)
    pixels = torch.stack([teacher.preprocess(load()) for load in _images(12)[0].values()])
    expected = teacher.classify(pixels, head)
    attempts = []

    class TwoAtATime(type(teacher)):
        def encode_images(self, batch):
            attempts.append(len(batch))
            if len(batch) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().encode_images(batch)

    fields = {field.name: getattr(teacher, field.name) for field in dataclasses.fields(teacher) if field.init}
    constrained = TwoAtATime(**fields)
    with caplog.at_level(logging.WARNING, logger="clip_dfkd.models.teacher"):
        first, second = constrained.classify(pixels[:6], head), constrained.classify(pixels[6:], head)

    # 6, then 3, did not fit; from then on 2 at a time (the 1s are what remained of a batch).
    assert attempts == [6, 3, 2, 1, 2, 1, 2, 2, 2]
    assert torch.allclose(torch.cat([first[0], second[0]]), expected[0], atol=1e-5)
    assert torch.allclose(torch.cat([first[1], second[1]]), expected[1], atol=1e-6)
    assert "6 images at once do not fit in device memory; encoding 3 at a time" in caplog.text

    class Exhausted(type(teacher)):
        def encode_images(self, batch):
            raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(TeacherOutOfMemoryError) as error:
        Exhausted(**fields).classify(pixels[:2], head)
    assert str(error.value) == (
        "teacher: out of device memory encoding a single image with clip-dfkd-tiny/"
        f"{teacher_params.pretrained} in float32; set runtime.precision=bf16 (or fp16), or a smaller "
        "teacher.model_name"
    )


def _drawings(demo_assets, count: int) -> tuple[dict, pd.DataFrame]:
    """``count`` of the demo benchmark's drawings, which the demo teacher recognises, as
    synthetic images and their manifest."""
    from pathlib import Path

    paths = sorted(Path(demo_assets.benchmark_root).glob("*/*/*.png"))[::61][:count]
    images = {f"drawing-{i}": (lambda p=p: Image.open(p)) for i, p in enumerate(paths)}
    manifest = pd.DataFrame(
        {"image_id": list(images), "class_name": "ball", "class_index": 0, "style": "x", "method": "vanilla"}
    )
    return images, manifest


@pytest.fixture(scope="module")
def stored(teacher, teacher_params, demo_assets):
    """Three stored views of six drawings, with the demo teacher's outputs on each."""
    from clip_dfkd.params import AugmentationParams, ViewLabelingParams
    from clip_dfkd.pipelines.teacher_labeling.nodes import teacher_view_labels

    head = teacher.zero_shot_weights(demo_assets.benchmark_classes, teacher_params.templates)
    images, manifest = _drawings(demo_assets, 6)
    augmentation = AugmentationParams(crop_scale=(0.3, 1.0), color_jitter=0.4)
    table = teacher_view_labels(
        images, manifest, teacher, head, 5, ViewLabelingParams(per_image=3, seed=1), augmentation
    )
    return images, manifest, head, augmentation, table


def test_a_replayed_view_comes_with_the_teacher_outputs_on_exactly_that_view(teacher, stored) -> None:
    """The student replays stored views: run the teacher on the very pixels a training item
    holds (rendered at the teacher's input here, so that it can be run on them) and it gives
    the stored targets of that item, for every view the sampler picks."""
    from clip_dfkd.pipelines.student_distillation.nodes import stored_views
    from clip_dfkd.student_training import ViewedImages

    images, manifest, head, augmentation, table = stored
    assert len(table) == 18 and table.groupby("image_id")["view"].apply(list).map(sorted).eq([[0, 1, 2]] * 6).all()
    # Shuffled rows: replay must not depend on the table's order.
    views = stored_views(list(manifest["image_id"]), table.sample(frac=1, random_state=0), augmentation)
    data = ViewedImages([images[i] for i in manifest["image_id"]], teacher.view_renderer, views)

    keys = list(data.sampler(seed=0)) + list(data.sampler(seed=1))
    assert {key[1] for key in keys} == {0, 1, 2}
    pixels, logits, embeddings = (torch.stack(parts) for parts in zip(*(data[key] for key in keys), strict=True))
    expected_logits, expected_embeddings = teacher.classify(pixels, head)
    assert torch.allclose(logits, expected_logits, atol=1e-4)
    assert torch.allclose(embeddings, expected_embeddings, atol=1e-5)
    # The views are different enough that another view's targets would be wrong.
    other_view = torch.stack([views.targets(i, (k + 1) % 3, None)[1] for i, k in keys])
    assert (other_view - expected_embeddings).abs().max() > 1e-2


def test_the_online_teacher_and_the_stored_views_agree_on_the_same_view(teacher, stored) -> None:
    from clip_dfkd.student_training import FreshViews, with_online_teacher
    from clip_dfkd.views import image_tensor

    images, manifest, head, augmentation, table = stored
    online = FreshViews(augmentation, [], teacher_view=teacher.view_renderer)
    received = []
    step = with_online_teacher(
        lambda logits, embedding, targets: received.append(targets), lambda px: teacher.classify(px, head)
    )
    pixels = torch.stack(
        [
            online.targets(0, torch.from_numpy(row.view_params), image_tensor(images[row.image_id]().convert("RGB")))[0]
            for row in table.itertuples()
        ]
    )
    step(None, None, [pixels])

    ((logits, embeddings),) = received
    assert torch.allclose(logits, torch.from_numpy(np.stack(table["teacher_logits"])), atol=1e-5)
    assert torch.allclose(embeddings, torch.from_numpy(np.stack(table["teacher_embedding"])), atol=1e-5)
    assert not (logits.is_inference() or embeddings.is_inference())  # usable in losses that are backpropagated


def test_views_drawn_with_another_augmentation_or_missing_are_refused(stored) -> None:
    from clip_dfkd.params import AugmentationParams
    from clip_dfkd.pipelines.student_distillation.nodes import MissingViewLabelsError, stored_views

    _, manifest, _, augmentation, table = stored
    ids = list(manifest["image_id"])
    with pytest.raises(
        MissingViewLabelsError, match=r"^student_distillation.augmentation=.*teacher_view_labels were drawn"
    ):
        stored_views(ids, table, AugmentationParams())
    with pytest.raises(MissingViewLabelsError, match=r"no views of 1 training images \(first: 'new'\); set teacher"):
        stored_views([*ids, "new"], table, augmentation)
    with pytest.raises(MissingViewLabelsError, match=r"between 2 and 3 views"):
        stored_views(ids, table.iloc[1:], augmentation)
