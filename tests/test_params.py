"""Bad parameter values fail on one line that names the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from clip_dfkd.params import (
    ClassNames,
    ImageSynthesisParams,
    InvalidParameterError,
    OodEvaluationParams,
    PromptGenerationParams,
    RuntimeParams,
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
        (ClassNames, ["dog", "cat", "Dog"], "classes=['dog', 'cat', 'Dog']: has duplicate names ['dog', 'Dog'] (the"),
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
            {"styles": ["photo"], "contrastive": {"max_norm_ratio": 0}},
            "prompt_generation.contrastive.max_norm_ratio=0: Input should be greater than 0",
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
            RuntimeParams,
            {"num_workers": "many"},
            "runtime.num_workers='many': allowed: auto, or a number of workers >= 0",
        ),
        (RuntimeParams, {"num_workers": -1}, "runtime.num_workers=-1: allowed: auto, or a number of workers >= 0"),
        (
            StudentDistillationParams,
            {**STUDENT, "mixup": 0.2},
            "student_distillation.mixup=0.2: mixed images have no stored targets (teacher_targets is 'stored_views'); "
            "allowed: 0, or teacher_targets online",
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


def test_class_names_are_whitespace_normalised() -> None:
    names = ClassNames.model_validate([" ball ", "big\t\n  box", "tent\u00a0pole"])
    assert list(names) == ["ball", "big box", "tent pole"]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["ball", "ball "], "classes=['ball', 'ball ']: has duplicate names ['ball', 'ball '] (the same ignoring case"),
        (["big box", "big  box"], "classes=['big box', 'big  box']: has duplicate names ['big box', 'big  box']"),
        (["ball", "ball\u200b"], "classes=['ball', 'ball\\u200b']: has duplicate names ['ball', 'ball\\u200b']"),
        (["caf\u00e9", "cafe\u0301"], "classes=['caf\u00e9', 'cafe\u0301']: has duplicate names"),
        (["ball", ""], "classes=['ball', '']: has names with no visible character ['']; allowed: names with a visible"),
        (["ball", " \t"], "classes=['ball', ' \\t']: has names with no visible character [' \\t']"),
        (["ball", "\u200b\u200d"], "classes=['ball', '\\u200b\\u200d']: has names with no visible character"),
        (["ball", "\x07"], "classes=['ball', '\\x07']: has names with no visible character ['\\x07']"),
        (["ba\x00ll"], "classes=['ba\\x00ll']: has names with control characters ['ba\\x00ll']; allowed: printable"),
    ],
    ids=[
        "trailing-space",
        "double-space",
        "zero-width-space",
        "decomposed-accent",
        "empty",
        "whitespace-only",
        "zero-width-only",
        "control-only",
        "control-inside",
    ],
)
def test_class_names_that_read_the_same_or_show_nothing_are_refused(names, expected) -> None:
    assert _error(ClassNames, names).startswith(expected)


def test_a_run_of_any_pipeline_hands_its_nodes_the_normalised_class_names() -> None:
    """Kedro validates a parameter, through a node's type hint, only for the pipelines that
    run: each pipeline that reads classes must hint ClassNames, or a run of it alone would
    pass the names as written."""
    from kedro.validation.parameter_validator import ParameterValidator

    from clip_dfkd.pipeline_registry import STAGES, every_pipeline

    readers = {name: pipeline for name, pipeline in every_pipeline().items() if "params:classes" in pipeline.inputs()}
    assert set(readers) == set(STAGES) - {"image_synthesis"}
    for name, pipeline in readers.items():
        validated = ParameterValidator({name: pipeline}).validate_raw_params({"classes": [" ball ", "big\tbox"]})
        assert list(validated["classes"]) == ["ball", "big box"], name
