"""Checks that read the disk, run before the first node and before the MLflow run starts.

Parameter validation (:mod:`clip_dfkd.params`) sees values only; these checks see files:
every model's weights can be found (files, folders, and with HF_HUB_OFFLINE the Hugging
Face cache), saved artefacts fit the run, benchmark roots exist and their class folders
are known classes. A failed check raises :class:`PreflightError` with one line per problem,
and nothing has been written or logged yet.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import DatasetError
from pydantic import BaseModel

from clip_dfkd.benchmarks import BenchmarkError, scan_benchmark
from clip_dfkd.errors import UserError
from clip_dfkd.models.generator import (
    missing_decoder_weights,
    missing_generator_weights,
    missing_tiny_vae_weights,
    unsupported_generator,
)
from clip_dfkd.models.student import OutdatedStudentError, StudentClassifier, missing_student_weights
from clip_dfkd.models.teacher import missing_teacher_weights, teacher_token_embedding_dim
from clip_dfkd.models.text_encoders import generator_embedding_dim
from clip_dfkd.params import (
    ClassNames,
    ComparisonParams,
    ImageSynthesisParams,
    PromptGenerationParams,
    TeacherParams,
)
from clip_dfkd.pipeline_registry import STAGES
from clip_dfkd.rendering import ray_executor_problem
from clip_dfkd.rerun import kedro_run_command
from clip_dfkd.runtime import unavailable_device
from clip_dfkd.styles import saved_bank_dim


def _saved_bank_problem(
    params: PromptGenerationParams, image_synthesis: ImageSynthesisParams, teacher: TeacherParams
) -> str | None:
    path = params.contrastive.bank_path
    if params.method != "contrastive" or path is None:
        return None
    key = f"prompt_generation.contrastive.bank_path={path!r}"
    if not Path(path).expanduser().is_file():
        return f"{key}: no such file; allowed: a style_bank.safetensors saved by an earlier run, or null to train one"
    try:
        found = saved_bank_dim(Path(path).expanduser())
    except ValueError as exc:
        return f"{key}: {exc}; allowed: a style_bank.safetensors saved by an earlier run, or null to train one"
    # Pseudo-words live in the encoder that conditions synthesis: the teacher's text tower
    # for inversion, the generator's text encoder for diffusion.
    if image_synthesis.backend == "inversion":
        encoder, expected = f"the teacher {teacher.model_name}", teacher_token_embedding_dim(teacher)
    else:
        encoder = f"the text encoder of {image_synthesis.generator.model_id}"
        expected = generator_embedding_dim(image_synthesis.generator)
    if expected is not None and found != expected:
        return (
            f"{key}: its pseudo-words have {found} dimensions; {encoder} (backend {image_synthesis.backend}) "
            f"embeds tokens in {expected}"
        )
    return None


def _synthesis_problem(params: ImageSynthesisParams) -> str | None:
    if params.executor == "ray" and (problem := ray_executor_problem(params.ray)):
        return problem
    if params.backend == "diffusion":
        return (
            missing_generator_weights(params.generator)
            or unsupported_generator(params.generator)
            or missing_tiny_vae_weights(params.generator)
        )
    if params.inversion.parameterization == "latent":
        return missing_decoder_weights(params.inversion.decoder)
    return None


def _loads_teacher(pipeline, catalog) -> bool:
    """Whether a node of ``pipeline`` loads the teacher's weights. Labelling and evaluation
    do; prompt generation and synthesis only for inversion, where the teacher encodes the
    prompts and guides the images (with diffusion, a render machine needs no CLIP weights);
    registration only records the teacher's name."""
    from clip_dfkd.pipelines.image_synthesis.nodes import synthesize_images
    from clip_dfkd.pipelines.ood_evaluation.nodes import fine_tune_student, predict_teacher
    from clip_dfkd.pipelines.prompt_generation.nodes import build_style_bank, measure_prompt_diversity
    from clip_dfkd.pipelines.teacher_labeling.nodes import label_images

    functions = {node.func for node in pipeline.nodes}
    if functions & {label_images, predict_teacher, fine_tune_student}:
        return True
    inversion = catalog.load("params:image_synthesis").backend == "inversion"
    return inversion and bool(functions & {build_style_bank, measure_prompt_diversity, synthesize_images})


def _shard_run_problem(params: ImageSynthesisParams, pipeline, run_params: dict[str, Any]) -> str | None:
    """A sharded run may only render: its manifest, metrics and sample grid would hold one
    shard, and N runs would overwrite each other's (and rerun any earlier stage N times)."""
    if params.num_shards == 1:
        return None
    from clip_dfkd.pipelines.image_synthesis.pipeline import create_pipeline

    rendering = {node.name for node in create_pipeline().to_outputs("synthetic_images").nodes}
    if not {node.name for node in pipeline.nodes} - rendering:
        return None
    num_shards, shard_index = "image_synthesis.num_shards", "image_synthesis.shard_index"
    render = kedro_run_command(
        run_params,
        "--pipelines=image_synthesis",
        "--to-outputs=synthetic_images",
        params={num_shards: params.num_shards, shard_index: "<k>"},
    )
    gather = kedro_run_command(run_params, "--pipelines=image_synthesis", without=(num_shards, shard_index))
    return (
        f"image_synthesis.num_shards={params.num_shards}: a sharded run renders synthetic_images only; run "
        f"`{render}` for each k, then `{gather}` once, which finds every image on disk and writes the manifest"
    )


