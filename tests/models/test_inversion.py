"""Teacher-guided inversion on the demo's tiny teacher: the loss falls for every
parameterisation, pixels stay in range, and each row depends on its own seed only."""

from __future__ import annotations

import pytest
import torch

from clip_dfkd.models import load_teacher
from clip_dfkd.models.inversion import CutoutDraws, cutout_transforms, invert, spherical_distance, start_images
from clip_dfkd.models.text_encoders import OpenClipTextEncoder
from clip_dfkd.params import InversionDecoderParams, InversionParams, RuntimeParams, TeacherParams
from clip_dfkd.runtime import Runtime

CPU = Runtime.resolve(RuntimeParams(device="cpu"))


@pytest.fixture(scope="module")
def teacher(demo_assets):
    params = TeacherParams(
        model_name="clip-dfkd-tiny", pretrained=demo_assets.teacher_checkpoint, templates=["{class_name}"]
    )
    return load_teacher(params, CPU)


@pytest.fixture(scope="module")
def vae(demo_assets):
    from clip_dfkd.models.generator import load_latent_decoder

    return load_latent_decoder(InversionDecoderParams(model_id=demo_assets.generator_dir, subfolder="vae"), CPU)


def _invert(teacher, prompts, seeds, latent_decoder=None, vectors=None, **overrides):
    params = InversionParams(**{"image_size": 32, "iterations": 40, "cutouts": 8, **overrides})
    encoder = OpenClipTextEncoder(teacher.model, teacher.tokenizer, teacher.name)
    with torch.no_grad():
        text = encoder.encode(prompts, vectors)
    start, generators = start_images(params, seeds, latent_decoder)
    visual = teacher.model.visual
    return invert(
        teacher.model.encode_image,
        text,
        start,
        generators,
        params,
        input_size=32,
        mean=visual.preprocess_cfg["mean"],
        std=visual.preprocess_cfg["std"],
    )


def test_spherical_distance_is_zero_for_equal_and_grows_with_the_angle() -> None:
    a = torch.tensor([[1.0, 0.0]])
    assert spherical_distance(a, a).item() == 0
    right_angle = spherical_distance(a, torch.tensor([[0.0, 1.0]])).item()
    opposite = spherical_distance(a, torch.tensor([[-1.0, 0.0]])).item()
    assert right_angle == pytest.approx(2 * (torch.pi / 4) ** 2)
    assert opposite == pytest.approx(2 * (torch.pi / 2) ** 2)


@pytest.mark.parametrize(
    ("parameterization", "overrides"),
    [("pixels", {"grid_size": 8}), ("pixels", {"grid_size": None}), ("fourier", {}), ("latent", {})],
    ids=["pixels-grid", "pixels-full", "fourier", "latent"],
)
def test_the_loss_falls_and_pixels_stay_in_range(teacher, vae, parameterization, overrides) -> None:
    decoder = vae if parameterization == "latent" else None
    if parameterization == "latent":
        overrides = {"decoder": {"model_id": "unused"}}
    result = _invert(
        teacher,
        ["a photo of a ball", "a sketch of a tent"],
        [1, 2],
        decoder,
        parameterization=parameterization,
        **overrides,
    )

    # The batch's loss falls by a tenth or more, and each row's own loss falls.
    first, last = result.loss_history[0], result.loss_history[-1]
    assert last.mean() < 0.9 * first.mean() and (last < first).all(), result.loss_history
    assert result.images.dtype == torch.uint8 and result.images.shape == (2, 32, 32, 3)
    assert torch.equal(result.losses, last)
    assert result.logged_iterations[0] == 0 and result.logged_iterations[-1] == 39
    assert result.loss_history.shape == (len(result.logged_iterations), 2)


def test_the_same_seeds_give_the_same_bytes(teacher) -> None:
    once = _invert(teacher, ["a photo of a ball"], [7])
    again = _invert(teacher, ["a photo of a ball"], [7])
    other = _invert(teacher, ["a photo of a ball"], [8])

    assert torch.equal(once.images, again.images)
    assert not torch.equal(once.images, other.images)


def test_a_rows_start_and_cutouts_come_from_its_own_seed() -> None:
    params = InversionParams(image_size=32, parameterization="fourier")
    alone, alone_generators = start_images(params, [5])
    batched, batched_generators = start_images(params, [9, 5])

    assert torch.equal(alone().detach()[0], batched().detach()[1])
    thetas_alone, jitter_alone = cutout_transforms(alone_generators, 4, (0.25, 1.0))
    thetas_batched, jitter_batched = cutout_transforms(batched_generators, 4, (0.25, 1.0))
    assert torch.equal(thetas_alone, thetas_batched[4:])
    assert torch.equal(jitter_alone, jitter_batched[4:])


def test_cutouts_drawn_ahead_are_the_ones_drawn_one_iteration_at_a_time() -> None:
    """Drawn at the start (an accelerator: nothing copied inside the loop) or per iteration (the
    CPU with noise, which draws from the same generators): the same transforms, in order."""
    seeds, cpu = [3, 8], torch.device("cpu")
    ahead = CutoutDraws([torch.Generator().manual_seed(s) for s in seeds], 4, (0.25, 1.0), 5, cpu, ahead=True)
    stepwise = CutoutDraws([torch.Generator().manual_seed(s) for s in seeds], 4, (0.25, 1.0), 5, cpu, ahead=False)

    for iteration in range(5):
        for drawn_ahead, drawn_then in zip(ahead(iteration), stepwise(iteration), strict=True):
            assert torch.equal(drawn_ahead, drawn_then), iteration


def test_inversion_without_noise_draws_ahead_and_gives_the_same_image(teacher, monkeypatch) -> None:
    """Without noise the cut-outs are drawn ahead even on the CPU; the image is the one drawing
    them per iteration gives."""
    from clip_dfkd.models import inversion

    original = inversion.CutoutDraws

    def image(ahead_allowed: bool) -> torch.Tensor:
        def draws(*args, ahead, **kwargs):
            assert ahead, "without noise the cut-outs are drawn ahead"
            return original(*args, ahead=ahead and ahead_allowed, **kwargs)

        monkeypatch.setattr(inversion, "CutoutDraws", draws)
        return _invert(teacher, ["a photo of a ball", "a sketch of a tent"], [11, 12], iterations=6, noise=0.0).images

    assert torch.equal(image(ahead_allowed=True), image(ahead_allowed=False))


def test_a_pseudo_word_equal_to_a_words_embedding_inverts_like_the_word(teacher) -> None:
    encoder = OpenClipTextEncoder(teacher.model, teacher.tokenizer, teacher.name)
    word = _invert(teacher, ["a watercolor style of a ball"], [3])
    spliced = _invert(
        teacher, ["a [S*] style of a ball"], [3], vectors=encoder.word_embedding("watercolor").unsqueeze(0)
    )

    assert torch.equal(word.images, spliced.images)
