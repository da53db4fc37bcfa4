"""Project hooks: typed parameters in MLflow and the demo's assets (the checks that read the
disk before a run are in :mod:`clip_dfkd.preflight`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks import MlflowHook
from pydantic import BaseModel


class TypedParamsMlflowHook(MlflowHook):
    """kedro-mlflow's hook, fed plain dicts: it flattens dict parameters but would log a
    validated pydantic parameter as one long string.

    Its run is closed completely at the end of a pipeline only with ``tracking.run.nested:
    false`` in ``mlflow.yml`` (see the comment there and tests/test_mlflow_hook.py)."""

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
        # The comparison reads tracked runs only: it needs no model and no benchmark.
        if raw is None or pipeline.inputs() <= {"params:comparison"}:
            return
        from clip_dfkd.demo import DemoAssetsParams, ensure_demo_assets

        ensure_demo_assets(DemoAssetsParams.model_validate(raw), Path(run_params["project_path"]))
