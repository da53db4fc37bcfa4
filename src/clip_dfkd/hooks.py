"""Project hooks: typed parameters in MLflow, demo assets, and checks that read the disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook
from pydantic import BaseModel

from clip_dfkd.benchmarks import BenchmarkError, scan_benchmark
from clip_dfkd.models.generator import missing_generator_weights
from clip_dfkd.models.student import missing_student_weights
from clip_dfkd.models.teacher import missing_teacher_weights
from clip_dfkd.models.text_encoders import generator_embedding_dim
from clip_dfkd.params import ImageSynthesisParams, PromptGenerationParams
from clip_dfkd.styles import saved_bank_dim


class TypedParamsMlflowHook(MlflowHook):
    """kedro-mlflow's hook, fed plain dicts (it flattens dict parameters but would log a
    validated pydantic parameter as one long string), and closing its run completely."""

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        plain = {
            name: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            for name, value in inputs.items()
        }
        super().before_node_run(node=node, catalog=catalog, inputs=plain, is_async=is_async)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        super().after_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
        # kedro-mlflow reopens the run before every node and closes it once at the end, which
        # leaves it on MLflow's active-run stack: a second run in the same process (a notebook,
        # `kedro ipython`, tests) would then log into this one.
        if self.run_id is not None and not self._already_active_mlflow:
            while (active := mlflow.active_run()) is not None and active.info.run_id == self.run_id:
                mlflow.end_run()


class DemoAssetsHook:
    """Builds the offline demo's tiny models and benchmark when the config asks for them
    (only ``conf/demo`` has a ``demo_assets`` section), once parameters have been validated
    and before the preflight checks look for them."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        raw = catalog.load("parameters").get("demo_assets")
        if raw is None:
            return
        from clip_dfkd.demo import DemoAssetsParams, ensure_demo_assets

        ensure_demo_assets(DemoAssetsParams.model_validate(raw), Path(run_params["project_path"]))


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


class PreflightError(ValueError):
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
