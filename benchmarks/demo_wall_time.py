"""Time the offline demo on this machine: a cold run (tiny models and benchmark built on first
use) and a warm rerun (images already on disk are skipped), then each stage alone.

    python benchmarks/demo_wall_time.py
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

from demo_projects import kedro_run, make_project_copy

STAGES = ["prompt_generation", "image_synthesis", "teacher_labeling", "student_distillation", "ood_evaluation"]


def main() -> None:
    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as scratch:
        project = make_project_copy(Path(scratch) / "project")
        print(f"kedro run --env=demo, cold: {kedro_run(project):6.1f} s")
        print(f"kedro run --env=demo, warm: {kedro_run(project):6.1f} s")
        for stage in STAGES:
            print(f"  --pipelines={stage:<22} {kedro_run(project, f'--pipelines={stage}'):6.1f} s")
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak resident memory of one run: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
