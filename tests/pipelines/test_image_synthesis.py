from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DatasetError
from PIL import Image, ImageFile

from clip_dfkd.cli import user_error_message
from clip_dfkd.datasets import ResumablePartitionedDataset
from clip_dfkd.params import ImageSynthesisParams, RuntimeParams, TeacherParams
from clip_dfkd.pipelines.image_synthesis.nodes import build_manifest, record_synthesis
from clip_dfkd.rendering import DiffusionRenderer, LocalImages, RenderedBatch, RenderTiming, read_record
from clip_dfkd.styles import StyleBank, StyleBankEncoderError

pytestmark = pytest.mark.heavy


def _prompt_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": ["dog-photo-0000", "dog-photo-0001"],
            "class_name": ["dog", "dog"],
            "class_index": [0, 0],
            "style": ["photo", "photo"],
            "template": ["a {style} of a {class_name}"] * 2,
            "prompt": ["a photo of a dog"] * 2,
            "method": ["vanilla"] * 2,
            "style_vector_id": [None, None],
            "seed": [11, 12],
        }
    )


TEACHER = TeacherParams(model_name="ViT-B-32", pretrained="openai", templates=["a photo of a {class_name}."])


def _params(**generator) -> ImageSynthesisParams:
    return ImageSynthesisParams.model_validate({"generator": {"model_id": "some/model", **generator}})


def _inversion(**inversion) -> ImageSynthesisParams:
    return ImageSynthesisParams.model_validate({"backend": "inversion", "inversion": inversion})


def test_manifest_ids_change_exactly_when_the_recipe_changes() -> None:
    base = build_manifest(_prompt_table(), _params(), TEACHER)
    same = build_manifest(_prompt_table(), _params(), TEACHER)
    more_steps = build_manifest(_prompt_table(), _params(num_inference_steps=8), TEACHER)
    tiny_vae = build_manifest(_prompt_table(), _params(tiny_vae="madebyollin/taesd"), TEACHER)
    sliced = build_manifest(_prompt_table(), _params(vae_slicing=True), TEACHER)  # the same images

    assert base["image_id"].tolist() == same["image_id"].tolist() == sliced["image_id"].tolist()
    assert base["image_id"].str.startswith("dog/dog-photo-000").all()
    assert not set(base["image_id"]) & set(more_steps["image_id"])
    assert not set(base["image_id"]) & set(tiny_vae["image_id"])
    row = base.iloc[0]
    assert (row.generator_model_id, row.num_inference_steps, row.height, row.seed) == ("some/model", 4, 512, 11)


@pytest.mark.parametrize(
    "change",
    [
        {"parameterization": "pixels"},
        {"grid_size": 8},
        {"iterations": 401},
        {"learning_rate": 0.05},
        {"cutouts": 16},
        {"cutout_scale": [0.5, 1.0]},
        {"noise": 0.0},
        {"color_jitter": 0.0},
        {"tv_weight": 0.1},
        {"image_size": 256},
        {"parameterization": "latent", "decoder": {"model_id": "some/vae", "subfolder": "vae"}},
    ],
)
def test_every_inversion_setting_is_part_of_the_image_id(change) -> None:
    base = build_manifest(_prompt_table(), _inversion(), TEACHER)
    changed = build_manifest(_prompt_table(), _inversion(**change), TEACHER)
    other_teacher = build_manifest(_prompt_table(), _inversion(), TEACHER.model_copy(update={"pretrained": "x.pt"}))

    assert not set(base["image_id"]) & set(changed["image_id"])
    assert not set(base["image_id"]) & set(other_teacher["image_id"])
    assert base["backend"].eq("inversion").all() and base["inversion_iterations"].eq(400).all()


def test_pipeline_renders_every_manifest_image(demo_project) -> None:
    demo_project.run("image_synthesis")

    manifest = pd.read_parquet(demo_project.path / "data/03_primary/synthesis_manifest.parquet")
    root = demo_project.path / "data/03_primary/synthetic_images"
    files = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.png"))
    assert files == sorted(manifest["image_id"])
    with Image.open(root / f"{manifest.image_id.iloc[0]}.png") as image:
        assert image.size == (32, 32)
    assert (demo_project.path / "data/08_reporting/synthetic_sample_grid.png").stat().st_size > 0


def test_pipeline_is_reproducible_from_the_manifest(demo_project) -> None:
    """Deleting an image and rerunning renders the same pixels from its manifest row."""
    demo_project.run("image_synthesis")
    manifest = pd.read_parquet(demo_project.path / "data/03_primary/synthesis_manifest.parquet")
    target = demo_project.path / "data/03_primary/synthetic_images" / f"{manifest.image_id.iloc[5]}.png"
    before = np.asarray(Image.open(target))
    untouched = target.with_name(f"{manifest.image_id.iloc[0].split('/')[1]}.png")
    untouched_mtime = untouched.stat().st_mtime_ns
    target.unlink()

    with demo_project.session() as session:
        session.run(pipeline_names=["image_synthesis"])

    assert np.array_equal(np.asarray(Image.open(target)), before)
    assert untouched.stat().st_mtime_ns == untouched_mtime


