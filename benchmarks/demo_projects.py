"""Fresh demo projects, shared by the benchmark scripts and the test suite (which imports this
module through pytest's ``pythonpath``): a copy of the project's configuration with empty data
layers, the demo's asset parameters, runtime-parameter merging, and timed `kedro run`s."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_LAYERS = [
    "01_raw",
    "02_intermediate",
    "03_primary",
    "04_feature",
    "05_model_input",
    "06_models",
    "07_model_output",
    "08_reporting",
]

# The demo's assets, as the demo's config places them in a project.
DEMO_ASSET_FOLDERS = ["data/06_models/demo", "data/01_raw/demo_shapes"]


def make_project_copy(destination: Path, assets_from: Path | None = None) -> Path:
    """A fresh copy of the project's configuration with empty data layers (the package
    itself comes from the installed ``clip_dfkd``), and the demo's assets copied from the
    project ``assets_from`` when given (they are built, the teacher trained, otherwise)."""
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "pyproject.toml", destination / "pyproject.toml")
    shutil.copy(REPO_ROOT / ".telemetry", destination / ".telemetry")
    shutil.copytree(REPO_ROOT / "conf", destination / "conf", ignore=shutil.ignore_patterns("local"))
    (destination / "conf" / "local").mkdir()
    (destination / "src").mkdir()  # Kedro insists on it; the package itself is installed
    for layer in DATA_LAYERS:
        (destination / "data" / layer).mkdir(parents=True)
    if assets_from is not None:
        for folder in DEMO_ASSET_FOLDERS:
            shutil.copytree(assets_from / folder, destination / folder)
    return destination


def demo_asset_params():
    """The demo config's ``demo_assets`` section, validated."""
    import yaml

    from clip_dfkd.demo import DemoAssetsParams

    raw = yaml.safe_load((REPO_ROOT / "conf/demo/parameters.yml").read_text())["demo_assets"]
    return DemoAssetsParams.model_validate(raw)


def merge_params(base: dict, extra: dict) -> dict:
    """Nested runtime parameters: ``extra`` on top of ``base``, section by section."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = merge_params(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def kedro_run(project: Path, *args: str) -> float:
    """`kedro run --env=demo ARGS` in ``project``, offline; returns its wall time in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env=demo", *args],
        cwd=project,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started
