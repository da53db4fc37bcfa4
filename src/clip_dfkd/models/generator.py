"""The text-to-image generator: any diffusers pipeline, from the hub or a local folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from clip_dfkd.models.errors import ModelNotFoundError
from clip_dfkd.params import GeneratorParams
from clip_dfkd.runtime import Runtime

logger = logging.getLogger(__name__)


def is_local_reference(model_id: str) -> bool:
    """A folder rather than a hub id: an existing path, one that starts with '/', '.' or '~',
    or one with more than the single '/' of ``organisation/name``."""
    return Path(model_id).expanduser().exists() or model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1


def pretrained_source(model_id: str) -> str:
    """What ``from_pretrained`` takes: the expanded folder path, or the hub id as it is."""
    return str(Path(model_id).expanduser()) if is_local_reference(model_id) else model_id


def missing_generator_weights(params: GeneratorParams) -> str | None:
    """Why the generator cannot be loaded here, or None when it can (or may still be
    downloaded). Cheap: reads the disk and the Hugging Face cache, never the network."""
    import huggingface_hub

    if is_local_reference(params.model_id):
        if Path(params.model_id, "model_index.json").expanduser().is_file():
            return None
        return (
            f"image_synthesis.generator.model_id={params.model_id!r}: no diffusers pipeline there; "
            "allowed: a folder saved with save_pretrained (it holds model_index.json) or a hub id"
        )
    if not huggingface_hub.is_offline_mode():
        return None  # diffusers downloads it on first use
    try:
        huggingface_hub.snapshot_download(params.model_id, revision=params.revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not in the cache"
        return _download_hint(params)
    return None


# Pseudo-words are spliced into one CLIP text encoder through the pipeline's own
# ``encode_prompt``: Stable Diffusion 1.x/2.x (and their Turbo/LCM distillations) have that.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


def unsupported_generator(params: GeneratorParams) -> str | None:
    """Why the generator is not a pipeline this project can condition, or None (also when
    its ``model_index.json`` cannot be read here; loading it then tells)."""
    import huggingface_hub

    if is_local_reference(params.model_id):
        index_file = Path(params.model_id, "model_index.json").expanduser()
    else:
        try:
            index_file = huggingface_hub.hf_hub_download(params.model_id, "model_index.json", revision=params.revision)
        except Exception:  # noqa: BLE001 - not reachable or not cached: the weights check reports it
            return None
    try:
        index = json.loads(Path(index_file).read_text())
    except (OSError, ValueError):
        return None
    pipeline_class = index.get("_class_name")
    if pipeline_class in SUPPORTED_PIPELINES and "text_encoder" in index and "text_encoder_2" not in index:
        return None
    return (
        f"image_synthesis.generator.model_id={params.model_id!r}: a {pipeline_class} "
        f"(text encoders: {', '.join(sorted(k for k in index if k.startswith('text_encoder'))) or 'none'}); "
        "allowed: a Stable Diffusion 1.x/2.x pipeline with one CLIP text encoder "
        f"({', '.join(SUPPORTED_PIPELINES)}, e.g. stabilityai/sd-turbo, stable-diffusion-v1-5/stable-diffusion-v1-5)"
    )


def _download_hint(params: GeneratorParams) -> str:
    return (
        f"image_synthesis.generator.model_id={params.model_id!r}: not in the local Hugging Face "
        "cache and cannot be downloaded here; download it where there is network "
        f"(`hf download {params.model_id} --local-dir <dir>`) and set "
        "image_synthesis.generator.model_id to that folder"
    )


def load_text_to_image(params: GeneratorParams, runtime: Runtime):
    """``AutoPipelineForText2Image.from_pretrained`` on a hub id or a ``save_pretrained`` folder."""
    import diffusers

    if problem := missing_generator_weights(params):
        raise ModelNotFoundError(problem)
    logger.info("Loading generator %s", params.model_id)
    try:
        pipeline = diffusers.AutoPipelineForText2Image.from_pretrained(
            pretrained_source(params.model_id), dtype=runtime.dtype, revision=params.revision, variant=params.variant
        )
    except OSError as exc:
        if is_local_reference(params.model_id):
            raise ModelNotFoundError(
                f"image_synthesis.generator.model_id={params.model_id!r}: the pipeline folder is "
                f"incomplete ({str(exc).splitlines()[0]})"
            ) from exc
        raise ModelNotFoundError(_download_hint(params)) from exc
    if params.scheduler is not None:
        scheduler_class = getattr(diffusers, params.scheduler)
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    # The synthesis node shows one progress bar over all images instead of one per batch.
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(runtime.device)
    if runtime.compile:
        pipeline.unet = torch.compile(pipeline.unet)
    return pipeline
