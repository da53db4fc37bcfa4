from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch

from clip_dfkd.params import ClassNames, PromptGenerationParams
from clip_dfkd.pipelines.prompt_generation.nodes import (
    encode_prompts,
    generate_prompts,
    prompt_diversity,
    style_bank_from,
)
from clip_dfkd.styles import StyleBank, StyleBankEncoderError, mean_pairwise_cosine_distance

CLASSES = ClassNames.model_validate(["ball", "box", "tent"])


def _params(**overrides) -> PromptGenerationParams:
    raw = {
        "method": "vanilla",
        "styles": ["photo", "oil painting"],
        "templates": ["a {style} of a {class_name}", "{class_name}, {style}"],
        "images_per_class_and_style": 3,
        "num_styles": 2,
    }
    return PromptGenerationParams.model_validate({**raw, **overrides})


def _vanilla_bank() -> StyleBank:
    return StyleBank("vanilla", "none", torch.zeros(0, 4))


def test_one_row_per_image_with_filled_templates() -> None:
    table = generate_prompts(ClassNames.model_validate(["dog", "hot air balloon"]), _params(), _vanilla_bank())

    assert len(table) == 2 * 2 * 3
    assert table.groupby(["class_name", "style"]).size().eq(3).all()
    first = table.iloc[0]
    assert (first.class_name, first.style, first.prompt) == ("dog", "photo", "a photo of a dog")
    assert table.iloc[1].prompt == "dog, photo"  # templates are used in turn
    assert set(table.loc[table.class_name == "hot air balloon", "class_index"]) == {1}
    assert table["prompt_id"].is_unique
    assert table.iloc[-1].prompt_id == "hot-air-balloon-oil-painting-0002"
    assert table["method"].eq("vanilla").all()
    assert table["style_vector_id"].isna().all()


def test_seeds_are_reproducible_and_do_not_shift_when_classes_are_added() -> None:
    def table(classes: list[str], **overrides) -> pd.DataFrame:
        return generate_prompts(ClassNames.model_validate(classes), _params(**overrides), _vanilla_bank())

    small, again, larger, reseeded = table(["dog"]), table(["dog"]), table(["cat", "dog"]), table(["dog"], seed=1)

    pd.testing.assert_frame_equal(small, again)
    dog_seeds = larger.loc[larger.class_name == "dog"].set_index("prompt_id")["seed"]
    assert dog_seeds.to_dict() == small.set_index("prompt_id")["seed"].to_dict()
    assert small["seed"].is_unique
    assert not set(small["seed"]) & set(reseeded["seed"])


@pytest.mark.parametrize("method", ["mix", "random", "contrastive"])
def test_pseudo_word_prompts_reference_one_bank_vector_per_style(tiny_text_encoders, method) -> None:
    params = _params(method=method, mix={"k": 2}, contrastive={"iterations": 3})
    bank, history = style_bank_from(tiny_text_encoders["diffusers"], CLASSES, params)

    table = generate_prompts(CLASSES, params, bank)

    assert len(bank.names) == 2 and bank.method == method
    assert len(table) == 3 * 2 * 3
    assert table["prompt"].iloc[0] == "a [S*] style of a ball"
    assert set(table["style_vector_id"]) == set(bank.names)
    assert table.groupby("style")["style_vector_id"].nunique().eq(1).all()  # one vector per style, all classes
    assert set(table["style"]) == {name.rsplit("-", 1)[0] for name in bank.names}
    assert any(name.startswith("contrastive/") for name in history) == (method == "contrastive")


@pytest.mark.parametrize("method", ["vanilla", "mix", "random", "contrastive"])
def test_each_banks_norm_ratio_is_a_metric_and_in_its_preview(tiny_text_encoders, tmp_path, method) -> None:
    from clip_dfkd.datasets import StyleBankDataset
    from clip_dfkd.styles import real_word_rows

    encoder = tiny_text_encoders["open_clip"]
    params = _params(method=method, mix={"k": 2}, contrastive={"iterations": 3})
    bank, metrics = style_bank_from(encoder, CLASSES, params)
    dataset = StyleBankDataset(filepath=str(tmp_path / "bank.safetensors"))
    dataset.save(bank)
    preview = json.loads(dataset.preview())

    if method == "vanilla":
        assert preview["norm_ratio"] is None and not metrics
        return
    ratios = bank.vectors.norm(dim=1) / real_word_rows(encoder, ["photo", "oil painting", *CLASSES]).median_norm
    assert metrics["style_bank/norm_ratio_mean"] == [{"value": pytest.approx(float(ratios.mean())), "step": 0}]
    assert metrics["style_bank/norm_ratio_max"] == [{"value": pytest.approx(float(ratios.max())), "step": 0}]
    assert preview["norm_ratio"]["mean"] == pytest.approx(float(ratios.mean()))
    assert preview["norm_ratio"]["per_vector"] == pytest.approx(ratios.tolist(), abs=1e-4)
    assert "norm_ratio" not in preview["details"]


