"""Kedro project settings."""

from clip_dfkd.library_warnings import quiet_library_warnings

# Kedro imports this module first of the project's (bootstrap_project, before plugins'
# commands and the session), so the filters precede the warnings that the imports below
# (kedro-mlflow through the hooks) and the run itself trigger. Kedro sends warnings to its
# logs (logging.captureWarnings); a filtered warning is neither printed nor logged.
quiet_library_warnings()

from kedro.config import OmegaConfigLoader  # noqa: E402

from clip_dfkd.config_resolvers import artifact_location, tracking_uri  # noqa: E402
from clip_dfkd.hooks import (  # noqa: E402
    CutShortOutputsHook,
    DemoAssetsHook,
    DeviceMemoryHook,
    TypedParamsMlflowHook,
)
from clip_dfkd.preflight import ParameterSectionsHook, PreflightHook  # noqa: E402

# Pluggy calls the last registered hook first: misspelt parameter sections are refused before
# anything else, demo assets exist before the preflight checks look for them, and every check
# runs before the MLflow run starts.
HOOKS = (
    TypedParamsMlflowHook(),
    CutShortOutputsHook(),
    PreflightHook(),
    DemoAssetsHook(),
    DeviceMemoryHook(),
    ParameterSectionsHook(),
)

# kedro-mlflow's own hook is replaced by TypedParamsMlflowHook above. Kedro matches the
# distribution's metadata name, which kedro-mlflow publishes as "kedro_mlflow".
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow",)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]},
    # conf/demo/mlflow.yml overrides single keys of conf/base/mlflow.yml.
    "merge_strategy": {"mlflow": "soft"},
    "custom_resolvers": {
        "clip_dfkd.tracking_uri": tracking_uri,
        "clip_dfkd.artifact_location": artifact_location,
    },
}
