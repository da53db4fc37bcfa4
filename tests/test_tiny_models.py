"""Tiny demo models: they load through the same calls as real models and are reproducible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clip_dfkd.demo import tiny_models as tiny
from clip_dfkd.demo.tiny_models import (
    TINY_CLIP_MODEL_NAME,
    build_clip_tokenizer,
    build_tiny_clip,
    build_tiny_stable_diffusion,
)
from clip_dfkd.models.model_configs import CONFIG_DIR, register_project_model_configs

TEXTS = [
    "a photo of a dog",
    "a sketch style of a giraffe.",
    "Hello, World! 123 naïve café",
    "  A PHOTO\tof a\n\nCAT  ",
    "it's a 3d render of an airplane, isn't it?",
]


def _safetensors_under(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file below ``root``, keyed by file and tensor name."""
    tensors = {}
    for path in sorted(root.rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            tensors[f"{path.relative_to(root)}:{name}"] = tensor
    return tensors


def _assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0)


def test_project_configs_register_tiny_clip_once() -> None:
    register_project_model_configs()
    register_project_model_configs()

    assert TINY_CLIP_MODEL_NAME in open_clip.list_models()
    assert open_clip.list_models().count(TINY_CLIP_MODEL_NAME) == 1
    expected = json.loads((CONFIG_DIR / f"{TINY_CLIP_MODEL_NAME}.json").read_text())
    assert open_clip.get_model_config(TINY_CLIP_MODEL_NAME) == expected
    assert expected["embed_dim"] == 32
    # The real open_clip tokenizer only fits a text tower with its vocabulary; 16 tokens hold
    # every caption and prompt of the demo's world and keep training the teacher fast.
    assert expected["text_cfg"]["vocab_size"] == 49408
    assert expected["text_cfg"]["context_length"] == 16


def test_clip_tokenizer_gives_open_clip_token_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPTokenizer

    output_dir = build_clip_tokenizer(tmp_path / "tokenizer")

    assert output_dir == tmp_path / "tokenizer"
    assert (output_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert len(json.loads((output_dir / "vocab.json").read_text(encoding="utf-8"))) == 49408
    tokenizer = CLIPTokenizer.from_pretrained(output_dir)
    reference = open_clip.get_tokenizer("ViT-B-32")
    assert isinstance(reference, open_clip.tokenizer.SimpleTokenizer)
    for text in TEXTS:
        expected = [token for token in reference(text)[0].tolist() if token != 0]
        assert tokenizer(text).input_ids == expected, text

    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        49406,
        49407,
        49407,
    )
    # What Stable Diffusion pipelines ask for: fixed length, truncated, padded with eos.
    batch = tokenizer(
        ["a dog", "a photo of a dog " * 30],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
    ).input_ids
    assert batch[0] == [49406, 320, 1929, 49407] + [49407] * 73
    assert batch[1] == reference("a photo of a dog " * 30)[0].tolist()
    assert type(AutoTokenizer.from_pretrained(output_dir)) is CLIPTokenizer


