"""Renderers: manifest rows into images, by a diffusers pipeline or by teacher-guided inversion.

A renderer loads its models (through :class:`~clip_dfkd.models.ModelLoaders`) when it first
renders, and they go when it goes. Every image is drawn from its own seed, so a row gives the
same pixels in whichever batch, shard or process it is rendered.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import pandas as pd
import torch
from PIL import Image

from clip_dfkd.errors import UserError
from clip_dfkd.models import PROJECT_LOADERS, ModelLoaders
from clip_dfkd.models.generator import load_latent_decoder
from clip_dfkd.models.inversion import invert, start_images
from clip_dfkd.models.text_encoders import HFCLIPTextEncoder, OpenClipTextEncoder
from clip_dfkd.params import ImageSynthesisParams, RuntimeParams, TeacherParams
from clip_dfkd.runtime import FittingBatches, Runtime
from clip_dfkd.styles import StyleBank

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RenderedBatch:
    """Images with their records (see :mod:`clip_dfkd.rendering.records`), and the seconds
    rendering them took."""

    images: list[Image.Image]
    records: list[dict[str, Any]]
    seconds: float

    @staticmethod
    def joined(parts: list[RenderedBatch]) -> RenderedBatch:
        return RenderedBatch(
            [image for part in parts for image in part.images],
            [record for part in parts for record in part.records],
            sum(part.seconds for part in parts),
        )


class RenderingOutOfMemoryError(UserError, RuntimeError):
    """Not even one image fits on the device; the message says what to change."""


class Renderer:
    """Renders manifest rows (indexed by ``image_id``) into images and, per image, a record
    of its synthesis (prompt, seed, and what the backend computed)."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        style_bank: StyleBank,
        params: ImageSynthesisParams,
        runtime_params: RuntimeParams,
        teacher_params: TeacherParams,
        loaders: ModelLoaders = PROJECT_LOADERS,
    ):
        self._rows = manifest.set_index("image_id")
        self._loaders = loaders
        self._style_bank = style_bank
        self._params = params
        self._runtime_params = runtime_params
        self._teacher_params = teacher_params
        self._loaded = False
        self._fitting = FittingBatches(self._warn_split, lambda: RenderingOutOfMemoryError(self._out_of_memory()))

    def render(self, image_ids: list[str]) -> RenderedBatch:
        if not self._loaded:
            self._load()
            if self._style_bank is not None and self._style_bank.names:
                # A bank made with another encoder of the same width would splice silently.
                self._style_bank.check_encoder(self._encoder, "style_bank")
            self._loaded = True
        # A batch that does not fit is rendered half as many at a time, which later batches
        # keep to; every image has its own seed, so the images are the same up to rounding.
        return self._fitting.run(image_ids, self._render_rows, RenderedBatch.joined)

    def _warn_split(self, tried: int, fits: int) -> None:
        logger.warning(
            "image_synthesis: %d images at once do not fit in device memory; rendering %d at a time "
            "(image_synthesis.batch_size is %d)",
            tried,
            fits,
            self._params.batch_size,
        )

    def _render_rows(self, image_ids: list[str]) -> RenderedBatch:
        rows = self._rows.loc[image_ids]
        started = time.perf_counter()
        images, computed = self._render(rows)
        seconds = time.perf_counter() - started
        records = [
            {"image_id": row.Index, "prompt": row.prompt, "seed": int(row.seed), **extra}
            for row, extra in zip(rows.itertuples(), computed, strict=True)
        ]
        return RenderedBatch(images, records, seconds)

    def _out_of_memory(self) -> str:
        params = self._params
        if params.backend == "inversion":
            inversion = params.inversion
            return (
                f"image_synthesis: out of device memory rendering a single image (inversion); lower "
                f"image_synthesis.inversion.cutouts (now {inversion.cutouts}) or image_synthesis.inversion.image_size "
                f"(now {inversion.image_size})"
            )
        generator = params.generator
        options = [f"image_synthesis.generator.{name}=true" for name in ("vae_slicing",) if not generator.vae_slicing]
        if generator.tiny_vae is None:
            options.append("image_synthesis.generator.tiny_vae (e.g. madebyollin/taesd)")
        settings = f"set {' or '.join(options)}, or " if options else ""
        return (
            f"image_synthesis: out of device memory rendering a single image (diffusion); {settings}lower "
            f"image_synthesis.generator.height/width (now {generator.height}x{generator.width})"
        )

    def _style_vectors(self, rows: pd.DataFrame) -> torch.Tensor | None:
        vector_ids = rows["style_vector_id"].dropna()
        return self._style_bank.lookup(list(vector_ids)) if len(vector_ids) else None

    def _load(self) -> None:
        raise NotImplementedError

    def _render(self, rows: pd.DataFrame) -> tuple[list[Image.Image], list[dict[str, Any]]]:
        """The rows' images and, per image, what its synthesis computed."""
        raise NotImplementedError


class DiffusionRenderer(Renderer):
    """A diffusers text-to-image pipeline, conditioned on each row's prompt embedding."""

    def _load(self) -> None:
        self._pipeline = self._loaders.text_to_image(self._params.generator, Runtime.resolve(self._runtime_params))
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


class InversionRenderer(Renderer):
    """Teacher-guided inversion: each row's image optimised until the teacher sees its prompt
    (pseudo-words spliced into the teacher's own text tower)."""

    def _load(self) -> None:
        inversion = self._params.inversion
        runtime = Runtime.resolve(self._runtime_params)
        self._teacher = self._loaders.teacher(self._teacher_params, runtime)
        self._decoder = (
            load_latent_decoder(inversion.decoder, runtime) if inversion.parameterization == "latent" else None
        )
        self._encoder = OpenClipTextEncoder(self._teacher.model, self._teacher.tokenizer, self._teacher.name, runtime)

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


_RENDERERS: dict[str, type[Renderer]] = {"diffusion": DiffusionRenderer, "inversion": InversionRenderer}


def create_renderer(
    manifest: pd.DataFrame,
    style_bank: StyleBank,
    params: ImageSynthesisParams,
    runtime: RuntimeParams,
    teacher: TeacherParams,
    loaders: ModelLoaders = PROJECT_LOADERS,
) -> Renderer:
    """The backend's renderer; it loads its models (the generator, or the teacher for
    inversion) with ``loaders`` when it first renders, and they go when it goes."""
    return _RENDERERS[params.backend](manifest, style_bank, params, runtime, teacher, loaders)
