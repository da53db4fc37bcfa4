from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import matplotlib.pyplot as plt
import pandas as pd
from kedro.io import DatasetError
from matplotlib.figure import Figure
from PIL import Image

from clip_dfkd.models import PROJECT_LOADERS, ModelLoaders
from clip_dfkd.naming import shard_of, slugify, stable_hash
from clip_dfkd.params import ImageSynthesisParams, RuntimeParams, TeacherParams
from clip_dfkd.rendering import LocalImages, RayImages, RenderTiming, create_renderer, read_saved_record
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
            # Only when set: ids made before the switch existed stay valid.
            **({"tiny_vae": generator.tiny_vae} if generator.tiny_vae is not None else {}),
        }
    inversion = params.inversion.model_dump(mode="json")
    decoder = inversion.pop("decoder") or {}
    return {
        "backend": params.backend,
        "teacher": teacher.display_name,
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


def select_shard(plan: pd.DataFrame, num_shards: int, shard_index: int) -> pd.DataFrame:
    """The plan rows of shard ``shard_index``. A hash of each ``image_id`` picks its shard, so
    the shards are disjoint, together hold the whole plan, and an image stays in its shard
    when rows are added."""
    if num_shards == 1:
        return plan
    mine = [shard_of(image_id, num_shards) == shard_index for image_id in plan["image_id"]]
    return plan[mine].reset_index(drop=True)


def synthesize_images(
    prompt_table: pd.DataFrame,
    style_bank: StyleBank,
    params: ImageSynthesisParams,
    teacher: TeacherParams,
    runtime: RuntimeParams,
    loaders: ModelLoaders = PROJECT_LOADERS,
) -> tuple[dict[str, Callable[[], Image.Image]], pd.DataFrame, RenderTiming]:
    """Lazy images keyed by ``image_id``, the plan (manifest rows) that can regenerate each, and
    the run's rendering time, counted as the images are rendered.

    Rendering happens while the resumable partitioned dataset saves, one batch at a time, so
    images on disk are never rendered again and a killed run loses at most one batch. Each
    PNG carries its synthesis record (see ``record_synthesis``). ``loaders`` loads the
    generator or the teacher (the project's loaders; Kedro passes no other).
    """
    plan = select_shard(build_manifest(prompt_table, params, teacher), params.num_shards, params.shard_index)
    image_ids = list(plan["image_id"])
    timing = RenderTiming()
    if params.executor == "ray":
        on_demand = RayImages(plan, style_bank, params, runtime, teacher, timing, loaders)
    else:
        renderer = create_renderer(plan, style_bank, params, runtime, teacher, loaders)
        on_demand = LocalImages(renderer, image_ids, params.batch_size, timing)
    images = on_demand.loaders()
    source = params.generator.model_id if params.backend == "diffusion" else teacher.display_name
    shard = f", shard {params.shard_index} of {params.num_shards}" if params.num_shards > 1 else ""
    logger.info("%d images planned, by %s (%s%s)", len(images), params.backend, source, shard)
    return images, plan, timing


def record_synthesis(
    images: dict[str, Callable[[], Image.Image]], plan: pd.DataFrame, timing: RenderTiming
) -> tuple[pd.DataFrame, dict[str, list[dict[str, float]]]]:
    """The manifest (the plan plus what each image's synthesis computed, read back from its
    PNG's text chunk without decoding the pixels, so images rendered by an earlier,
    interrupted run keep theirs) and the run's metrics: the images this run rendered, its
    seconds of rendering (and per image, when it rendered any) and, for inversion, the loss
    curve (mean over images per logged iteration) and the mean final loss."""
    missing = sorted(set(plan["image_id"]) - set(images))
    if missing:
        raise DatasetError(f"synthetic_images lacks {len(missing)} planned images, e.g. {missing[0]}")
    records = pd.DataFrame([read_saved_record(images[image_id]) for image_id in plan["image_id"]], index=plan.index)
    manifest = plan.copy()
    metrics = {
        "rendered_images": [{"value": float(timing.images), "step": 0}],
        "render_seconds": [{"value": timing.seconds, "step": 0}],
    }
    if timing.images:
        metrics["seconds_per_image"] = [{"value": timing.seconds / timing.images, "step": 0}]
    if "inversion_loss" in records:
        manifest["inversion_loss"] = records["inversion_loss"]
        curves = pd.DataFrame(list(records["inversion_loss_curve"].dropna()))
        metrics["inversion_loss"] = [{"value": value, "step": int(step)} for step, value in curves.mean().items()]
        metrics["inversion_final_loss"] = [{"value": float(manifest["inversion_loss"].mean()), "step": 0}]
    elif plan["backend"].eq("inversion").any():
        # PNGs written before images carried records: nothing computed to report.
        logger.warning("synthetic images carry no synthesis record; no inversion loss in the manifest")
    # Rendering runs while synthetic_images saves, which Kedro's node timing (and kedro-viz's
    # Workflow view) leaves out of synthesize_images; this line and render_seconds say it.
    logger.info(
        "%d images in the manifest, %d rendered by this run: %.1f s of rendering, spent while saving "
        "synthetic_images, so not in synthesize_images' node time",
        len(manifest),
        timing.images,
        timing.seconds,
    )
    return manifest, metrics


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
