"""The text-to-image generator: any diffusers pipeline, from the hub or a local folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from clip_dfkd.models.errors import ModelNotFoundError
from clip_dfkd.models.hub import hub_reachable
from clip_dfkd.params import GeneratorParams, InversionDecoderParams
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
    return _missing_diffusers_weights(
        params.model_id,
        params.revision,
        "model_index.json",
        f"image_synthesis.generator.model_id={params.model_id!r}: no diffusers pipeline there; "
        "allowed: a folder saved with save_pretrained (it holds model_index.json) or a hub id",
        _download_hint("image_synthesis.generator.model_id", params.model_id),
    )


def _components_given(params: GeneratorParams) -> set[str]:
    """Components the loader passes itself (``safety_checker=None``; ``vae`` with
    ``tiny_vae``): their folders are never read."""
    return {"safety_checker", *(["vae"] if params.tiny_vae is not None else [])}


def incomplete_generator_folder(params: GeneratorParams) -> str | None:
    """Why a local pipeline folder is half-written (by a copy or download that stopped), or
    None: its ``model_index.json`` must be a JSON object, and each component it names
    (``"unet": ["diffusers", "UNet2DConditionModel"]``; ``[null, null]`` is none) needs a
    non-empty folder of that name. Otherwise diffusers fails only when synthesis loads it."""
    if not is_local_reference(params.model_id):
        return None
    folder = Path(params.model_id).expanduser()
    index_file = folder / "model_index.json"
    allowed = (
        "allowed: a whole save_pretrained folder (model_index.json and a folder for each component it names) "
        "or a hub id"
    )
    key = f"image_synthesis.generator.model_id={params.model_id!r}"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        return f"{key}: {index_file} is not readable JSON ({' '.join(str(exc).split())}); {allowed}"
    if not isinstance(index, dict):
        return f"{key}: {index_file} holds a {type(index).__name__}, not a JSON object; {allowed}"
    components = [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and None not in value
        and name not in _components_given(params)
    ]
    if missing := [name for name in components if not _has_files(folder / name)]:
        return f"{key}: {index_file} names components whose folders are missing or empty: {missing}; {allowed}"
    return None


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def missing_tiny_vae_weights(params: GeneratorParams) -> str | None:
    """Why ``generator.tiny_vae`` cannot be loaded here, or None (as above, and None when unset)."""
    if params.tiny_vae is None:
        return None
    key = "image_synthesis.generator.tiny_vae"
    return _missing_diffusers_weights(
        params.tiny_vae,
        None,
        "config.json",
        f"{key}={params.tiny_vae!r}: no config.json there; allowed: null, a diffusers AutoencoderTiny folder "
        "(saved with save_pretrained) or a hub id such as madebyollin/taesd",
        _download_hint(key, params.tiny_vae),
    )


def missing_decoder_weights(params: InversionDecoderParams) -> str | None:
    """Why the inversion's latent decoder cannot be loaded here, or None (as above)."""
    key = "image_synthesis.inversion.decoder.model_id"
    config = str(Path(params.subfolder or "", "config.json"))
    return _missing_diffusers_weights(
        params.model_id,
        params.revision,
        config,
        f"{key}={params.model_id!r}: no {config} there; allowed: a diffusers AutoencoderKL or VQModel folder "
        "(e.g. a Stable Diffusion pipeline folder with subfolder: vae) or a hub id",
        _download_hint(key, params.model_id),
    )


