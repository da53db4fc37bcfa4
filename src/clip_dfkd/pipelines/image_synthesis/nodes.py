from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
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
            self._rendered = dict(zip(batch, self._render(self._rows.loc[batch]), strict=True))
            self._progress.update(len(batch))
        return self._rendered.pop(image_id)

    def _style_vectors(self, rows: pd.DataFrame) -> torch.Tensor | None:
        vector_ids = rows["style_vector_id"].dropna()
        return self._style_bank.lookup(list(vector_ids)) if len(vector_ids) else None

    def _load(self) -> None:
        raise NotImplementedError

    def _render(self, rows: pd.DataFrame) -> list[Image.Image]:
        raise NotImplementedError


class DiffusionRenderer(_BatchRenderer):
    """A diffusers text-to-image pipeline, conditioned on each row's prompt embedding."""

    def __init__(self, manifest, style_bank, params, runtime_params: RuntimeParams, teacher_model: ClipTeacher):
        super().__init__(manifest, style_bank, params)
        self._runtime_params = runtime_params

    def _load(self) -> None:
        self._pipeline = load_text_to_image(self._params.generator, Runtime.resolve(self._runtime_params))
        self._encoder = HFCLIPTextEncoder(self._pipeline.text_encoder, self._pipeline.tokenizer, "generator")

    def _render(self, rows: pd.DataFrame) -> list[Image.Image]:
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
        return self._pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_inference_steps=generator.num_inference_steps,
            guidance_scale=generator.guidance_scale,
            height=generator.height,
            width=generator.width,
            # CPU generators give the same starting noise on every device.
            generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in rows["seed"]],
        ).images


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

    def _render(self, rows: pd.DataFrame) -> list[Image.Image]:
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
        return [Image.fromarray(pixels.numpy()) for pixels in result.images]


_RENDERERS = {"diffusion": DiffusionRenderer, "inversion": InversionRenderer}


def synthesize_images(
    prompt_table: pd.DataFrame,
    style_bank: StyleBank,
    teacher_model: ClipTeacher,
    params: ImageSynthesisParams,
    teacher: TeacherParams,
    runtime: RuntimeParams,
) -> tuple[dict[str, Callable[[], Image.Image]], pd.DataFrame]:
    """Lazy images keyed by ``image_id`` and the manifest that can regenerate each of them.

    Rendering happens while the resumable partitioned dataset saves, one batch at a time, so
    images on disk are never rendered again and a killed run loses at most one batch.
    """
    manifest = build_manifest(prompt_table, params, teacher)
    renderer = _RENDERERS[params.backend](manifest, style_bank, params, runtime, teacher_model)
    images = {image_id: partial(renderer.image, image_id) for image_id in manifest["image_id"]}
    source = params.generator.model_id if params.backend == "diffusion" else teacher_model.name
    logger.info("%d images to synthesise by %s (%s)", len(images), params.backend, source)
    return images, manifest


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
