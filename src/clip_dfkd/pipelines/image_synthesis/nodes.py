from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import matplotlib.pyplot as plt
import pandas as pd
import torch
from kedro.io import DatasetError
from matplotlib.figure import Figure
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from clip_dfkd.models import ClipTeacher, load_text_to_image
from clip_dfkd.models.generator import load_latent_decoder
from clip_dfkd.models.inversion import invert, start_images
from clip_dfkd.models.text_encoders import HFCLIPTextEncoder, OpenClipTextEncoder
from clip_dfkd.naming import slugify, stable_hash
from clip_dfkd.params import ImageSynthesisParams, RuntimeParams, TeacherParams
from clip_dfkd.runtime import Runtime
from clip_dfkd.styles import StyleBank

logger = logging.getLogger(__name__)


def synthesis_recipe(params: ImageSynthesisParams, teacher: TeacherParams) -> dict[str, Any]:
    """Everything, beside the prompt row, that decides the pixels of an image: the manifest's
    recipe columns, and part of every ``image_id``."""
    if params.backend == "diffusion":
        generator = params.generator
        return {
            "backend": params.backend,
            "generator_model_id": generator.model_id,
            "generator_revision": generator.revision,
            "generator_variant": generator.variant,
            "scheduler": generator.scheduler,
            "num_inference_steps": generator.num_inference_steps,
            "guidance_scale": generator.guidance_scale,
            "negative_prompt": generator.negative_prompt,
            "height": generator.height,
            "width": generator.width,
        }
    inversion = params.inversion.model_dump(mode="json")
    decoder = inversion.pop("decoder") or {}
    return {
        "backend": params.backend,
        "teacher": f"{teacher.model_name}/{teacher.pretrained}",
        **{
            f"inversion_{name}": json.dumps(value) if isinstance(value, list) else value
            for name, value in inversion.items()
        },
        **{f"inversion_decoder_{name}": value for name, value in decoder.items()},
        "height": params.inversion.image_size,
        "width": params.inversion.image_size,
    }


def build_manifest(prompt_table: pd.DataFrame, params: ImageSynthesisParams, teacher: TeacherParams) -> pd.DataFrame:
    """The prompt table plus the synthesis recipe and a content-addressed ``image_id``.

    The id hashes everything that decides the pixels, so a changed recipe never reuses an
    image rendered with an old one, and an unchanged one is found on disk and skipped.
    """
    recipe = synthesis_recipe(params, teacher)
    manifest = prompt_table.copy()
    for column, value in recipe.items():
        manifest[column] = value
    # Text and unset settings as nullable strings: a column of None has no type parquet can write.
    manifest = manifest.astype({c: "string" for c, value in recipe.items() if value is None or isinstance(value, str)})
    manifest.insert(
        0,
        "image_id",
        [
            f"{slugify(row.class_name)}/{row.prompt_id}-"
            + stable_hash(row.prompt, row.seed, row.method, row.style_vector_id, *recipe.values())
            for row in manifest.itertuples()
        ],
    )
    return manifest.sort_values("image_id", ignore_index=True)


class _BatchRenderer:
    """Renders manifest rows in batches, on demand.

    Kedro saves the image partitions in sorted id order and calls one lazy loader per image;
    the first call for a batch renders the whole batch (each image from its own seed, so it
    does not depend on its batch mates), the rest are served from memory. Models are only
    loaded when some image is actually missing.
    """

    def __init__(self, manifest: pd.DataFrame, style_bank: StyleBank, params: ImageSynthesisParams):
        self._rows = manifest.set_index("image_id")
        self._style_bank = style_bank
        self._params = params
        ids = list(self._rows.index)
        self._batches = [ids[i : i + params.batch_size] for i in range(0, len(ids), params.batch_size)]
        self._batch_of = {image_id: n for n, batch in enumerate(self._batches) for image_id in batch}
        self._rendered: dict[str, Image.Image] = {}
        self._progress: tqdm | None = None

    def image(self, image_id: str) -> Image.Image:
        if image_id not in self._rendered:
            self._rendered.clear()
            if self._progress is None:
                self._load()
                self._progress = tqdm(total=len(self._rows), desc="Rendering missing images", unit="img")
            batch = self._batches[self._batch_of[image_id]]
            rows = self._rows.loc[batch]
            started = time.perf_counter()
            images, records = self._render(rows)
            seconds = (time.perf_counter() - started) / len(batch)
            for image, record, row in zip(images, records, rows.itertuples(), strict=True):
                _attach_record(
                    image,
                    {
                        "image_id": row.Index,
                        "prompt": row.prompt,
                        "seed": int(row.seed),
                        "render_seconds": seconds,
                        **record,
                    },
                )
            self._rendered = dict(zip(batch, images, strict=True))
            self._progress.update(len(batch))
        return self._rendered.pop(image_id)

    def _style_vectors(self, rows: pd.DataFrame) -> torch.Tensor | None:
        vector_ids = rows["style_vector_id"].dropna()
        return self._style_bank.lookup(list(vector_ids)) if len(vector_ids) else None

    def _load(self) -> None:
        raise NotImplementedError

    def _render(self, rows: pd.DataFrame) -> tuple[list[Image.Image], list[dict[str, Any]]]:
        """The rows' images and, per image, what its synthesis measured."""
        raise NotImplementedError


