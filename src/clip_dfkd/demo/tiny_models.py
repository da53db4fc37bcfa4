"""Tiny, seeded, randomly initialised stand-ins for the real models.

They are written to disk in the formats real weights come in (an open_clip ``.safetensors``
checkpoint, a diffusers ``save_pretrained`` folder), so that demos and tests load them through
exactly the same code as real models: ``open_clip.create_model_and_transforms(name,
pretrained=<file>)`` and ``AutoPipelineForText2Image.from_pretrained(<folder>)``.

Every writer builds its output beside the destination and renames it into place, so an
interrupted build never leaves a half-written model where a loader would pick it up.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from clip_dfkd.atomic import atomic_directory, atomic_file
from clip_dfkd.models.model_configs import building_without_weights, register_project_model_configs

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

TINY_CLIP_MODEL_NAME = "clip-dfkd-tiny"

# OpenAI CLIP's BPE: 256 bytes x 2 (with and without "</w>") + merges + 2 specials = 49408,
# the vocab_size every CLIP text tower (open_clip and Stable Diffusion 1.x) is built for.
_CLIP_NUM_MERGES = 49152 - 256 - 2
_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_CONTEXT_LENGTH = 77

_TINY_SD_IMAGE_SIZE = 32
# Two VAE blocks halve the image once: 32x32 pixels <-> 16x16 latents.
_TINY_SD_LATENT_SIZE = _TINY_SD_IMAGE_SIZE // 2
_TINY_SD_TEXT_WIDTH = 32

# Stable Diffusion 1.x's noise schedule (runwayml/stable-diffusion-v1-5 scheduler_config.json),
# so schedulers swapped in with ``from_config`` behave as they would on the real model.
SD1_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def build_tiny_clip(checkpoint_path: Path, seed: int = 0) -> Path:
    """Write a randomly initialised ``clip-dfkd-tiny`` open_clip checkpoint.

    The file holds the whole model's state dict (``logit_scale`` included) and loads with
    ``open_clip.create_model_and_transforms("clip-dfkd-tiny", pretrained=str(checkpoint_path))``.
    The same ``seed`` always gives a byte-identical file.

    Args:
        checkpoint_path: Destination; must end in ``.safetensors`` because open_clip picks its
            reader from the suffix.
        seed: Seed of the random initialisation.

    Returns:
        ``checkpoint_path``.
    """
    import open_clip

    register_project_model_configs()
    with _seeded(seed), building_without_weights():
        model = open_clip.create_model(TINY_CLIP_MODEL_NAME)
    return save_clip_checkpoint(model, checkpoint_path)


def train_tiny_clip(
    images: torch.Tensor,
    captions: list[str],
    positives: torch.Tensor,
    seed: int,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
) -> torch.nn.Module:
    """Train ``clip-dfkd-tiny`` (both towers, from its ``seed`` initialisation); save it with
    :func:`save_clip_checkpoint`.

    The loss is contrastive with several positives: each image's logits over all
    ``captions`` are pulled towards a uniform distribution over its positive captions
    (``positives[i, j]`` true when caption ``j`` describes image ``i``), as a world with few
    distinct captions has many images per caption. Photometric augmentations (brightness,
    colour-channel order, colour inversion, horizontal flips) keep the image tower from
    keying on colours, so that it recognises shapes in styles it was not trained on.

    Args:
        images: ``(n, 3, size, size)`` RGB values in [0, 1], at the model's input size.
        captions: Every caption of the world.
        positives: ``(n, len(captions))`` booleans.
        seed: Seed of the initialisation, the batches and the augmentations.
        steps: Optimiser steps (AdamW, one-cycle learning-rate schedule).
        batch_size: Images per step.
        learning_rate: Peak learning rate.

    Returns:
        The trained model, in eval mode.
    """
    import open_clip
    import torch.nn.functional as F

    from clip_dfkd.progress import ProgressBar

    register_project_model_configs()
    with _seeded(seed), building_without_weights():
        model = open_clip.create_model(TINY_CLIP_MODEL_NAME)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    tokens = open_clip.get_tokenizer(TINY_CLIP_MODEL_NAME)(captions)
    targets = positives.float() / positives.float().sum(dim=1, keepdim=True)
    # fused: one kernel for all parameters, several times faster on CPU for the large token table.
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05, fused=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with ProgressBar(steps, "Training the demo teacher", unit="step") as progress:
        for _ in range(steps):
            batch = torch.randint(len(images), (batch_size,), generator=generator)
            pixels = _augment(images[batch], generator)
            image_features = F.normalize(model.encode_image((pixels - mean) / std), dim=-1)
            text_features = F.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.T
            loss = -(targets[batch] * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
            progress.update(1)
    return model.eval()


def save_clip_checkpoint(model: torch.nn.Module, checkpoint_path: Path) -> Path:
    """Write an open_clip model's whole state dict (``logit_scale`` included) as the
    ``.safetensors`` file ``open_clip.create_model_and_transforms(name, pretrained=<file>)``
    loads; the same weights always give a byte-identical file."""
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.suffix != ".safetensors":
        raise ValueError(
            f"checkpoint_path={str(checkpoint_path)!r}: must end in .safetensors "
            "(open_clip reads any other suffix with torch.load)"
        )
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_file(checkpoint_path) as staging:
        # One metadata key only: safetensors writes metadata in hash-map order, so more keys
        # would make files of the same seed differ byte for byte.
        save_file(tensors, staging, metadata={"format": "pt"})
    return checkpoint_path


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    count = len(pixels)
    brightness = torch.empty(count, 1, 1, 1).uniform_(0.3, 1.2, generator=generator)
    channel_orders = torch.stack([torch.randperm(3, generator=generator) for _ in range(count)])
    pixels = torch.gather(pixels, 1, channel_orders[:, :, None, None].expand_as(pixels))
    pixels = (pixels * brightness).clamp(0, 1)
    inverted = torch.rand(count, generator=generator) < 0.3
    pixels = torch.where(inverted[:, None, None, None], 1 - pixels, pixels)
    flipped = torch.rand(count, generator=generator) < 0.5
    return torch.where(flipped[:, None, None, None], pixels.flip(-1), pixels)


def build_clip_tokenizer(output_dir: Path) -> Path:
    """Save OpenAI CLIP's tokenizer as a Hugging Face ``CLIPTokenizer`` folder.

    Built from the BPE vocabulary that ships with open_clip, so it needs no download and gives
    the same token ids as ``open_clip.get_tokenizer("ViT-B-32")`` (without the zero padding).
    Pads with ``<|endoftext|>`` to 77 tokens, like Stable Diffusion 1.x's tokenizer.

    Args:
        output_dir: Destination folder; replaced if it exists.

    Returns:
        ``output_dir``, loadable with ``transformers.CLIPTokenizer.from_pretrained``.
    """
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as staging:
        _write_clip_tokenizer(staging)
    return output_dir


def build_tiny_stable_diffusion(output_dir: Path, seed: int = 0) -> Path:
    """Save a randomly initialised Stable Diffusion 1.x-shaped pipeline that makes 32x32 images.

    UNet, VAE and CLIP text encoder are tiny but wired like SD 1.x (4 latent channels, 49408-token
    CLIP vocabulary, 77-token context, SD 1.x noise schedule); there is no safety checker.
    The same ``seed`` always gives the same weights.

    Args:
        output_dir: Destination folder; replaced if it exists.
        seed: Seed of the random initialisation.

    Returns:
        ``output_dir``, loadable with ``StableDiffusionPipeline.from_pretrained`` and
        ``AutoPipelineForText2Image.from_pretrained``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as staging:
        # The pipeline's save_pretrained rewrites this folder with the same files; writing it
        # first also keeps vocab.json and merges.txt.
        tokenizer = _write_clip_tokenizer(staging / "tokenizer")
        # Reseeding per component keeps each one's weights independent of the others' sizes.
        with _seeded(seed):
            unet = UNet2DConditionModel(
                sample_size=_TINY_SD_LATENT_SIZE,
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=_TINY_SD_TEXT_WIDTH,
                attention_head_dim=8,
            )
        with _seeded(seed):
            vae = AutoencoderKL(
                sample_size=_TINY_SD_IMAGE_SIZE,
                in_channels=3,
                out_channels=3,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                latent_channels=4,
            )
        with _seeded(seed):
            text_encoder = sd1_text_encoder(
                tokenizer,
                hidden_size=_TINY_SD_TEXT_WIDTH,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
            )
        sd1_pipeline(unet, vae, text_encoder, tokenizer).save_pretrained(staging, safe_serialization=True)
    return output_dir


