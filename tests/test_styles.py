"""Pseudo-words: splicing, Mix-, Random- and Contrastive-Prompt, and the diversity metric."""

from __future__ import annotations

import pytest
import torch

from clip_dfkd.params import ContrastivePromptParams, MixPromptParams
from clip_dfkd.styles import (
    StyleBank,
    contrastive_prompt_bank,
    mean_pairwise_cosine_distance,
    mix_prompt_bank,
    mix_style_vector,
    random_prompt_bank,
    style_diversity_loss,
    token_embedding_statistics,
)

FAMILIES = ["diffusers", "open_clip"]
CLASSES = ["ball", "box", "tent"]
STYLES = ["sketch", "watercolor", "photo", "cartoon"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("word", ["watercolor", "sketch"])
def test_splicing_a_real_words_embedding_equals_encoding_the_word(tiny_text_encoders, family, word) -> None:
    encoder = tiny_text_encoders[family]
    texts = [f"a {word} style of a dog", "a photo of a tent", f"{word}, a bright {word} style of a box"]
    spliced = ["a [S*] style of a dog", "a photo of a tent", f"{word}, a bright [S*] style of a box"]
    vectors = torch.stack([encoder.word_embedding(word)] * 2)

    with torch.no_grad():
        expected = encoder.encode(texts)
        actual = encoder.encode(spliced, vectors)

    assert (actual - expected).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_splicing_changes_only_prompts_with_a_placeholder_and_counts_them(tiny_text_encoders, family) -> None:
    encoder = tiny_text_encoders[family]
    with torch.no_grad():
        plain = encoder.encode(["a photo of a dog"])
        noise = encoder.encode(["a [S*] of a dog"], torch.randn(1, encoder.dim))
        standard = encoder.encode(["a [S*] of a dog"], encoder.word_embedding("photo")[None])
    assert (noise - plain).abs().max() > 1e-3
    assert (standard - plain).abs().max() < 1e-5
    with pytest.raises(ValueError, match="each prompt takes exactly one"):
        encoder.encode(["a [S*] of a [S*]"], torch.randn(2, encoder.dim))


def test_pipeline_text_encoding_with_a_spliced_word_equals_the_words_prompt_embeds(demo_assets) -> None:
    """The synthesis path: diffusers' own encode_prompt, run inside the splice."""
    from diffusers import StableDiffusionPipeline

    from clip_dfkd.models.text_encoders import HFCLIPTextEncoder

    pipeline = StableDiffusionPipeline.from_pretrained(demo_assets.generator_dir)
    encoder = HFCLIPTextEncoder(pipeline.text_encoder, pipeline.tokenizer, "demo")
    with torch.no_grad(), encoder.splice(encoder.word_embedding("sketch")[None]):
        spliced, negative = pipeline.encode_prompt(
            encoder.stand_in(["a [S*] of a tent"]), "cpu", 1, True, negative_prompt=["blurry"]
        )
    with torch.no_grad():
        expected, expected_negative = pipeline.encode_prompt(["a sketch of a tent"], "cpu", 1, True, ["blurry"])
    assert (spliced - expected).abs().max() < 1e-5
    assert torch.equal(negative, expected_negative)


def test_mix_with_one_hot_weights_is_the_style_word(tiny_text_encoders) -> None:
    encoder = tiny_text_encoders["diffusers"]
    words = torch.stack([encoder.word_embedding(w) for w in STYLES])
    for index in range(len(STYLES)):
        one_hot = torch.nn.functional.one_hot(torch.tensor(index), len(STYLES)).float()
        assert torch.equal(mix_style_vector(words, one_hot), words[index])


def test_mix_bank_draws_convex_combinations_of_k_distinct_style_words(tiny_text_encoders) -> None:
    encoder = tiny_text_encoders["diffusers"]
    bank = mix_prompt_bank(encoder, STYLES, num_styles=5, params=MixPromptParams(k=3, alpha=0.5), seed=7)

    assert bank.vectors.shape == (5, encoder.dim)
    for vector, mix in zip(bank.vectors, bank.details["mixes"], strict=True):
        assert len(set(mix["words"])) == 3 and set(mix["words"]) <= set(STYLES)
        weights = torch.tensor(mix["weights"])
        assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
        words = torch.stack([encoder.word_embedding(w) for w in mix["words"]])
        assert torch.allclose(vector, weights.float() @ words, atol=1e-6)


def test_random_bank_matches_the_embedding_tables_per_dimension_statistics(tiny_text_encoders) -> None:
    encoder = tiny_text_encoders["diffusers"]
    mean, std = token_embedding_statistics(encoder)
    bank = random_prompt_bank(encoder, num_styles=20000, seed=3)

    assert torch.allclose(bank.vectors.mean(0), mean, atol=4 * float(std.max()) / 20000**0.5)
    assert torch.allclose(bank.vectors.std(0), std, rtol=0.05)
    table = encoder.token_embeddings()
    assert bank.vectors.norm(dim=1).mean() == pytest.approx(float(table.norm(dim=1).mean()), rel=0.1)


def test_contrastive_training_lowers_the_diversity_loss_and_keeps_content(tiny_text_encoders) -> None:
    encoder = tiny_text_encoders["diffusers"]
    template = "a {style} style of a {class_name}"
    params = ContrastivePromptParams(iterations=80, learning_rate=0.05)

    bank, history = contrastive_prompt_bank(encoder, CLASSES, template, num_styles=4, params=params, seed=0)

    style = [point["value"] for point in history["style_loss"]]
    accuracy = [point["value"] for point in history["content_accuracy"]]
    assert len(style) == 80
    assert style[-1] < 0.5 * style[0]
    assert accuracy[-1] >= max(accuracy[0], 0.8)
    with torch.no_grad():
        features = encoder.encode(["a [S*] style of a"] * 4, bank.vectors)
    assert float(style_diversity_loss(features)) == pytest.approx(style[-1], abs=0.05)


@pytest.mark.parametrize("method", ["mix", "random", "contrastive"])
def test_banks_are_reproducible_from_their_seed(tiny_text_encoders, method) -> None:
    encoder = tiny_text_encoders["diffusers"]

    def build(seed: int) -> StyleBank:
        if method == "mix":
            return mix_prompt_bank(encoder, STYLES, 3, MixPromptParams(k=2), seed)
        if method == "random":
            return random_prompt_bank(encoder, 3, seed)
        return contrastive_prompt_bank(
            encoder, CLASSES, "a {style} of a {class_name}", 3, ContrastivePromptParams(iterations=5), seed
        )[0]

    first, again, other = build(0), build(0), build(1)
    assert torch.equal(first.vectors, again.vectors) and first.names == again.names
    assert not torch.equal(first.vectors, other.vectors)
    assert first.names[0].startswith(f"{method}-000-")


def test_bank_round_trips_through_its_file(tiny_text_encoders, tmp_path) -> None:
    bank = mix_prompt_bank(tiny_text_encoders["diffusers"], STYLES, 2, MixPromptParams(k=2), 0)
    bank.save(tmp_path / "bank.safetensors")
    loaded = StyleBank.load(tmp_path / "bank.safetensors")

    assert torch.equal(loaded.vectors, bank.vectors)
    assert (loaded.names, loaded.method, loaded.details) == (bank.names, "mix", bank.details)
    assert torch.equal(loaded.lookup([bank.names[1]])[0], bank.vectors[1])


def test_diversity_grows_as_features_spread_apart() -> None:
    assert mean_pairwise_cosine_distance(torch.ones(4, 2)) == pytest.approx(0.0, abs=1e-6)  # all alike
    assert mean_pairwise_cosine_distance(torch.eye(3)) == pytest.approx(1.0)  # orthogonal
    assert mean_pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)  # opposite