class DiffusionRenderer(_BatchRenderer):
    """A diffusers text-to-image pipeline, conditioned on each row's prompt embedding."""

    def __init__(self, manifest, style_bank, params, runtime_params: RuntimeParams, teacher_model: ClipTeacher):
        super().__init__(manifest, style_bank, params)
        self._runtime_params = runtime_params

    def _load(self) -> None:
        self._pipeline = load_text_to_image(self._params.generator, Runtime.resolve(self._runtime_params))
        self._encoder = HFCLIPTextEncoder(self._pipeline.text_encoder, self._pipeline.tokenizer, "generator")

    def _render(self, rows: pd.DataFrame) -> tuple[list[Image.Image], list[dict[str, Any]]]:
        generator = self._params.generator
        guided = generator.guidance_scale > 1
        # The pipeline's own prompt encoding, with each row's pseudo-word spliced in; the
        # result goes in as embeddings, so "[S*]" never reaches the pipeline as text.
        with torch.no_grad(), self._encoder.splice(self._style_vectors(rows)):
            prompt_embeds, negative_prompt_embeds = self._pipeline.encode_prompt(
                prompt=self._encoder.stand_in(list(rows["prompt"])),
                device=self._pipeline.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guided,
                negative_prompt=[generator.negative_prompt] * len(rows) if guided else None,
            )
        images = self._pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_inference_steps=generator.num_inference_steps,
            guidance_scale=generator.guidance_scale,
            height=generator.height,
            width=generator.width,
            # CPU generators give the same starting noise on every device.
            generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in rows["seed"]],
        ).images
        return images, [{} for _ in images]


class InversionRenderer(_BatchRenderer):
    """Teacher-guided inversion: each row's image optimised until the teacher sees its prompt
    (pseudo-words spliced into the teacher's own text tower)."""

    def __init__(self, manifest, style_bank, params, runtime_params: RuntimeParams, teacher_model: ClipTeacher):
        super().__init__(manifest, style_bank, params)
        self._teacher = teacher_model

    def _load(self) -> None:
        inversion = self._params.inversion
        runtime = self._teacher.runtime
        self._decoder = (
            load_latent_decoder(inversion.decoder, runtime) if inversion.parameterization == "latent" else None
        )
        self._encoder = OpenClipTextEncoder(self._teacher.model, self._teacher.tokenizer, self._teacher.name)

    def _render(self, rows: pd.DataFrame) -> tuple[list[Image.Image], list[dict[str, Any]]]:
        teacher = self._teacher
        with torch.no_grad():
            text = self._encoder.encode(list(rows["prompt"]), self._style_vectors(rows))
        start, generators = start_images(self._params.inversion, list(rows["seed"]), self._decoder)
        visual = teacher.model.visual

        def encode_image(pixels: torch.Tensor) -> torch.Tensor:
            with teacher.runtime.autocast():
                return teacher.model.encode_image(pixels)

        result = invert(
            encode_image,
            text,
            start,
            generators,
            self._params.inversion,
            input_size=visual.image_size[0] if isinstance(visual.image_size, tuple | list) else visual.image_size,
            mean=visual.preprocess_cfg["mean"],
            std=visual.preprocess_cfg["std"],
        )
        images = [Image.fromarray(pixels.numpy()) for pixels in result.images]
        records = [
            {
                "inversion_loss": float(result.losses[row]),
                "inversion_loss_curve": dict(
                    zip(result.logged_iterations, result.loss_history[:, row].tolist(), strict=True)
                ),
            }
            for row in range(len(images))
        ]
        return images, records


_RECORD_KEY = "clip-dfkd"
_RENDERERS = {"diffusion": DiffusionRenderer, "inversion": InversionRenderer}