# Saved artefacts that carry the class list they were made for.
CLASS_CARRIERS = ("prompt_table", "synthesis_manifest", "teacher_labels", "student_model")


def _stage_making(dataset: str) -> str:
    """The stage whose pipeline writes ``dataset``."""
    return next(
        stage
        for stage in STAGES
        if dataset in importlib.import_module(f"clip_dfkd.pipelines.{stage}.pipeline").create_pipeline().all_outputs()
    )


def _missing_input(name: str, catalog, run_params: dict[str, Any]) -> str | None:
    if catalog.exists(name):
        return None
    return f"{name}: not on disk yet; run `{kedro_run_command(run_params, f'--pipelines={_stage_making(name)}')}` first"


def _unrendered_images(catalog, run_params: dict[str, Any]) -> str | None:
    """Images of the saved manifest that are not on disk (deleted, or a folder from another
    run): labelling would stop at them. Rendering again makes exactly those."""
    from clip_dfkd.pipelines.teacher_labeling.nodes import missing_images

    problem = missing_images(catalog.load("synthetic_images"), catalog.load("synthesis_manifest"))
    return problem and f"{problem}; rerun `{kedro_run_command(run_params, '--pipelines=image_synthesis')}`"


def _class_list_problem(name: str, catalog, classes: list[str], run_params: dict[str, Any]) -> str | None:
    """Why the saved artefact ``name`` cannot be used with ``classes`` (or at all: a student
    saved by an older version), or None.

    Classes enter at prompt generation, so the fix is to rerun every stage from there up to
    the one that makes the artefact.
    """
    try:
        artefact = catalog.load(name)
    except DatasetError as exc:
        # Kedro wraps the dataset's error, and wraps that again.
        outdated: BaseException | None = exc
        while outdated is not None and not isinstance(outdated, OutdatedStudentError):
            outdated = outdated.__cause__
        if outdated is None:
            raise
        return str(
            OutdatedStudentError(outdated.config, kedro_run_command(run_params, f"--pipelines={_stage_making(name)}"))
        )
    found = list(artefact.class_names) if isinstance(artefact, StudentClassifier) else artefact.attrs.get("classes")
    if found == classes:
        return None
    stages = STAGES[: STAGES.index(_stage_making(name)) + 1]
    made_for = f"was made for classes {found}" if found else "records no class list (made by an older version)"
    rerun = kedro_run_command(run_params, f"--pipelines={','.join(stages)}")
    return f"{name} {made_for}, but classes={classes}; rerun `{rerun}` to remake it for these classes"


def _raw(value: Any) -> Any:
    """A parameter as written: a stage that does not type-hint it gets it unvalidated."""
    return value.model_dump() if isinstance(value, BaseModel) else value


class PreflightError(UserError, ValueError):
    """Files that a run needs and that are missing; one line per problem."""


class PreflightHook:
    """Checks what parameter validation cannot see, before the first node runs: every model's
    weights can be found (files, folders, and with HF_HUB_OFFLINE the Hugging Face cache),
    benchmark roots exist, their class folders are known classes and the few-shot source
    domains are among their domains."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        used = {name.removeprefix("params:") for name in pipeline.inputs() if name.startswith("params:")}
        problems = []
        if "runtime" in used:
            problems.append(unavailable_device(catalog.load("params:runtime")))
        if "teacher" in used and _loads_teacher(pipeline, catalog):
            problems.append(missing_teacher_weights(catalog.load("params:teacher")))
        if "image_synthesis" in used:
            synthesis = catalog.load("params:image_synthesis")
            problems += [_synthesis_problem(synthesis), _shard_run_problem(synthesis, pipeline, run_params)]
        if "prompt_generation" in used:
            problems.append(
                _saved_bank_problem(
                    catalog.load("params:prompt_generation"),
                    catalog.load("params:image_synthesis"),
                    catalog.load("params:teacher"),
                )
            )
        if "student_distillation" in used:
            problems.append(missing_student_weights(catalog.load("params:student_distillation").student))
        saved = sorted(name for name in pipeline.inputs() if not name.startswith("params:") and name != "parameters")
        missing = {name: problem for name in saved if (problem := _missing_input(name, catalog, run_params))}
        problems += missing.values()
        if {"synthetic_images", "synthesis_manifest"} <= set(saved) - set(missing):
            problems.append(_unrendered_images(catalog, run_params))
        classes = list(ClassNames.model_validate(_raw(catalog.load("params:classes"))))
        problems += [
            _class_list_problem(name, catalog, classes, run_params)
            for name in CLASS_CARRIERS
            if name in saved and name not in missing
        ]
        if "ood_evaluation" in used:
            evaluation = catalog.load("params:ood_evaluation")
            found = {}
            for name, benchmark in evaluation.enabled_benchmarks().items():
                try:
                    found[name] = [domain.domain for domain in scan_benchmark(name, benchmark, classes)]
                except BenchmarkError as exc:
                    problems.append(str(exc))
            if evaluation.few_shot.k and len(found) == len(evaluation.enabled_benchmarks()):
                problems.append(evaluation.few_shot_source_error(found))
        if "comparison" in used:
            from clip_dfkd.pipelines.comparison.nodes import comparison_problem  # imports matplotlib: only here

            # Before the comparison's own MLflow run starts: no empty run is left behind.
            comparison = ComparisonParams.model_validate(_raw(catalog.load("params:comparison")))
            problems.append(comparison_problem(comparison, run_params))
        if problems := [problem for problem in problems if problem]:
            raise PreflightError("\n".join(problems))
