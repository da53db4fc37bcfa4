"""The base recipe runs the paper's method and keeps the test domains out of its prompts."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from clip_dfkd.params import ClassNames, PromptGenerationParams
from clip_dfkd.vocabularies import BENCHMARK_DOMAINS, CLASS_LISTS

BASE = Path(__file__).resolve().parents[1] / "conf" / "base"


def _words(text: str) -> set[str]:
    return set(re.split(r"[\s_]+", text.lower()))


def _domain_words() -> set[str]:
    return {word for domains in BENCHMARK_DOMAINS.values() for domain in domains for word in _words(domain)}


def _base_prompt_generation() -> PromptGenerationParams:
    raw = yaml.safe_load((BASE / "parameters_prompt_generation.yml").read_text())["prompt_generation"]
    return PromptGenerationParams.model_validate(raw)


def test_the_base_recipe_uses_contrastive_prompts() -> None:
    assert _base_prompt_generation().method == "contrastive"


def test_no_default_style_names_a_benchmark_domain() -> None:
    leaked = {style: _words(style) & _domain_words() for style in _base_prompt_generation().styles}

    assert not any(leaked.values()), leaked


def test_domain_words_are_an_explicit_choice() -> None:
    chosen = PromptGenerationParams.model_validate({"styles": "neutral_and_domain_words"}).styles

    assert {"photo", "sketch", "cartoon", "painting"} <= set(chosen)


def test_the_base_classes_are_pacs_and_a_named_list_works_where_a_list_cannot_be_typed() -> None:
    raw = yaml.safe_load((BASE / "parameters.yml").read_text())["classes"]

    assert list(ClassNames.model_validate(raw)) == CLASS_LISTS["pacs"]
    assert list(ClassNames.model_validate("vlcs")) == ["bird", "car", "chair", "dog", "person"]