def test_diversity_is_the_mean_pairwise_cosine_distance_per_class(tiny_text_encoders) -> None:
    encoder = tiny_text_encoders["diffusers"]
    params = _params(method="random", num_styles=3)
    bank, _ = style_bank_from(encoder, CLASSES, params)
    table = generate_prompts(CLASSES, params, bank)

    metrics, figure = prompt_diversity(table, bank, encoder)

    box = table[table.class_name == "box"].drop_duplicates("style")
    expected = mean_pairwise_cosine_distance(encode_prompts(box, bank, encoder))
    assert metrics["class/box"]["value"] == pytest.approx(expected, abs=1e-6)
    per_class = [metrics[f"class/{c}"]["value"] for c in CLASSES]
    assert metrics["average"]["value"] == pytest.approx(sum(per_class) / 3)
    assert len(figure.axes[0].collections) == 3 * 3  # one scatter per style and class


def test_a_saved_bank_is_reused_instead_of_trained(tiny_text_encoders, tmp_path) -> None:
    encoder = tiny_text_encoders["diffusers"]
    trained, _ = style_bank_from(encoder, CLASSES, _params(method="contrastive", contrastive={"iterations": 3}))
    trained.save(tmp_path / "bank.safetensors")

    reused, history = style_bank_from(
        encoder, CLASSES, _params(method="contrastive", contrastive={"bank_path": str(tmp_path / "bank.safetensors")})
    )

    assert reused.names == trained.names and torch.equal(reused.vectors, trained.vectors)
    assert not any(name.startswith("contrastive/") for name in history)  # no training curves


def _with_other_tokens(encoder):
    """A copy of ``encoder`` whose token table moved a little (as a fine-tune's does): the same
    width, another token space."""
    other = copy.deepcopy(encoder)
    with torch.no_grad():
        other.embedding.weight.add_(0.01)
    return other


def test_a_saved_bank_is_refused_by_an_encoder_of_the_same_width_with_other_tokens(
    tiny_text_encoders, tmp_path
) -> None:
    encoder = tiny_text_encoders["diffusers"]
    trained, _ = style_bank_from(encoder, CLASSES, _params(method="contrastive", contrastive={"iterations": 3}))
    trained.save(tmp_path / "bank.safetensors")
    other = _with_other_tokens(encoder)
    assert other.dim == encoder.dim and other.identity != encoder.identity

    with pytest.raises(StyleBankEncoderError) as refused:
        style_bank_from(
            other, CLASSES, _params(method="contrastive", contrastive={"bank_path": str(tmp_path / "bank.safetensors")})
        )

    assert str(refused.value) == (
        f"prompt_generation.contrastive.bank_path='{tmp_path / 'bank.safetensors'}': its pseudo-words were made in "
        f"the token space of {encoder.name} (token table {encoder.identity}), not of the text encoder in use, "
        f"{other.name} (token table {other.identity}); allowed: a bank made with this encoder (rerun prompt_generation)"
    )


def test_an_encoders_identity_does_not_depend_on_its_precision(tiny_text_encoders) -> None:
    encoder = tiny_text_encoders["diffusers"]
    half = copy.deepcopy(encoder)
    half.embedding.to(torch.bfloat16)

    assert half.identity == encoder.identity


def test_pipeline_writes_the_prompt_table(demo_project) -> None:
    demo_project.run("prompt_generation")

    table = pd.read_parquet(demo_project.path / "data/02_intermediate/prompt_table.parquet")
    assert len(table) == 3 * 3 * 4  # demo: classes × styles × images_per_class_and_style
    assert list(table.columns[:3]) == ["prompt_id", "class_name", "class_index"]
    assert set(table["class_name"]) == {"ball", "box", "tent", "kite"}
    assert StyleBank.load(demo_project.path / "data/02_intermediate/style_bank.safetensors").names == []
    assert (demo_project.path / "data/08_reporting/prompt_diversity.png").stat().st_size > 0


@pytest.mark.parametrize("backend", ["diffusion", "inversion"])
def test_the_prompt_encoder_runs_in_the_runtimes_precision(demo_assets, backend) -> None:
    from clip_dfkd.params import ImageSynthesisParams, RuntimeParams, TeacherParams
    from clip_dfkd.pipelines.prompt_generation.nodes import load_prompt_encoder

    synthesis = ImageSynthesisParams.model_validate(
        {"backend": backend, "generator": {"model_id": demo_assets.generator_dir}}
    )
    teacher = TeacherParams(
        model_name="clip-dfkd-tiny", pretrained=demo_assets.teacher_checkpoint, templates=["{class_name}"]
    )
    encoder = load_prompt_encoder(synthesis, teacher, RuntimeParams(device="cpu", precision="bf16"))
    computed_in = []
    model = encoder.text_encoder if backend == "diffusion" else encoder.model
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    handles = [linear.register_forward_hook(lambda m, i, o: computed_in.append(o.dtype)) for linear in linears]
    vector = torch.randn(encoder.dim, requires_grad=True)

    features = encoder.encode(["a [S*] style of a ball"], vector[None])
    features.sum().backward()
    for handle in handles:
        handle.remove()

    assert computed_in and set(computed_in) == {torch.bfloat16}
    # What Contrastive-Prompt trains stays float32: its features, its vectors and their gradients.
    assert features.dtype == torch.float32 and vector.grad is not None and vector.grad.dtype == torch.float32
    assert all(parameter.dtype == torch.float32 for parameter in encoder.embedding.parameters())