def test_tiny_clip_loads_through_open_clip(tmp_path: Path) -> None:
    checkpoint = build_tiny_clip(tmp_path / "teacher" / "tiny.safetensors", seed=0)

    assert checkpoint == tmp_path / "teacher" / "tiny.safetensors"
    saved = load_file(checkpoint)
    assert saved["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_MODEL_NAME, pretrained=str(checkpoint))
    _assert_same_tensors(saved, dict(model.state_dict()))

    model.eval()
    pixels = torch.stack([preprocess(Image.new("RGB", (64, 48), colour)) for colour in ("red", "white")])
    tokens = open_clip.get_tokenizer(TINY_CLIP_MODEL_NAME)(TEXTS)
    with torch.inference_mode():
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(tokens)
    assert pixels.shape == (2, 3, 32, 32)
    assert image_features.shape == (2, 32)
    assert text_features.shape == (len(TEXTS), 32)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
    assert not torch.allclose(text_features[0], text_features[1])


def test_tiny_clip_is_reproducible_per_seed(tmp_path: Path) -> None:
    rng_state = torch.get_rng_state()

    first = build_tiny_clip(tmp_path / "a.safetensors", seed=0)
    again = build_tiny_clip(tmp_path / "b.safetensors", seed=0)
    other = build_tiny_clip(tmp_path / "c.safetensors", seed=1)

    assert first.read_bytes() == again.read_bytes()
    _assert_same_tensors(load_file(first), load_file(again))
    first_tensors, other_tensors = load_file(first), load_file(other)
    assert not torch.equal(first_tensors["visual.conv1.weight"], other_tensors["visual.conv1.weight"])
    assert not torch.equal(first_tensors["token_embedding.weight"], other_tensors["token_embedding.weight"])
    # Building must not reseed the caller's random stream.
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_tiny_clip_wants_a_safetensors_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.safetensors"):
        build_tiny_clip(tmp_path / "tiny.pt")
    assert list(tmp_path.iterdir()) == []


def test_tiny_stable_diffusion_generates_reproducible_32px_images(tiny_sd_dir: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)

    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (0.00085, 0.012)
    assert pipe.scheduler.config.num_train_timesteps == 1000
    # The pipeline's default output size comes from these.
    assert pipe.vae_scale_factor == 2
    assert pipe.vae.config.sample_size == 32
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 4
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id == 49407
    assert pipe.text_encoder.config.pad_token_id == pipe.tokenizer.pad_token_id
    reference = open_clip.get_tokenizer("ViT-B-32")
    expected = [token for token in reference(TEXTS[1])[0].tolist() if token != 0]
    assert pipe.tokenizer(TEXTS[1]).input_ids == expected

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return pipe(prompts, num_inference_steps=4, generator=generators).images

    images = generate(["a photo of a dog", "a photo of a cat"], [0, 1])
    repeat = generate(["a photo of a dog", "a photo of a cat"], [0, 1])
    assert [(image.mode, image.size) for image in images] == [("RGB", (32, 32))] * 2
    for image, same in zip(images, repeat, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(same))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))

    batch = generate(TEXTS[:4], [0, 1, 2, 3])
    assert len(batch) == 4


def test_tiny_stable_diffusion_loads_through_auto_pipeline(tiny_sd_dir: Path) -> None:
    from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline

    auto = AutoPipelineForText2Image.from_pretrained(tiny_sd_dir)
    direct = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    for pipe in (auto, direct):
        pipe.set_progress_bar_config(disable=True)

    assert type(auto) is StableDiffusionPipeline
    images = [
        pipe("a photo of a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(7)).images[0]
        for pipe in (auto, direct)
    ]
    assert images[0].size == (32, 32)
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_a_generator_that_ships_a_safety_checker_loads_without_it(tmp_path: Path, tiny_sd_dir: Path, caplog) -> None:
    import logging
    import shutil

    from clip_dfkd.models import load_text_to_image
    from clip_dfkd.params import GeneratorParams, RuntimeParams
    from clip_dfkd.runtime import Runtime

    # As Stable Diffusion 1.x repositories publish it: a safety checker in the index, whose
    # weights this copy does not even have (loading it would fail).
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "sd-with-checker")
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))

    with caplog.at_level(logging.INFO, logger="clip_dfkd.models.generator"):
        pipeline = load_text_to_image(
            GeneratorParams(model_id=str(folder)), Runtime.resolve(RuntimeParams(device="cpu"))
        )

    assert pipeline.safety_checker is None
    assert "ships a safety checker; it is not loaded" in caplog.text