def _missing_diffusers_weights(
    model_id: str, revision: str | None, marker: str, not_a_folder: str, not_cached: str
) -> str | None:
    """``not_a_folder`` for a local folder without ``marker``; ``not_cached`` for a hub id
    that is not in the cache while HF_HUB_OFFLINE is set; otherwise None."""
    import huggingface_hub

    if is_local_reference(model_id):
        return None if Path(model_id, marker).expanduser().is_file() else not_a_folder
    if hub_reachable():
        return None  # diffusers downloads it on first use
    try:
        huggingface_hub.snapshot_download(model_id, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not in the cache"
        return not_cached
    return None


# Pseudo-words are spliced into one CLIP text encoder through the pipeline's own
# ``encode_prompt``: Stable Diffusion 1.x/2.x (and their Turbo/LCM distillations) have that.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


def _model_index(params: GeneratorParams) -> dict[str, Any] | None:
    """The pipeline's ``model_index.json``, or None when it cannot be read here (or holds
    no JSON object)."""
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
    return index if isinstance(index, dict) else None


def unsupported_generator(params: GeneratorParams) -> str | None:
    """Why the generator is not a pipeline this project can condition, or None (also when
    its ``model_index.json`` cannot be read here: :func:`incomplete_generator_folder` tells
    for a folder, loading it for a hub id)."""
    index = _model_index(params)
    if index is None:
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


def _download_hint(key: str, model_id: str) -> str:
    return (
        f"{key}={model_id!r}: not in the local Hugging Face cache and cannot be downloaded here; download it "
        f"where there is network (`hf download {model_id} --local-dir <dir>`) and set {key} to that folder"
    )


def load_text_to_image(params: GeneratorParams, runtime: Runtime):
    """``AutoPipelineForText2Image.from_pretrained`` on a hub id or a ``save_pretrained`` folder."""
    import diffusers

    if problem := missing_generator_weights(params) or incomplete_generator_folder(params):
        raise ModelNotFoundError(problem)
    logger.info("Loading generator %s", params.model_id)
    if (_model_index(params) or {}).get("safety_checker", [None])[0] is not None:
        logger.info(
            "Generator %s ships a safety checker; it is not loaded: it replaces every image it flags with a black "
            "one, which would leave silent holes in the training images",
            params.model_id,
        )
    # Given in place of the pipeline's own VAE, which is then never loaded.
    replaced = {"vae": _load_tiny_vae(params, runtime)} if params.tiny_vae is not None else {}
    try:
        pipeline = diffusers.AutoPipelineForText2Image.from_pretrained(
            pretrained_source(params.model_id),
            dtype=runtime.dtype,
            revision=params.revision,
            variant=params.variant,
            # Every supported pipeline (Stable Diffusion 1.x/2.x) takes these two.
            safety_checker=None,
            requires_safety_checker=False,
            **replaced,
        )
    except OSError as exc:
        if is_local_reference(params.model_id):
            raise ModelNotFoundError(
                f"image_synthesis.generator.model_id={params.model_id!r}: the pipeline folder is "
                f"incomplete ({str(exc).splitlines()[0]})"
            ) from exc
        raise ModelNotFoundError(_download_hint("image_synthesis.generator.model_id", params.model_id)) from exc
    if replaced and replaced["vae"].config.latent_channels != pipeline.unet.config.in_channels:
        raise ModelNotFoundError(
            f"image_synthesis.generator.tiny_vae={params.tiny_vae!r}: decodes "
            f"{replaced['vae'].config.latent_channels}-channel latents, {params.model_id}'s UNet makes "
            f"{pipeline.unet.config.in_channels}; allowed: a tiny VAE made for this generator family"
        )
    if params.scheduler is not None:
        scheduler_class = getattr(diffusers, params.scheduler)
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    # The synthesis node shows one progress bar over all images instead of one per batch.
    pipeline.set_progress_bar_config(disable=True)
    # Decoding a whole batch of 512 px latents at once can need more memory than the UNet.
    if params.vae_slicing:
        pipeline.vae.enable_slicing()
    if params.vae_tiling:
        pipeline.vae.enable_tiling()
    pipeline.to(runtime.device)
    # diffusers' advice for tensor cores: the UNet's and the VAE's convolutions channels-last.
    pipeline.unet.to(memory_format=runtime.memory_format)
    pipeline.vae.to(memory_format=runtime.memory_format)
    if runtime.compile:
        pipeline.unet = torch.compile(pipeline.unet)
    return pipeline


def _load_tiny_vae(params: GeneratorParams, runtime: Runtime):
    import diffusers

    if problem := missing_tiny_vae_weights(params):
        raise ModelNotFoundError(problem)
    logger.info("Decoding with the tiny VAE %s instead of %s's own", params.tiny_vae, params.model_id)
    try:
        return diffusers.AutoencoderTiny.from_pretrained(pretrained_source(params.tiny_vae), dtype=runtime.dtype)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"image_synthesis.generator.tiny_vae={params.tiny_vae!r}: not a loadable AutoencoderTiny "
            f"({str(exc).splitlines()[0]})"
        ) from exc


DECODER_CLASSES = ("AutoencoderKL", "VQModel")


def load_latent_decoder(params: InversionDecoderParams, runtime: Runtime):
    """A diffusers ``AutoencoderKL`` or ``VQModel`` (``from_pretrained`` on a hub id or a
    folder), frozen, for the inversion's ``latent`` parameterisation."""
    import diffusers

    if problem := missing_decoder_weights(params):
        raise ModelNotFoundError(problem)
    source = pretrained_source(params.model_id)
    options = {"subfolder": params.subfolder, "revision": params.revision}
    # Any ConfigMixin reads the config file; its _class_name says which decoder it is.
    class_name = diffusers.AutoencoderKL.load_config(source, **options).get("_class_name")
    if class_name not in DECODER_CLASSES:
        raise ModelNotFoundError(
            f"image_synthesis.inversion.decoder.model_id={params.model_id!r}: a {class_name}; "
            f"allowed: one of {', '.join(DECODER_CLASSES)}"
        )
    logger.info("Loading latent decoder %s (%s)", params.model_id, class_name)
    decoder = getattr(diffusers, class_name).from_pretrained(source, **options)
    return decoder.to(runtime.device).eval().requires_grad_(False)
