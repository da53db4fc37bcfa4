"""`kedro run --env=demo` on a fresh project: the README's first command, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

EXPECTED_ARTIFACTS = {
    "prompt_generation/prompt_table.parquet",
    "image_synthesis/synthetic_sample_grid.png",
    "teacher_labeling/teacher_label_summary.csv",
    "ood_evaluation/ood_evaluation.csv",
    "ood_evaluation/ood_evaluation.md",
    "ood_evaluation/ood_accuracy.png",
}


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


@pytest.mark.timeout(480)
def test_demo_runs_end_to_end_and_registers_a_loadable_student(fresh_project: Path) -> None:
    import mlflow

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env=demo"],
        cwd=fresh_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    mlflow.set_tracking_uri(f"sqlite:///{fresh_project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("clip-dfkd-demo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["teacher.model_name"] == "clip-dfkd-tiny"
    assert params["image_synthesis.generator.num_inference_steps"] == "4"
    assert params["student_distillation.training.epochs"] == "3"
    assert params["prompt_generation.method"] == "vanilla"
    assert "classes" in params

    metrics = run.data.metrics
    for name in (
        "teacher_labeling.intended_class_agreement",
        "student_distillation.total_loss",
        "ood_evaluation.demo_shapes.average.student_top1",
        "ood_evaluation.demo_shapes.photo.teacher_top1",
    ):
        assert 0 <= metrics[name] < 100, name
    history = client.get_metric_history(run.info.run_id, "student_distillation.total_loss")
    assert [m.step for m in history] == [0, 1, 2]

    assert EXPECTED_ARTIFACTS <= _artifacts(client, run.info.run_id)

    version = client.get_model_version_by_alias("clip-dfkd-demo-student", "candidate")
    assert version.run_id == run.info.run_id
    assert version.tags["generator"] == "diffusion:data/06_models/demo/tiny-stable-diffusion"
    model = mlflow.pyfunc.load_model("models:/clip-dfkd-demo-student@candidate")
    images = sorted((fresh_project / "data/01_raw/demo_shapes/photo").rglob("*.png"))[:4]
    by_path = model.predict(pd.DataFrame({"path": [str(p) for p in images]}))
    by_bytes = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    assert list(by_path.columns) == ["class_name", "probability"]
    assert set(by_path["class_name"]) <= {"ball", "box", "tent"}
    assert by_path["probability"].between(1 / 3, 1).all()
    pd.testing.assert_frame_equal(by_path, by_bytes)
