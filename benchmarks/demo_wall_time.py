"""Time the offline demo on this machine: a cold run (tiny models and benchmark built on first
use) and a warm rerun (images already on disk are skipped), each in a fresh copy of the
project's configuration, plus each stage run alone.

    python benchmarks/demo_wall_time.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from conftest import make_project_copy  # noqa: E402  (the same fresh copy the tests use)

STAGES = ["prompt_generation", "image_synthesis", "teacher_labeling", "student_distillation", "ood_evaluation"]


def _timed_run(project: Path, *args: str) -> float:
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


def main() -> None:
    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as scratch:
        project = make_project_copy(Path(scratch) / "project")
        print(f"kedro run --env=demo, cold: {_timed_run(project):6.1f} s")
        print(f"kedro run --env=demo, warm: {_timed_run(project):6.1f} s")
        for stage in STAGES:
            print(f"  --pipelines={stage:<22} {_timed_run(project, f'--pipelines={stage}'):6.1f} s")
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak resident memory of one run: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