def sd1_text_encoder(tokenizer: CLIPTokenizer, **sizes: Any) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder of ``sizes`` (``CLIPTextConfig`` fields) for
    ``tokenizer``'s vocabulary and SD 1.x's 77-token context."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=_CLIP_CONTEXT_LENGTH,
        projection_dim=sizes["hidden_size"],
        # CLIPTextModel pools the prompt embedding at the first eos_token_id.
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sizes,
    )
    return CLIPTextModel(config)


def sd1_pipeline(unet, vae, text_encoder, tokenizer) -> StableDiffusionPipeline:
    """SD 1.x components as a pipeline with SD 1.x's noise schedule and no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD1_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _write_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """Write vocab.json and merges.txt the way OpenAI's SimpleTokenizer orders its encoder,
    plus transformers' own files (tokenizer.json, tokenizer_config.json); return the tokenizer."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as bpe:
        # Line 0 of the file is a header, not a merge.
        merges = bpe.read().split("\n")[1 : _CLIP_NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = [
        *byte_chars,
        *(char + "</w>" for char in byte_chars),
        *("".join(merge.split()) for merge in merges),
        _CLIP_BOS,
        _CLIP_EOS,
    ]
    vocab = {token: index for index, token in enumerate(tokens)}
    # Built in memory rather than with from_pretrained, which would record loader arguments
    # (is_local, local_files_only) in the saved tokenizer_config.json.
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(merge.split()) for merge in merges],
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        unk_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,
        model_max_length=_CLIP_CONTEXT_LENGTH,
    )
    tokenizer.save_pretrained(directory)
    # transformers 5 saves only tokenizer.json; these let older readers load the folder too.
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return tokenizer


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, restoring the caller's random state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
