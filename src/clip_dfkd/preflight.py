"""Checks that read the disk, run before the first node and before the MLflow run starts.

Parameter validation (:mod:`clip_dfkd.params`) sees values only; these checks see files:
every model's weights can be found (files, folders, and with HF_HUB_OFFLINE the Hugging
Face cache), saved artefacts fit the run, benchmark roots exist and their class folders
are known classes. A failed check raises :class:`PreflightError` with one line per problem,
and nothing has been written or logged yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from clip_dfkd.benchmarks import BenchmarkError, scan_benchmark
from clip_dfkd.errors import UserError
from clip_dfkd.models.generator import missing_generator_weights
from clip_dfkd.models.student import missing_student_weights
from clip_dfkd.models.teacher import missing_teacher_weights
from clip_dfkd.models.text_encoders import generator_embedding_dim
from clip_dfkd.params import ImageSynthesisParams, PromptGenerationParams
from clip_dfkd.styles import saved_bank_dim


def _saved_bank_problem(params: PromptGenerationParams, image_synthesis: ImageSynthesisParams) -> str | None:
    path = params.contrastive.bank_path
    if params.method != "contrastive" or path is None:
        return None
    key = f"prompt_generation.contrastive.bank_path={path!r}"
    if not Path(path).expanduser().is_file():
        return f"{key}: no such file; allowed: a style_bank.safetensors saved by an earlier run, or null to train one"
    expected = generator_embedding_dim(image_synthesis.generator)
    found = saved_bank_dim(Path(path).expanduser())
    if expected is not None and found != expected:
        return (
            f"{key}: its pseudo-words have {found} dimensions; the text encoder of "
            f"{image_synthesis.generator.model_id} embeds tokens in {expected}"
        )
    return None


class PreflightError(UserError, ValueError):
    """Files that a run needs and that are missing; one line per problem."""


class PreflightHook:
    """Checks what parameter validation cannot see, before the first node runs: every model's
    weights can be found (files, folders, and with HF_HUB_OFFLINE the Hugging Face cache),
    benchmark roots exist and their class folders are known classes."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        used = {name.removeprefix("params:") for name in pipeline.inputs() if name.startswith("params:")}
        problems = []
        if "teacher" in used:
            problems.append(missing_teacher_weights(catalog.load("params:teacher")))
        if "image_synthesis" in used:
            problems.append(missing_generator_weights(catalog.load("params:image_synthesis").generator))
        if "prompt_generation" in used:
            problems.append(
                _saved_bank_problem(catalog.load("params:prompt_generation"), catalog.load("params:image_synthesis"))
            )
        if "student_distillation" in used:
            problems.append(missing_student_weights(catalog.load("params:student_distillation").student))
        if "ood_evaluation" in used:
            classes = list(catalog.load("params:classes"))
            for name, benchmark in catalog.load("params:ood_evaluation").benchmarks.items():
                try:
                    scan_benchmark(name, benchmark, classes)
                except BenchmarkError as exc:
                    problems.append(str(exc))
        if problems := [problem for problem in problems if problem]:
            raise PreflightError("\n".join(problems))