def test_tiny_stable_diffusion_is_reproducible_per_seed(tmp_path: Path, tiny_sd_dir: Path) -> None:
    rng_state = torch.get_rng_state()

    again = build_tiny_stable_diffusion(tmp_path / "again", seed=0)
    other = build_tiny_stable_diffusion(tmp_path / "other", seed=1)

    _assert_same_tensors(_safetensors_under(tiny_sd_dir), _safetensors_under(again))
    seed0, seed1 = _safetensors_under(again), _safetensors_under(other)
    assert seed0.keys() == seed1.keys()
    for component in ("unet", "vae", "text_encoder"):
        names = [name for name in seed0 if name.startswith(f"{component}/")]
        assert names, component
        assert any(not torch.equal(seed0[name], seed1[name]) for name in names), component
    for name in ("model_index.json", "unet/config.json", "tokenizer/tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_sd_dir / name).read_bytes(), name
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_rebuilds_replace_partial_outputs_and_ignore_stale_temporaries(tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny.safetensors"
    checkpoint.write_bytes(b"\x00" * 10)  # a truncated earlier write
    stale_file = tmp_path / ".tiny.safetensors.0123abcd.tmp"
    stale_file.write_bytes(b"partial")
    stale_dir = tmp_path / ".tiny-sd.0123abcd.tmp"
    (stale_dir / "unet").mkdir(parents=True)
    (stale_dir / "unet" / "config.json").write_text("{")
    sd_dir = tmp_path / "tiny-sd"
    (sd_dir / "unet").mkdir(parents=True)
    (sd_dir / "unet" / "config.json").write_text("{")
    (sd_dir / "leftover.txt").write_text("from an older build")

    build_tiny_clip(checkpoint, seed=3)
    build_tiny_stable_diffusion(sd_dir, seed=3)

    open_clip.create_model_and_transforms(TINY_CLIP_MODEL_NAME, pretrained=str(checkpoint))
    assert not (sd_dir / "leftover.txt").exists()
    assert json.loads((sd_dir / "unet" / "config.json").read_text())["sample_size"] == 16
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [checkpoint.name, sd_dir.name, stale_file.name, stale_dir.name]
    )


def test_failed_builds_keep_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPTokenizer

    checkpoint = build_tiny_clip(tmp_path / "tiny.safetensors", seed=0)
    tokenizer_dir = build_clip_tokenizer(tmp_path / "tokenizer")
    checkpoint_bytes = checkpoint.read_bytes()
    tokenizer_files = {path.name: path.read_bytes() for path in tokenizer_dir.iterdir()}

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    def fail_to_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tiny, "save_file", write_half_then_fail)
    monkeypatch.setattr(CLIPTokenizer, "save_pretrained", fail_to_save)
    with pytest.raises(OSError, match="disk full"):
        build_tiny_clip(checkpoint, seed=1)
    with pytest.raises(OSError, match="disk full"):
        build_clip_tokenizer(tokenizer_dir)

    assert checkpoint.read_bytes() == checkpoint_bytes
    assert {path.name: path.read_bytes() for path in tokenizer_dir.iterdir()} == tokenizer_files
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.safetensors", "tokenizer"]


def test_the_unet_and_vae_take_the_runtimes_memory_format(tiny_sd_dir: Path) -> None:
    from clip_dfkd.models import load_text_to_image
    from clip_dfkd.params import GeneratorParams, RuntimeParams
    from clip_dfkd.runtime import Runtime

    for channels_last in (True, False):
        runtime = Runtime.resolve(RuntimeParams(device="cpu", channels_last=channels_last))
        pipeline = load_text_to_image(GeneratorParams(model_id=str(tiny_sd_dir)), runtime)
        for weight in (pipeline.unet.conv_in.weight, pipeline.vae.decoder.conv_in.weight):
            assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last, weight.shape


