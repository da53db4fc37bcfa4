from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from clip_dfkd.models import load_text_to_image
from clip_dfkd.models.text_encoders import HFCLIPTextEncoder
from clip_dfkd.naming import slugify, stable_hash
from clip_dfkd.params import ImageSynthesisParams, RuntimeParams
from clip_dfkd.runtime import Runtime
from clip_dfkd.styles import StyleBank

logger = logging.getLogger(__name__)

# Everything, beside the prompt row, that decides the pixels of an image.
RECIPE_COLUMNS = [
    "backend",
    "generator_model_id",
    "generator_revision",
    "generator_variant",
    "scheduler",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "height",
    "width",
]


def build_manifest(prompt_table: pd.DataFrame, params: ImageSynthesisParams) -> pd.DataFrame:
    """The prompt table plus the generator recipe and a content-addressed ``image_id``.

    The id hashes everything that decides the pixels, so a changed recipe never reuses an
    image rendered with an old one, and an unchanged one is found on disk and skipped.
    """
    generator = params.generator
    manifest = prompt_table.copy()
    recipe = {
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
    for column, value in recipe.items():
        manifest[column] = value
    manifest = manifest.astype(
        {c: "string" for c in ("generator_model_id", "generator_revision", "generator_variant", "scheduler")}
    )
    manifest.insert(
        0,
        "image_id",
        [
            f"{slugify(row.class_name)}/{row.prompt_id}-"
            + stable_hash(row.prompt, row.seed, row.method, row.style_vector_id, *(recipe[c] for c in RECIPE_COLUMNS))
            for row in manifest.itertuples()
        ],
    )
    return manifest.sort_values("image_id", ignore_index=True)


class DiffusionRenderer:
    """Renders manifest rows in batches with a diffusers pipeline, on demand.

    Kedro saves the image partitions in sorted id order and calls one lazy loader per image;
    the first call for a batch renders the whole batch (one seeded generator per image, so
    an image does not depend on its batch mates), the rest are served from memory. The
    generator is only loaded when some image is actually missing.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        style_bank: StyleBank,
        params: ImageSynthesisParams,
        runtime_params: RuntimeParams,
    ):
        self._rows = manifest.set_index("image_id")
        self._style_bank = style_bank
        self._params = params
        self._runtime_params = runtime_params
        ids = list(self._rows.index)
        self._batches = [ids[i : i + params.batch_size] for i in range(0, len(ids), params.batch_size)]
        self._batch_of = {image_id: n for n, batch in enumerate(self._batches) for image_id in batch}
        self._rendered: dict[str, Image.Image] = {}
        self._pipeline = None
        self._encoder: HFCLIPTextEncoder | None = None
        self._progress: tqdm | None = None

    def image(self, image_id: str) -> Image.Image:
        if image_id not in self._rendered:
            self._rendered.clear()
            self._render(self._batches[self._batch_of[image_id]])
        return self._rendered.pop(image_id)

    def _render(self, batch: list[str]) -> None:
        if self._pipeline is None:
            self._pipeline = load_text_to_image(self._params.generator, Runtime.resolve(self._runtime_params))
            self._encoder = HFCLIPTextEncoder(self._pipeline.text_encoder, self._pipeline.tokenizer, "generator")
            self._progress = tqdm(total=len(self._rows), desc="Rendering missing images", unit="img")
        rows = self._rows.loc[batch]
        generator = self._params.generator
        guided = generator.guidance_scale > 1
        vector_ids = rows["style_vector_id"].dropna()
        vectors = self._style_bank.lookup(list(vector_ids)) if len(vector_ids) else None
        # The pipeline's own prompt encoding, with each row's pseudo-word spliced in; the
        # result goes in as embeddings, so "[S*]" never reaches the pipeline as text.
        with torch.no_grad(), self._encoder.splice(vectors):
            prompt_embeds, negative_prompt_embeds = self._pipeline.encode_prompt(
                prompt=self._encoder.stand_in(list(rows["prompt"])),
                device=self._pipeline.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guided,
                negative_prompt=[generator.negative_prompt] * len(rows) if guided else None,
            )
        result = self._pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_inference_steps=generator.num_inference_steps,
            guidance_scale=generator.guidance_scale,
            height=generator.height,
            width=generator.width,
            # CPU generators give the same starting noise on every device.
            generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in rows["seed"]],
        )
        self._rendered = dict(zip(batch, result.images, strict=True))
        self._progress.update(len(batch))


_RENDERERS = {"diffusion": DiffusionRenderer}


def synthesize_images(
    prompt_table: pd.DataFrame, style_bank: StyleBank, params: ImageSynthesisParams, runtime: RuntimeParams
) -> tuple[dict[str, Callable[[], Image.Image]], pd.DataFrame]:
    """Lazy images keyed by ``image_id`` and the manifest that can regenerate each of them.

    Rendering happens while the resumable partitioned dataset saves, one batch at a time, so
    images on disk are never rendered again and a killed run loses at most one batch.
    """
    manifest = build_manifest(prompt_table, params)
    renderer = _RENDERERS[params.backend](manifest, style_bank, params, runtime)
    images = {image_id: partial(renderer.image, image_id) for image_id in manifest["image_id"]}
    logger.info("%d images to synthesise with %s (%s)", len(images), params.generator.model_id, params.backend)
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
    figure.suptitle(f"Synthetic samples — {manifest['generator_model_id'].iloc[0]}", fontsize=10)
    return figure
