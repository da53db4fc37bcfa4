"""``image_synthesis`` (conf/base/parameters_image_synthesis.yml)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from clip_dfkd.params.base import Params, bad_value
from clip_dfkd.params.shared import ScaleRange


class GeneratorParams(Params):
    """A diffusers text-to-image pipeline: a hub id or a local ``save_pretrained`` folder."""

    section: ClassVar[str] = "image_synthesis.generator"

    model_id: str
    revision: str | None = None
    variant: str | None = None
    scheduler: str | None = None
    num_inference_steps: PositiveInt = 4
    guidance_scale: float = Field(default=0.0, ge=0.0)
    negative_prompt: str = ""
    height: PositiveInt = 512
    width: PositiveInt = 512
    # The VAE decodes the batch one image at a time (slicing) or in overlapping tiles (tiling,
    # for large images): less memory, the same images up to rounding.
    vae_slicing: bool = False
    vae_tiling: bool = False
    # A diffusers AutoencoderTiny (hub id or folder; madebyollin/taesd for SD 1.x/2.x) decodes
    # in place of the pipeline's VAE: for few-step generators the full VAE's decode is a large
    # share of each image's time. Other pixels, so it is part of every image's id.
    tiny_vae: str | None = None

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str | None) -> str | None:
        if name is None:
            return None
        import diffusers

        schedulers = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        if name not in schedulers:
            raise ValueError(f"is not a diffusers scheduler; allowed: null or {', '.join(schedulers)}")
        return name

    @field_validator("height", "width")
    @classmethod
    def _fits_the_latent_grid(cls, size: int) -> int:
        # Stable Diffusion VAEs downsample by 8; other sizes crash deep inside the UNet.
        if size % 8:
            raise ValueError("must be a multiple of 8")
        return size


class InversionDecoderParams(Params):
    """A diffusers decoder whose latent the inversion optimises: an ``AutoencoderKL`` (Stable
    Diffusion's VAE: ``subfolder: vae`` of a pipeline) or a ``VQModel`` (a VQGAN converted to
    diffusers), from a hub id or a local folder."""

    model_id: str
    subfolder: str | None = None
    revision: str | None = None


class InversionParams(Params):
    """Teacher-guided inversion (the paper's synthesis, after VQGAN-CLIP): each image is
    optimised until the teacher's embeddings of random augmented cut-outs of it match the
    prompt's text embedding. See docs/inversion.md for the formulation and sources."""

    section: ClassVar[str] = "image_synthesis.inversion"

    parameterization: Literal["pixels", "fourier", "latent"] = "fourier"
    image_size: PositiveInt = 224
    # pixels only: optimise a grid_size × grid_size image, upsampled (null: full resolution).
    grid_size: PositiveInt | None = 16
    iterations: PositiveInt = 400
    learning_rate: PositiveFloat = 0.1
    cutouts: PositiveInt = 32
    cutout_scale: ScaleRange = (0.25, 1.0)
    noise: float = Field(default=0.1, ge=0.0)
    color_jitter: float = Field(default=0.1, ge=0.0)
    tv_weight: float = Field(default=0.0, ge=0.0)
    log_every: PositiveInt = 10
    decoder: InversionDecoderParams | None = None

    @model_validator(mode="after")
    def _latent_needs_a_decoder(self) -> InversionParams:
        if self.parameterization == "latent" and self.decoder is None:
            raise bad_value(
                "decoder",
                None,
                "parameterization latent needs a decoder; allowed: {model_id, subfolder, revision} of a diffusers "
                "AutoencoderKL or VQModel",
            )
        return self


class RayExecutorParams(Params):
    """Where and how wide Ray renders: ``address`` null starts a Ray on this machine, ``auto``
    joins the cluster this machine belongs to, ``ray://<head>:10001`` a remote one. Each actor
    loads one generator (or teacher, for inversion) and renders whole batches."""

    address: str | None = None
    num_actors: PositiveInt = 1
    # null: one GPU per actor when the Ray cluster has GPUs, none otherwise.
    num_gpus_per_actor: float | None = Field(default=None, ge=0.0)
    num_cpus_per_actor: float = Field(default=1.0, gt=0.0)


class ImageSynthesisParams(Params):
    """``diffusion`` samples a diffusers text-to-image ``generator``; ``inversion`` optimises
    each image against the teacher and needs no generator. ``num_shards``/``shard_index``
    make a run render only its share of the images (see docs/scaling.md); ``executor``
    ``ray`` renders on Ray actors instead of in this process."""

    section: ClassVar[str] = "image_synthesis"

    backend: Literal["diffusion", "inversion"] = "diffusion"
    generator: GeneratorParams | None = None
    inversion: InversionParams = InversionParams()
    batch_size: PositiveInt = 4
    sample_grid_columns: PositiveInt = 8
    num_shards: PositiveInt = 1
    shard_index: NonNegativeInt = 0
    executor: Literal["local", "ray"] = "local"
    ray: RayExecutorParams = RayExecutorParams()

    @model_validator(mode="after")
    def _shard_index_in_range(self) -> ImageSynthesisParams:
        if self.shard_index >= self.num_shards:
            raise bad_value(
                "shard_index",
                self.shard_index,
                f"outside [0, {self.num_shards}) for num_shards={self.num_shards}; allowed: 0..{self.num_shards - 1}",
            )
        return self

    @model_validator(mode="after")
    def _diffusion_needs_a_generator(self) -> ImageSynthesisParams:
        if self.backend == "diffusion" and self.generator is None:
            raise bad_value(
                "generator", None, "backend diffusion needs a generator; allowed: {model_id, ...} or backend inversion"
            )
        return self