def test_vae_slicing_and_tiling_reach_the_vae_and_keep_the_images(tiny_sd_dir: Path) -> None:
    from clip_dfkd.models import load_text_to_image
    from clip_dfkd.params import GeneratorParams, RuntimeParams
    from clip_dfkd.runtime import Runtime

    cpu = Runtime.resolve(RuntimeParams(device="cpu"))
    plain = load_text_to_image(GeneratorParams(model_id=str(tiny_sd_dir)), cpu)
    sliced = load_text_to_image(GeneratorParams(model_id=str(tiny_sd_dir), vae_slicing=True, vae_tiling=True), cpu)

    assert (plain.vae.use_slicing, plain.vae.use_tiling) == (False, False)
    assert (sliced.vae.use_slicing, sliced.vae.use_tiling) == (True, True)
    images = [
        np.stack(
            [
                np.asarray(image, dtype=np.int16)
                for image in pipe(
                    ["a photo of a dog", "a sketch of a cat"],
                    num_inference_steps=2,
                    height=32,
                    width=32,
                    generator=[torch.Generator().manual_seed(seed) for seed in (1, 2)],
                ).images
            ]
        )
        for pipe in (plain, sliced)
    ]
    assert np.abs(images[0] - images[1]).max() <= 1  # the same images, up to rounding


def _tiny_autoencoder_tiny(folder: Path, latent_channels: int = 4) -> Path:
    """A randomly initialised AutoencoderTiny that decodes the tiny generator's 16x16 latents
    into 32x32 images (TAESD's layout, two blocks)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(16, 16),
        decoder_block_out_channels=(16, 16),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=latent_channels,
    ).save_pretrained(folder)
    return folder


def test_a_tiny_vae_decodes_in_place_of_the_pipelines_own(tiny_sd_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    from clip_dfkd.models import load_text_to_image
    from clip_dfkd.models.errors import ModelNotFoundError
    from clip_dfkd.params import GeneratorParams, ImageSynthesisParams, RuntimeParams
    from clip_dfkd.preflight import _synthesis_problem
    from clip_dfkd.runtime import Runtime

    cpu = Runtime.resolve(RuntimeParams(device="cpu"))
    params = GeneratorParams(model_id=str(tiny_sd_dir), tiny_vae=str(_tiny_autoencoder_tiny(tmp_path / "taesd")))
    pipe = load_text_to_image(params, cpu)
    seeds = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    prompts = ["a photo of a dog", "a sketch of a cat"]
    latents = pipe(prompts, num_inference_steps=2, height=32, width=32, generator=seeds, output_type="latent").images
    seeds = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    images = pipe(prompts, num_inference_steps=2, height=32, width=32, generator=seeds).images

    assert isinstance(pipe.vae, AutoencoderTiny)
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    expected = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert images[0].size == (32, 32)
    assert np.abs(np.stack([np.asarray(image, dtype=np.int16) for image in images]) - expected).max() <= 1

    # Bad settings stop in one line, before any work.
    missing = ImageSynthesisParams(generator=params.model_copy(update={"tiny_vae": str(tmp_path / "nowhere")}))
    assert _synthesis_problem(missing) == (
        f"image_synthesis.generator.tiny_vae={str(tmp_path / 'nowhere')!r}: no config.json there; allowed: null, a "
        "diffusers AutoencoderTiny folder (saved with save_pretrained) or a hub id such as madebyollin/taesd"
    )
    eight_channels = params.model_copy(update={"tiny_vae": str(_tiny_autoencoder_tiny(tmp_path / "taesd8", 8))})
    with pytest.raises(ModelNotFoundError, match=r"decodes 8-channel latents, .* UNet makes 4; allowed: a tiny VAE"):
        load_text_to_image(eight_channels, cpu)


def test_the_generators_attention_runs_through_sdpa(tiny_sd_dir: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from clip_dfkd.models import load_text_to_image
    from clip_dfkd.params import GeneratorParams, RuntimeParams
    from clip_dfkd.runtime import Runtime

    pipe = load_text_to_image(GeneratorParams(model_id=str(tiny_sd_dir)), Runtime.resolve(RuntimeParams(device="cpu")))

    # torch's scaled_dot_product_attention (flash / memory-efficient kernels on a GPU).
    processors = {**pipe.unet.attn_processors, **pipe.vae.attn_processors}
    assert processors and all(isinstance(processor, AttnProcessor2_0) for processor in processors.values())
    assert pipe.text_encoder.config._attn_implementation == "sdpa"
