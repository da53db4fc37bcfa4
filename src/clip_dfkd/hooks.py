"""Project hooks: typed parameters in MLflow and the demo's assets (the checks that read the
disk before a run are in :mod:`clip_dfkd.preflight`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook
from pydantic import BaseModel


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
