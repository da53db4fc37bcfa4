"""Shared by the benchmark scripts: fresh demo projects and timed `kedro run`s in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from conftest import make_project_copy, merge_params  # noqa: E402  (the same helpers the tests use)

__all__ = ["REPO_ROOT", "kedro_run", "make_project_copy", "merge_params"]


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
