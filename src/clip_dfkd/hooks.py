"""Project hooks: typed parameters in MLflow, demo assets, and checks that read the disk."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook
from pydantic import BaseModel

from clip_dfkd.benchmarks import BenchmarkError, scan_benchmark
from clip_dfkd.models.generator import missing_generator_weights
from clip_dfkd.models.student import missing_student_weights
from clip_dfkd.models.teacher import missing_teacher_weights

logger = logging.getLogger(__name__)


class TypedParamsMlflowHook(MlflowHook):
    """kedro-mlflow's hook, fed plain dicts: it flattens dict parameters but would log a
    validated pydantic parameter as one long string."""

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        plain = {
            name: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            for name, value in inputs.items()
        }
        super().before_node_run(node=node, catalog=catalog, inputs=plain, is_async=is_async)


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
