"""Bad parameter values fail on one line that names the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from clip_dfkd.params import (
    ClassNames,
    ImageSynthesisParams,
    InvalidParameterError,
    OodEvaluationParams,
    PromptGenerationParams,
    StudentDistillationParams,
    TeacherParams,
)

TEACHER = {"model_name": "clip-dfkd-tiny", "pretrained": "data/tiny.safetensors", "templates": ["a {class_name}"]}
GENERATOR = {"model_id": "stabilityai/sd-turbo"}
STUDENT = {"student": {"model_name": "resnet18"}}


def _error(model, raw) -> str:
    with pytest.raises(InvalidParameterError) as caught:
        model.model_validate(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


PACS = {"benchmarks": {"pacs": {"root": "data/01_raw/PACS", "layout": "pacs"}}}


@pytest.mark.parametrize(
    ("model", "raw", "expected"),
    [
        (ClassNames, [], "classes=[]: must list at least one class name"),
        (ClassNames, ["dog", "cat", "Dog"], "classes=['dog', 'cat', 'Dog']: has duplicate names ['Dog']"),
        (ClassNames, "imagenet", "classes='imagenet': names no known list; allowed: a list of names or one of"),
        (
            PromptGenerationParams,
            {"styles": "arty"},
            "prompt_generation.styles='arty': names no known list; allowed: a list of names or one of",
        ),
        (
            PromptGenerationParams,
            {"method": "fancy", "styles": ["photo"]},
            "prompt_generation.method='fancy': Input should be 'vanilla', 'mix', 'random' or 'contrastive'",
        ),
        (
            PromptGenerationParams,
            {"styles": ["photo"], "images_per_class_and_style": 0},
            "prompt_generation.images_per_class_and_style=0: Input should be greater than 0",
        ),
        (
            PromptGenerationParams,
            {"styles": ["photo"], "templates": ["a {style} picture"]},
            "prompt_generation.templates=['a {style} picture']: lacks the placeholder(s) {class_name}",
        ),
        (
            PromptGenerationParams,
            {"method": "mix", "styles": ["photo", "sketch"], "mix": {"k": 3}},
            "prompt_generation.mix.k=3: larger than the style dictionary (2 styles); allowed: 1..2",
        ),
        (
            PromptGenerationParams,
            {"styles": ["photo"], "mix": {"alpha": 0}},
            "prompt_generation.mix.alpha=0: Input should be greater than 0",
        ),
        (
            PromptGenerationParams,
            {"styles": ["photo"], "num_styles": 0},
            "prompt_generation.num_styles=0: Input should be greater than 0",
        ),
        (
            PromptGenerationParams,
            {"styles": ["photo"], "pseudo_word_template": "a picture of a {class_name}"},
            "prompt_generation.pseudo_word_template='a picture of a {class_name}': lacks the placeholder(s) {style}",
        ),
        (
            PromptGenerationParams,
            {"styles": ["photo"], "pseudo_word_template": "a {style} style"},
            "prompt_generation.pseudo_word_template='a {style} style': lacks the placeholder(s) {class_name}",
        ),
        (
            ImageSynthesisParams,
            {"backend": "gan", "generator": GENERATOR},
            "image_synthesis.backend='gan': Input should be 'diffusion' or 'inversion'",
        ),
        (
            ImageSynthesisParams,
            {"backend": "diffusion"},
            "image_synthesis.generator=None: backend diffusion needs a generator",
        ),
        (
            ImageSynthesisParams,
            {"backend": "inversion", "inversion": {"parameterization": "voxels"}},
            "image_synthesis.inversion.parameterization='voxels': Input should be 'pixels', 'fourier' or 'latent'",
        ),
        (
            ImageSynthesisParams,
            {"backend": "inversion", "inversion": {"iterations": 0}},
            "image_synthesis.inversion.iterations=0: Input should be greater than 0",
        ),
        (
            ImageSynthesisParams,
            {"backend": "inversion", "inversion": {"cutouts": -1}},
            "image_synthesis.inversion.cutouts=-1: Input should be greater than 0",
        ),
        (
            ImageSynthesisParams,
            {"backend": "inversion", "inversion": {"parameterization": "latent"}},
            "image_synthesis.inversion.decoder=None: parameterization latent needs a decoder",
        ),
        (
            ImageSynthesisParams,
            {"generator": {**GENERATOR, "height": -8}},
            "image_synthesis.generator.height=-8: Input should be greater than 0",
        ),
        (
            ImageSynthesisParams,
            {"generator": {**GENERATOR, "width": 100}},
            "image_synthesis.generator.width=100: must be a multiple of 8",
        ),
        (
            ImageSynthesisParams,
            {"generator": GENERATOR, "batch_size": 0},
            "image_synthesis.batch_size=0: Input should be greater than 0",
        ),
        (
            ImageSynthesisParams,
            {"generator": {**GENERATOR, "scheduler": "FastScheduler"}},
            "image_synthesis.generator.scheduler='FastScheduler': is not a diffusers scheduler; allowed: null or",
        ),
        (
            TeacherParams,
            {**TEACHER, "model_name": "ViT-Q-99"},
            "teacher.model_name='ViT-Q-99': is not an open_clip model; allowed: one of open_clip.list_models()",
        ),
        (
            TeacherParams,
            {**TEACHER, "model_name": "ViT-B-32", "pretrained": "laion9000"},
            "teacher.pretrained='laion9000': neither a pretrained tag of ViT-B-32 (allowed: openai,",
        ),
        (
            StudentDistillationParams,
            {"student": {"model_name": "resnet9000"}},
            "student_distillation.student.model_name='resnet9000': is not a timm model; allowed:",
        ),
        (
            StudentDistillationParams,
            {**STUDENT, "training": {"epochs": 0}},
            "student_distillation.training.epochs=0: Input should be greater than 0",
        ),
        (
            StudentDistillationParams,
            {**STUDENT, "loss": {"kd_weight": 0, "embedding_weight": 0}},
            "student_distillation.loss.kd_weight=0: kd_weight and embedding_weight are both 0",
        ),
        (
            OodEvaluationParams,
            {"benchmarks": {}},
            "ood_evaluation.benchmarks={}: Dictionary should have at least 1 item",
        ),
        (
            OodEvaluationParams,
            {**PACS, "few_shot": {"k": 5}},
            "ood_evaluation.few_shot.source_domains={}: k > 0 needs domains to draw from",
        ),
        (
            OodEvaluationParams,
            {**PACS, "few_shot": {"k": 5, "source_domains": {"pacs": ["foto"]}}},
            "ood_evaluation.few_shot.source_domains.pacs=['foto']: ['foto'] not evaluated domains; "
            "allowed: ['art_painting', 'cartoon', 'photo', 'sketch']",
        ),
        (
            OodEvaluationParams,
            {**PACS, "few_shot": {"k": 5, "source_domains": {"vlcs": ["x"]}}},
            "ood_evaluation.few_shot.source_domains={'vlcs': ['x']}: ['vlcs'] not enabled benchmarks",
        ),
        (
            OodEvaluationParams,
            {**PACS, "few_shot": {"k": 5, "source_domains": {"pacs": ["art_painting", "cartoon", "photo", "sketch"]}}},
            "ood_evaluation.few_shot.source_domains={'pacs': ['art_painting', 'cartoon', 'photo', 'sketch']}: leaves "
            "no evaluated domain",
        ),
        (
            OodEvaluationParams,
            {**PACS, "few_shot": {"label_weight": 0, "kd_weight": 0}},
            "ood_evaluation.few_shot.label_weight=0: label_weight and kd_weight are both 0",
        ),
    ],
)
def test_bad_values_fail_on_one_line_naming_key_value_and_rule(model, raw, expected) -> None:
    assert _error(model, raw).startswith(expected)


def test_unknown_keys_are_rejected_not_ignored() -> None:
    message = _error(PromptGenerationParams, {"styles": ["photo"], "image_per_class": 3})
    assert message.startswith("prompt_generation.image_per_class=3: Extra inputs are not permitted")


def test_good_values_pass_and_keep_their_values() -> None:
    params = StudentDistillationParams.model_validate({**STUDENT, "training": {"epochs": 2}})
    assert params.training.epochs == 2
    assert params.loss.temperature == 4.0
    assert list(ClassNames.model_validate(["dog", "cat"])) == ["dog", "cat"]
