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
    real_word_rows,
    style_diversity_loss,
)

FAMILIES = ["diffusers", "open_clip"]
CLASSES = ["ball", "box", "tent"]
STYLES = ["sketch", "watercolor", "photo", "cartoon"]
# The demo teacher's caption words: the only rows of its token table that its training moved
# (the other ~49k keep their initial, shorter, values).
TEACHER_WORDS = ["photo", "sketch", "cartoon", "ball", "box", "tent", "kite"]


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


def test_mix_defaults_make_peaked_mixes_of_several_words_that_reach_the_whole_dictionary(
    tiny_text_encoders,
) -> None:
    dictionary = [f"style{i}" for i in range(12)]
    params = MixPromptParams()
    bank = mix_prompt_bank(tiny_text_encoders["diffusers"], dictionary, num_styles=300, params=params, seed=0)

    mixes = bank.details["mixes"]
    largest = torch.tensor([max(mix["weights"]) for mix in mixes])
    second = torch.tensor([sorted(mix["weights"])[-2] for mix in mixes])
    dominant = {mix["words"][mix["weights"].index(max(mix["weights"]))] for mix in mixes}
    assert all(len(mix["words"]) >= 4 for mix in mixes)  # each draws on several words,
    assert 0.6 <= float(largest.mean()) <= 0.85  # mostly one of them (an even mix of 4: 0.52),
    assert float((second > 0.1).float().mean()) >= 0.6  # often with a second, not a pure word,
    assert dominant == set(dictionary)  # and every word leads some mix


def test_real_word_rows_are_the_distinct_tokens_of_the_words(tiny_text_encoders) -> None:
    encoder = tiny_text_encoders["open_clip"]
    rows = real_word_rows(encoder, ["photo", "pencil drawing", "photo"]).rows

    tokens = [*encoder.word_token_ids("photo"), *encoder.word_token_ids("pencil drawing")]
    assert len(tokens) == 3 and len(rows) == 3
    assert torch.equal(rows, encoder.token_embeddings()[torch.tensor(sorted(tokens))])
    with pytest.raises(ValueError, match="1 distinct token"):
        real_word_rows(encoder, ["photo", "photo"])


def test_random_bank_draws_from_the_real_words_gaussian(tiny_text_encoders) -> None:
    encoder = tiny_text_encoders["open_clip"]
    real_words = real_word_rows(encoder, TEACHER_WORDS)
    bank = random_prompt_bank(encoder, real_words, num_styles=20000, seed=3)

    rows = real_words.rows
    spread = float(rows.std(0).max())
    assert torch.allclose(bank.vectors.mean(0), rows.mean(0), atol=4 * spread / 20000**0.5)
    assert torch.allclose(torch.cov(bank.vectors.T), torch.cov(rows.T), atol=0.05 * spread**2)
    # In the span of the real words: nothing left after projecting onto their deviations.
    basis = torch.linalg.svd(rows - rows.mean(0), full_matrices=False).Vh[: len(rows) - 1]
    offsets = bank.vectors - rows.mean(0)
    assert (offsets - offsets @ basis.T @ basis).norm(dim=1).max() < 1e-4 * rows.norm(dim=1).median()


def test_random_draws_are_as_long_as_the_real_words_in_a_teacher_that_learnt_few_rows(tiny_text_encoders) -> None:
    """The whole table's statistics, dominated by untrained rows, gave draws 0.75× as long."""
    encoder = tiny_text_encoders["open_clip"]
    real_words = real_word_rows(encoder, TEACHER_WORDS)
    bank = random_prompt_bank(encoder, real_words, num_styles=64, seed=0)

    ratios = real_words.norm_ratios(bank.vectors)
    assert 0.9 <= float(ratios.mean()) <= 1.2


def test_contrastive_vectors_stay_within_the_norm_bound(tiny_text_encoders) -> None:
    """Unbounded, the same training takes the vectors to several times a real word's norm."""
    encoder = tiny_text_encoders["open_clip"]
    real_words = real_word_rows(encoder, TEACHER_WORDS)
    params = ContrastivePromptParams(iterations=40, learning_rate=0.05, max_norm_ratio=1.5)

    bank, _ = contrastive_prompt_bank(encoder, real_words, CLASSES, "a {style} style of a {class_name}", 4, params, 0)

    ratios = real_words.norm_ratios(bank.vectors)
    assert float(ratios.max()) <= 1.5 + 1e-4
    assert float(ratios.max()) >= 1.5 - 1e-4  # the training pushed against the bound
    assert bank.details["max_norm"] == pytest.approx(1.5 * real_words.median_norm)


def test_contrastive_training_lowers_the_diversity_loss_and_keeps_content(tiny_text_encoders) -> None:
    # The teacher's text tower, which knows the classes (the random generator's cannot keep
    # them apart inside the default norm bound: 0.58 accuracy).
    encoder = tiny_text_encoders["open_clip"]
    template = "a {style} style of a {class_name}"
    params = ContrastivePromptParams(iterations=80, learning_rate=0.05)
    real_words = real_word_rows(encoder, [*STYLES, *CLASSES])

    bank, history = contrastive_prompt_bank(encoder, real_words, CLASSES, template, 4, params, seed=0)

    style = [point["value"] for point in history["style_loss"]]
    accuracy = [point["value"] for point in history["content_accuracy"]]
    assert len(style) == 80
    # Measured with the demo teacher of seed 0: 0.57 of the first value when the teacher was
    # trained on one torch thread (as under pytest-xdist on two cores), 0.14 on two threads.
    assert style[-1] < 0.7 * style[0]
    assert accuracy[-1] >= max(accuracy[0], 0.8)
    with torch.no_grad():
        features = encoder.encode(["a [S*] style of a"] * 4, bank.vectors)
    assert float(style_diversity_loss(features)) == pytest.approx(style[-1], abs=0.05)


@pytest.mark.parametrize("method", ["mix", "random", "contrastive"])
def test_banks_are_reproducible_from_their_seed(tiny_text_encoders, method) -> None:
    encoder = tiny_text_encoders["diffusers"]
    real_words = real_word_rows(encoder, [*STYLES, *CLASSES])

    def build(seed: int) -> StyleBank:
        if method == "mix":
            return mix_prompt_bank(encoder, STYLES, 3, MixPromptParams(k=2), seed)
        if method == "random":
            return random_prompt_bank(encoder, real_words, 3, seed)
        return contrastive_prompt_bank(
            encoder, real_words, CLASSES, "a {style} of a {class_name}", 3, ContrastivePromptParams(iterations=5), seed
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
