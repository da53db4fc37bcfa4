"""``prompt_generation`` (conf/base/parameters_prompt_generation.yml)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from clip_dfkd.params.base import Params, bad_value, check_template
from clip_dfkd.vocabularies import STYLE_LISTS, resolve_named_list


class MixPromptParams(Params):
    """Mix-Prompt: each pseudo-word is a Dirichlet(alpha)-weighted mix of k style words.

    The defaults make peaked mixes over several words: with 4 words at alpha 0.3 the largest
    weight is 0.7 on average and a second word has more than 0.1 in about 4 mixes of 5, so a
    mix stays near one or two real words while different mixes reach the whole dictionary.
    """

    k: PositiveInt = 4
    alpha: PositiveFloat = 0.3


class ContrastivePromptParams(Params):
    """Contrastive-Prompt: a bank of learned pseudo-words, or a saved one to reuse."""

    iterations: PositiveInt = 300
    learning_rate: PositiveFloat = 0.01
    style_weight: float = Field(default=1.0, ge=0.0)
    content_weight: float = Field(default=1.0, ge=0.0)
    temperature: PositiveFloat = 0.1
    # After each step a vector longer than this × the median norm of the run's real-word token
    # rows is scaled back to it; None: unbounded (12–16× in the demo). 1.0, as long as a typical
    # real word, gave the most diverse prompts in the demo (docs/prompt_diversification.md).
    max_norm_ratio: PositiveFloat | None = 1.0
    bank_path: str | None = None


class PromptGenerationParams(Params):
    """Class names × styles → one prompt per image to synthesise.

    ``vanilla`` fills ``templates`` with the hand-written ``styles``; ``mix``, ``random`` and
    ``contrastive`` make ``num_styles`` pseudo-words in the text encoder's token-embedding
    space and fill ``pseudo_word_template`` with a placeholder that stands for them.
    """

    section: ClassVar[str] = "prompt_generation"

    method: Literal["vanilla", "mix", "random", "contrastive"] = "contrastive"
    styles: list[str] = Field(default=STYLE_LISTS["neutral"], min_length=1)
    templates: list[str] = Field(default=["a {style} of a {class_name}"], min_length=1)
    pseudo_word_template: str = "a {style} style of a {class_name}"
    num_styles: PositiveInt = 16
    images_per_class_and_style: PositiveInt = 8
    seed: int = 0
    mix: MixPromptParams = MixPromptParams()
    contrastive: ContrastivePromptParams = ContrastivePromptParams()

    @field_validator("styles", mode="before")
    @classmethod
    def _named_styles(cls, value: Any) -> Any:
        return resolve_named_list(value, STYLE_LISTS)

    @field_validator("styles")
    @classmethod
    def _unique_styles(cls, styles: list[str]) -> list[str]:
        if len({s.lower() for s in styles}) != len(styles):
            raise ValueError("has duplicate styles; styles must be unique")
        return styles

    @field_validator("templates")
    @classmethod
    def _templates_have_slots(cls, templates: list[str]) -> list[str]:
        for template in templates:
            check_template(template, {"style", "class_name"}, {"style", "class_name"})
        return templates

    @field_validator("pseudo_word_template")
    @classmethod
    def _pseudo_word_template_has_slots(cls, template: str) -> str:
        return check_template(template, {"style", "class_name"}, {"style", "class_name"})

    @model_validator(mode="after")
    def _mix_fits_the_dictionary(self) -> PromptGenerationParams:
        if self.method == "mix" and self.mix.k > len(self.styles):
            raise bad_value(
                "mix.k",
                self.mix.k,
                f"larger than the style dictionary ({len(self.styles)} styles); allowed: 1..{len(self.styles)}",
            )
        return self