@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", ["diffusion", "inversion"])
def test_run_killed_with_sigkill_resumes_to_exactly_one_complete_image_each(fresh_project, backend) -> None:
    project = fresh_project
    # Few inversion iterations: the test is about the kill, not the images.
    params = [
        "--params",
        "prompt_generation.images_per_class_and_style=6,image_synthesis.batch_size=2,"
        f"image_synthesis.backend={backend},image_synthesis.inversion.iterations=5",
    ]
    command = [
        sys.executable,
        "-m",
        "kedro",
        "run",
        "--env=demo",
        "--pipelines=prompt_generation,image_synthesis",
        *params,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    images = project / "data/03_primary/synthetic_images"

    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        # Complete images only: up to 4 × writer_threads partial files may be in flight.
        if sum(".partial" not in p.name for p in images.rglob("*.png")) >= 20:
            break
        time.sleep(0.05)
    assert process.poll() is None, (
        "synthesis finished before it could be killed: " + process.stderr.read().decode()[-2000:]
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    written_before = {p: p.stat().st_mtime_ns for p in images.rglob("*.png") if ".partial" not in p.name}
    assert 20 <= len(written_before) < 72

    rerun = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    manifest = pd.read_parquet(project / "data/03_primary/synthesis_manifest.parquet")
    final = sorted(p for p in images.rglob("*.png") if ".partial" not in p.name)
    assert len(manifest) == 72
    assert sorted(str(p.relative_to(images).with_suffix("")) for p in final) == sorted(manifest["image_id"])
    # Finished images were skipped, not rendered again.
    assert {p: p.stat().st_mtime_ns for p in written_before} == written_before
    for path in final:
        with Image.open(path) as image:
            image.load()  # raises on a truncated file
            assert image.size == (32, 32)
    if backend == "inversion":
        # Images from the killed run kept their losses: each PNG carries its own.
        assert manifest["inversion_loss"].gt(0).all()


def test_out_of_memory_while_rendering_is_reported_as_itself(tmp_path) -> None:
    """Not as Kedro's "Failed while saving data": which stage, and what to change."""

    class ExhaustedRenderer(DiffusionRenderer):
        def _load(self) -> None:
            pass

        def _render(self, rows):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    params = ImageSynthesisParams.model_validate({"generator": {"model_id": "some/model"}, "batch_size": 8})
    manifest = build_manifest(_prompt_table(), params, TEACHER)
    ids = list(manifest["image_id"])
    images = LocalImages(
        ExhaustedRenderer(manifest, None, params, RuntimeParams(), None), ids, params.batch_size, RenderTiming()
    )
    dataset = ResumablePartitionedDataset(path=str(tmp_path), dataset="pillow.ImageDataset", filename_suffix=".png")

    with pytest.raises(DatasetError) as error:
        dataset.save({image_id: partial(images.image, image_id) for image_id in ids})

    assert user_error_message(error.value) == (
        "image_synthesis: out of device memory rendering a single image (diffusion); set "
        "image_synthesis.generator.vae_slicing=true or image_synthesis.generator.tiny_vae (e.g. madebyollin/taesd), "
        "or lower image_synthesis.generator.height/width (now 512x512)"
    )
    assert not list(tmp_path.rglob("*.png"))


def test_a_batch_that_does_not_fit_is_split_until_it_does(demo_assets, caplog) -> None:
    """Batches of 6 where only 2 images fit at once: the same images as batches of 2, and a
    warning; later batches start at 2."""
    params = ImageSynthesisParams.model_validate(
        {"generator": {"model_id": demo_assets.generator_dir, "height": 32, "width": 32}, "batch_size": 6}
    )
    table = pd.concat([_prompt_table()] * 6, ignore_index=True)
    table["prompt_id"] = [f"dog-photo-{n:04d}" for n in range(len(table))]
    table["seed"] = range(len(table))
    manifest = build_manifest(table, params, TEACHER)
    ids = list(manifest["image_id"])
    attempts = []

    class TwoAtATime(DiffusionRenderer):
        def _render(self, rows):
            attempts.append(len(rows))
            if len(rows) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super()._render(rows)

    cpu = RuntimeParams(device="cpu")
    renderer = TwoAtATime(manifest, None, params, cpu, TEACHER)
    with caplog.at_level(logging.WARNING, logger="clip_dfkd.rendering"):
        rendered = RenderedBatch.joined([renderer.render(ids[:6]), renderer.render(ids[6:])])
    fitting = DiffusionRenderer(manifest, None, params.model_copy(update={"batch_size": 2}), cpu, TEACHER)
    expected = [image for start in range(0, 12, 2) for image in fitting.render(ids[start : start + 2]).images]

    # 6, then 3, did not fit; from then on 2 at a time (the 1s are what remained of a batch).
    assert attempts == [6, 3, 2, 1, 2, 1, 2, 2, 2]
    assert [record["image_id"] for record in rendered.records] == ids
    pixels = np.stack([np.asarray(image, dtype=np.int16) for image in rendered.images])
    assert np.abs(pixels - np.stack([np.asarray(image, dtype=np.int16) for image in expected])).max() <= 1
    assert "6 images at once do not fit in device memory; rendering 3 at a time" in caplog.text


def test_a_resumed_save_says_and_counts_what_it_will_render(tmp_path, caplog) -> None:
    """Images on disk are neither rendered nor counted: the progress total is the images of
    the batches that hold a missing one."""
    rendered = []

    class Blank(DiffusionRenderer):
        def _load(self) -> None:
            pass

        def _render(self, rows):
            rendered.append(list(rows.index))
            return [Image.new("RGB", (8, 8)) for _ in range(len(rows))], [{} for _ in range(len(rows))]

    params = ImageSynthesisParams.model_validate({"generator": {"model_id": "some/model"}, "batch_size": 2})
    table = pd.concat([_prompt_table()] * 3, ignore_index=True)
    table["prompt_id"] = [f"dog-photo-{n:04d}" for n in range(len(table))]
    manifest = build_manifest(table, params, TEACHER)
    ids = list(manifest["image_id"])
    dataset = ResumablePartitionedDataset(path=str(tmp_path), dataset="pillow.ImageDataset", filename_suffix=".png")
    dataset.save({image_id: Image.new("RGB", (8, 8)) for image_id in ids[:3]})  # batch 0, and half of batch 1
    on_demand = LocalImages(
        Blank(manifest, None, params, RuntimeParams(), TEACHER), ids, params.batch_size, RenderTiming()
    )

    with caplog.at_level(logging.INFO, logger="clip_dfkd.rendering"):
        dataset.save(on_demand.loaders())

    assert rendered == [ids[2:4], ids[4:6]]
    assert "3 of the 6 planned images are missing: rendering 4 (their batches)" in caplog.text
    assert on_demand._progress.total == on_demand._progress.n == 4


def test_synthesis_records_are_read_from_the_png_headers_without_decoding_pixels(tmp_path, monkeypatch) -> None:
    class Blank(DiffusionRenderer):
        def _load(self) -> None:
            pass

        def _render(self, rows):
            # What an inversion computes per image: its final loss and its loss curve.
            computed = [
                {"inversion_loss": 1.0 / (1 + seed), "inversion_loss_curve": {"0": 2.0, "9": 1.0 / (1 + seed)}}
                for seed in rows["seed"]
            ]
            return [Image.new("RGB", (64, 64)) for _ in range(len(rows))], computed

    params = ImageSynthesisParams.model_validate({"generator": {"model_id": "some/model"}, "batch_size": 2})
    manifest = build_manifest(_prompt_table(), params, TEACHER)
    dataset = ResumablePartitionedDataset(path=str(tmp_path), dataset="pillow.ImageDataset", filename_suffix=".png")
    renderer = Blank(manifest, None, params, RuntimeParams(), TEACHER)
    timing = RenderTiming()
    dataset.save(LocalImages(renderer, list(manifest["image_id"]), params.batch_size, timing).loaders())
    decoded = [read_record(Image.open(tmp_path / f"{image_id}.png")) for image_id in manifest["image_id"]]

    def no_decoding(image):
        raise AssertionError("record_synthesis decoded an image's pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    recorded, metrics = record_synthesis(dataset.load(), manifest, timing)

    assert recorded["inversion_loss"].tolist() == [record["inversion_loss"] for record in decoded]
    assert metrics["rendered_images"] == [{"value": float(len(manifest)), "step": 0}]
    assert metrics["render_seconds"] == [{"value": timing.seconds, "step": 0}]


def test_a_style_bank_made_with_another_encoder_is_not_spliced(tiny_text_encoders, demo_assets) -> None:
    """Same width, other tokens (a fine-tune of the same model): refused before any image."""
    encoder = copy.deepcopy(tiny_text_encoders["diffusers"])
    with torch.no_grad():
        encoder.embedding.weight.add_(0.01)
    bank = StyleBank.create("random", encoder, torch.zeros(2, encoder.dim), {})
    params = ImageSynthesisParams.model_validate(
        {"generator": {"model_id": demo_assets.generator_dir, "height": 32, "width": 32}, "batch_size": 2}
    )
    table = _prompt_table().assign(style_vector_id=bank.names, prompt="a [S*] style of a dog")
    manifest = build_manifest(table, params, TEACHER)
    renderer = DiffusionRenderer(manifest, bank, params, RuntimeParams(device="cpu"), TEACHER)

    with pytest.raises(StyleBankEncoderError, match=r"^style_bank: its pseudo-words were made in the token space of "):
        renderer.render(list(manifest["image_id"]))
