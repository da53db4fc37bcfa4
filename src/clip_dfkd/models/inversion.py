"""Teacher-guided inversion: images that a CLIP image encoder sees as given text embeddings.

The VQGAN-CLIP recipe (Crowson et al., 2022), which Xuan et al. use to synthesise their
surrogate images: an image is a parameterised tensor; each step takes K random augmented
cut-outs of it, embeds them with the teacher and lowers the spherical distance
``2·arcsin(‖a−b‖/2)²`` between each cut-out's unit embedding and the prompt's, averaged over
cut-outs (plus an optional total-variation term), with Adam.

Every row of a batch has its own ``torch.Generator`` seeded from the row: its starting point
and all of its cut-outs come from it, and the loss is summed (not averaged) over rows, so a
row's result does not depend on its batch mates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clip_dfkd.errors import UserError
from clip_dfkd.params import InversionParams

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]

# Colour correlation of natural images (square root of the RGB covariance, as used in
# feature-visualisation work, Olah et al., 2017): the Fourier image is optimised in a
# decorrelated colour space and mapped back with it.
_COLOUR_CORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOUR_CORRELATION = _COLOUR_CORRELATION / _COLOUR_CORRELATION.norm(dim=0).max()


class PixelImage(nn.Module):
    """RGB values through a sigmoid, on a ``grid`` × ``grid`` grid upsampled to ``size``
    (``grid`` None: one value per output pixel). A coarse grid is a smoothness prior."""

    def __init__(self, generators: Sequence[torch.Generator], size: int, grid: int | None):
        super().__init__()
        side = grid or size
        self.size = size
        self.logits = nn.Parameter(torch.stack([torch.randn(3, side, side, generator=g) * 0.1 for g in generators]))

    def forward(self) -> torch.Tensor:
        upsampled = F.interpolate(self.logits, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return torch.sigmoid(upsampled)


class FourierImage(nn.Module):
    """A decorrelated Fourier parameterisation: spectrum coefficients scaled by 1/frequency,
    so that gradient steps favour low frequencies, in a decorrelated colour space."""

    def __init__(self, generators: Sequence[torch.Generator], size: int, decay: float = 1.0):
        super().__init__()
        self.size = size
        frequencies = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2)
        self.register_buffer("scale", 1.0 / torch.clamp(frequencies, min=1.0 / size) ** decay)
        shape = (3, size, size // 2 + 1, 2)
        self.spectrum = nn.Parameter(torch.stack([torch.randn(*shape, generator=g) * 0.01 for g in generators]))

    def forward(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        decorrelated = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")
        colours = torch.einsum("bchw,dc->bdhw", decorrelated, _COLOUR_CORRELATION.to(decorrelated))
        return torch.sigmoid(colours)


class LatentImage(nn.Module):
    """The latent of a frozen diffusers decoder (``AutoencoderKL`` or ``VQModel``): the decoder
    is the image prior."""

    def __init__(self, generators: Sequence[torch.Generator], decoder: nn.Module, size: int):
        super().__init__()
        config = decoder.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        if size % factor:
            raise UserError(
                f"image_synthesis.inversion.image_size={size}: must be a multiple of {factor} for its decoder"
            )
        self.decoder = decoder.requires_grad_(False).eval()
        self.scaling = getattr(config, "scaling_factor", 1.0) or 1.0
        shape = (config.latent_channels, size // factor, size // factor)
        self.latent = nn.Parameter(torch.stack([torch.randn(*shape, generator=g) for g in generators]))

    def forward(self) -> torch.Tensor:
        decoded = self.decoder.decode(self.latent / self.scaling).sample
        return ((decoded.float() + 1) / 2).clamp(0, 1)


@dataclass
class InversionResult:
    images: torch.Tensor  # (batch, height, width, 3) uint8 on the CPU
    losses: torch.Tensor  # (batch,) each row's loss at the last iteration
    # Each row's loss every ``log_every`` iterations and at the last: (logged, batch).
    logged_iterations: list[int] = field(default_factory=list)
    loss_history: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2·arcsin(‖a−b‖/2)²`` of unit vectors: the squared great-circle distance (halved)."""
    return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels, per image."""
    dx = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    dy = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return dx + dy


def cutout_transforms(
    generators: Sequence[torch.Generator], count: int, scale: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops (and flips) as affine matrices ``(rows · count, 2, 3)`` for ``grid_sample``,
    and random brightness/contrast ``(rows · count, 2)``; row ``i``'s from ``generators[i]``."""
    thetas, jitters = [], []
    for generator in generators:
        area = torch.empty(count).uniform_(*scale, generator=generator)
        side = area.sqrt()
        shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]
        flip = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(count, 2, 3)
        theta[:, 0, 0] = side * flip
        theta[:, 1, 1] = side
        theta[:, :, 2] = shift
        thetas.append(theta)
        jitters.append(torch.rand(count, 2, generator=generator) * 2 - 1)
    return torch.cat(thetas), torch.cat(jitters)