def synthesize_images(
    prompt_table: pd.DataFrame,
    style_bank: StyleBank,
    teacher_model: ClipTeacher,
    params: ImageSynthesisParams,
    teacher: TeacherParams,
    runtime: RuntimeParams,
) -> tuple[dict[str, Callable[[], Image.Image]], pd.DataFrame]:
    """Lazy images keyed by ``image_id`` and the plan (manifest rows) that can regenerate each.

    Rendering happens while the resumable partitioned dataset saves, one batch at a time, so
    images on disk are never rendered again and a killed run loses at most one batch. Each
    PNG carries its synthesis record (see ``record_synthesis``).
    """
    plan = build_manifest(prompt_table, params, teacher)
    renderer = _RENDERERS[params.backend](plan, style_bank, params, runtime, teacher_model)
    images = {image_id: partial(renderer.image, image_id) for image_id in plan["image_id"]}
    source = params.generator.model_id if params.backend == "diffusion" else teacher_model.name
    logger.info("%d images to synthesise by %s (%s)", len(images), params.backend, source)
    return images, plan


def record_synthesis(
    images: dict[str, Callable[[], Image.Image]], plan: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, list[dict[str, float]]]]:
    """The manifest (the plan plus what each image's synthesis measured, read back from its
    PNG, so images rendered by an earlier, interrupted run keep theirs) and the run's metrics:
    seconds per image, seconds of rendering in all and, for inversion, the loss curve (mean over images per logged
    iteration) and the mean final loss."""
    missing = sorted(set(plan["image_id"]) - set(images))
    if missing:
        raise DatasetError(f"synthetic_images lacks {len(missing)} planned images, e.g. {missing[0]}")
    records = pd.DataFrame([_read_record(images[image_id]()) for image_id in plan["image_id"]], index=plan.index)
    if "render_seconds" not in records:
        # PNGs written before images carried records: nothing measured to report.
        logger.warning("synthetic images carry no synthesis record; no synthesis metrics")
        return plan, {}
    manifest = plan.copy()
    seconds = records["render_seconds"].mean()
    total = float(records["render_seconds"].sum())
    metrics = {
        "seconds_per_image": [{"value": float(seconds), "step": 0}],
        "render_seconds": [{"value": total, "step": 0}],
    }
    if "inversion_loss" in records:
        manifest["inversion_loss"] = records["inversion_loss"]
        curves = pd.DataFrame(list(records["inversion_loss_curve"].dropna()))
        metrics["inversion_loss"] = [{"value": value, "step": int(step)} for step, value in curves.mean().items()]
        metrics["inversion_final_loss"] = [{"value": float(manifest["inversion_loss"].mean()), "step": 0}]
    # Rendering runs while synthetic_images saves, which Kedro's node timing (and kedro-viz's
    # Workflow view) leaves out of synthesize_images; this line and render_seconds say it.
    logger.info(
        "%d images in the manifest: %.1f s of rendering in all (%.3f s per image), spent while saving "
        "synthetic_images, so not in synthesize_images' node time",
        len(manifest),
        total,
        seconds,
    )
    return manifest, metrics


def _attach_record(image: Image.Image, record: dict[str, Any]) -> None:
    # Pillow writes an image's own ``encoderinfo`` when it saves it: the record travels with
    # the image through the partitioned dataset into a PNG text chunk.
    text = PngInfo()
    text.add_text(_RECORD_KEY, json.dumps(record))
    image.encoderinfo = {"pnginfo": text}


def _read_record(image: Image.Image) -> dict[str, Any]:
    text = image.info.get(_RECORD_KEY)
    return json.loads(text) if text else {}


def plot_sample_grid(
    images: dict[str, Callable[[], Image.Image]], manifest: pd.DataFrame, params: ImageSynthesisParams
) -> Figure:
    """One synthetic image per class (rows) and style (columns)."""
    samples = manifest.drop_duplicates(["class_name", "style"])
    classes = list(dict.fromkeys(samples["class_name"]))
    styles = list(dict.fromkeys(samples["style"]))[: params.sample_grid_columns]
    cell = 1.6
    figure, axes = plt.subplots(
        len(classes),
        len(styles),
        figsize=(cell * len(styles) + 1, cell * len(classes) + 0.5),
        squeeze=False,
        constrained_layout=True,
    )
    lookup = samples.set_index(["class_name", "style"])["image_id"]
    for r, class_name in enumerate(classes):
        for c, style in enumerate(styles):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            image_id = lookup.get((class_name, style))
            if image_id is not None and image_id in images:
                axis.imshow(images[image_id]())
            if r == 0:
                axis.set_title(style, fontsize=9)
            if c == 0:
                axis.set_ylabel(class_name, fontsize=9)
    source = manifest["generator_model_id" if "generator_model_id" in manifest else "teacher"].iloc[0]
    figure.suptitle(f"Synthetic samples — {manifest['backend'].iloc[0]}\n{source}", fontsize=9)
    return figure