class CutoutDraws:
    """Each iteration's cut-out transforms (:func:`cutout_transforms`), on ``device``.

    When nothing else draws from the rows' generators during the inversion (on an accelerator,
    whose noise comes from generators of its own, or without noise), every iteration's are
    drawn at the start, in the order drawing them one iteration at a time would take, and
    copied to the device once: no copy, and so no wait for the device, inside the loop. On the
    CPU with noise, the noise of an iteration is drawn from the same generators after its
    cut-outs, so they are drawn one iteration at a time, as before."""

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        count: int,
        scale: tuple[float, float],
        iterations: int,
        device: torch.device,
        ahead: bool,
    ):
        self._draw = lambda: cutout_transforms(generators, count, scale)
        self._device = device
        self._ahead: tuple[torch.Tensor, torch.Tensor] | None = None
        if ahead:
            thetas, jitters = zip(*(self._draw() for _ in range(iterations)), strict=True)
            self._ahead = tuple(self._to_device(torch.stack(drawn)) for drawn in (thetas, jitters))

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self._device, non_blocking=True)

    def __call__(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ahead is not None:
            thetas, jitters = self._ahead
            return thetas[iteration], jitters[iteration]
        thetas, jitter = self._draw()
        return thetas.to(self._device), jitter.to(self._device)


def invert(
    encode_image: ImageEncoder,
    text_embeddings: torch.Tensor,
    parameterization: nn.Module,
    generators: Sequence[torch.Generator],
    params: InversionParams,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    progress: Callable[[int], None] | None = None,
) -> InversionResult:
    """Optimise ``parameterization`` (one image per row) until ``encode_image`` of its cut-outs
    matches each row's ``text_embeddings``.

    ``encode_image`` takes normalised pixels ``(n, 3, input_size, input_size)`` and returns
    embeddings; ``mean``/``std`` are the encoder's normalisation. ``progress`` is called with
    the number of iterations done after each one.
    """
    device = text_embeddings.device
    parameterization = parameterization.to(device)
    targets = F.normalize(text_embeddings.float(), dim=-1)
    rows, count = len(generators), params.cutouts
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    trainable = [p for p in parameterization.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=params.learning_rate)
    # Cut-out noise is most of the random numbers drawn (rows x cutouts x 3 x 224 x 224 per
    # iteration, 294 MB for 16 x 32): on an accelerator it is drawn there, by per-row
    # generators seeded like the rows', instead of on the CPU and copied over every step.
    noise_generators = (
        generators
        if device.type == "cpu"
        else [torch.Generator(device).manual_seed(g.initial_seed()) for g in generators]
    )
    shares_generators = params.noise > 0 and noise_generators is generators
    cutouts_of = CutoutDraws(
        generators, count, params.cutout_scale, params.iterations, device, ahead=not shares_generators
    )
    logged_iterations: list[int] = []
    history: list[torch.Tensor] = []
    per_row = torch.zeros(rows, device=device)
    for iteration in range(params.iterations):
        images = parameterization()
        thetas, jitter = cutouts_of(iteration)
        grid = F.affine_grid(thetas, [rows * count, 3, input_size, input_size], align_corners=False)
        cutouts = F.grid_sample(images.repeat_interleave(count, dim=0), grid, align_corners=False)
        brightness, contrast = (params.color_jitter * jitter).unbind(dim=1)
        centre = cutouts.mean(dim=(1, 2, 3), keepdim=True)
        cutouts = (cutouts - centre) * (1 + contrast.view(-1, 1, 1, 1)) + centre + brightness.view(-1, 1, 1, 1)
        if params.noise > 0:
            noise = torch.cat(
                [torch.randn(count, 3, input_size, input_size, generator=g, device=device) for g in noise_generators]
            )
            cutouts = cutouts + params.noise * noise
        embeddings = F.normalize(encode_image((cutouts - mean_t) / std_t).float(), dim=-1)
        distances = spherical_distance(embeddings, targets.repeat_interleave(count, dim=0)).view(rows, count)
        losses = distances.mean(dim=1)
        if params.tv_weight > 0:
            losses = losses + params.tv_weight * total_variation(images)
        optimizer.zero_grad(set_to_none=True)
        # Summed over rows: each row's gradient is its own loss's, whatever the batch.
        losses.sum().backward()
        optimizer.step()
        per_row = losses.detach().float()  # read back once, at the end: no sync per step
        if iteration % params.log_every == 0 or iteration == params.iterations - 1:
            logged_iterations.append(iteration)
            history.append(per_row)
        if progress is not None:
            progress(iteration + 1)
    with torch.no_grad():
        final = parameterization().float().clamp(0, 1)
    pixels = (final * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return InversionResult(pixels, per_row.cpu(), logged_iterations, torch.stack(history).cpu())


def start_images(
    params: InversionParams, seeds: Sequence[int], decoder: nn.Module | None = None
) -> tuple[nn.Module, list[torch.Generator]]:
    """The parameterisation of ``params`` for one image per seed, and the rows' generators
    (seeded from the rows, used for their start and then for their cut-outs)."""
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    if params.parameterization == "pixels":
        return PixelImage(generators, params.image_size, params.grid_size), generators
    if params.parameterization == "fourier":
        return FourierImage(generators, params.image_size), generators
    return LatentImage(generators, decoder, params.image_size), generators
