"""`kedro run --env=demo` on a fresh project (the README's first command), and proof that
knowledge transfers in the demo's world: the teacher, trained here on three drawing styles,
and the student, distilled from images inverted from that teacher alone, are both far above
chance on every benchmark domain, the unseen "night" style included.

The checks fail for the right reasons: with the teacher's labels permuted, with the
zero-shot head's classes in another order, or with the student served with other
normalisation than it was trained with, the same check on the same images fails (each fault
is injected on purpose below). Thresholds, with margin: the teacher reached 83–97 % per
style on fresh drawings over demo seeds 0–2; the demo's student at seed 0 reached 65–94 % per
domain (README), and 46–94 % per domain in a cheaper 20-epoch run measured while tuning.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

CHANCE = 1 / 4  # four classes
# Below the lowest figures measured (module docstring).
TEACHER_MIN_TOP1 = 0.80
STUDENT_MIN_TOP1 = 0.45
STUDENT_MIN_SHARE_OF_TEACHER = 0.6
HELD_OUT = "night"

EXPECTED_ARTIFACTS = {
    "prompt_generation/prompt_table.parquet",
    "image_synthesis/synthetic_sample_grid.png",
    "teacher_labeling/teacher_label_summary.csv",
    "ood_evaluation/ood_evaluation.csv",
    "ood_evaluation/ood_evaluation.md",
    "ood_evaluation/ood_accuracy.png",
}


@pytest.fixture(scope="module")
def demo_run(new_project) -> Path:
    """A project after `kedro run --env=demo`, run as a user runs it."""
    project = new_project("demo-run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env=demo"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project


def _results(project: Path) -> pd.DataFrame:
    return pd.read_parquet(project / "data/07_model_output/ood_domain_results.parquet").set_index("domain")


def _transfer_problems(results: pd.DataFrame) -> list[str]:
    """Why ``results`` (one row per domain) do not show knowledge transfer; empty if they do."""
    problems = [
        f"{domain}: student top-1 {row.student_top1:.2f} < {STUDENT_MIN_TOP1}"
        for domain, row in results.iterrows()
        if row.student_top1 < STUDENT_MIN_TOP1
    ]
    share = results["student_top1"].mean() / results["teacher_top1"].mean()
    if share < STUDENT_MIN_SHARE_OF_TEACHER:
        problems.append(f"student/teacher top-1 {share:.2f} < {STUDENT_MIN_SHARE_OF_TEACHER}")
    if results.loc[HELD_OUT, "agreement"] < STUDENT_MIN_TOP1:
        problems.append(f"{HELD_OUT}: agreement with the teacher {results.loc[HELD_OUT, 'agreement']:.2f}")
    return problems


@pytest.mark.timeout(1000)
def test_teacher_and_student_are_far_above_chance_on_every_domain(demo_run: Path) -> None:
    results = _results(demo_run)

    assert sorted(results.index) == ["cartoon", "night", "photo", "sketch"]
    assert (results["teacher_top1"] >= TEACHER_MIN_TOP1).all(), results
    assert _transfer_problems(results) == [], results
    assert (results["student_top1"] > CHANCE + 0.2).all()


def test_the_run_is_tracked_and_registers_its_student(demo_run: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{demo_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("clip-dfkd-demo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["teacher.model_name"] == "clip-dfkd-tiny"
    assert params["image_synthesis.backend"] == "inversion"
    assert params["student_distillation.training.epochs"] == "60"
    metrics = run.data.metrics
    results = _results(demo_run)
    for domain in results.index:
        logged = metrics[f"ood_evaluation.demo_shapes.{domain}.student_top1"]
        assert logged == pytest.approx(results.loc[domain, "student_top1"]), domain
    history = client.get_metric_history(run.info.run_id, "student_distillation.total_loss")
    assert [m.step for m in history] == list(range(60))
    assert history[-1].value < history[0].value
    assert EXPECTED_ARTIFACTS <= _artifacts(client, run.info.run_id)

    version = client.get_model_version_by_alias("clip-dfkd-demo-student", "candidate")
    assert version.run_id == run.info.run_id
    assert version.tags["generator"] == "inversion:fourier"


def test_the_registered_student_reproduces_the_evaluations_predictions(demo_run: Path, monkeypatch) -> None:
    import mlflow

    monkeypatch.chdir(demo_run)
    mlflow.set_tracking_uri(f"sqlite:///{demo_run / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/clip-dfkd-demo-student@candidate")
    evaluated = pd.read_parquet(demo_run / "data/07_model_output/ood_predictions.parquet")
    assert len(evaluated) == 400

    served = model.predict(pd.DataFrame({"path": evaluated["path"]}))
    by_bytes = model.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in evaluated["path"][:40]]}))

    assert served["class_name"].tolist() == evaluated["student_prediction"].tolist()
    pd.testing.assert_frame_equal(by_bytes, served.iloc[:40])
    assert served["probability"].between(CHANCE, 1).all()


# --- faults injected on purpose ---------------------------------------------------------


@pytest.fixture(scope="module")
def distillation_inputs(demo_run: Path):
    """The demo run's synthetic images, labels and loaded teacher, and a cheaper student
    recipe (20 epochs) for the students trained below."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from clip_dfkd.params import (
        ClassNames,
        OodEvaluationParams,
        RuntimeParams,
        StudentDistillationParams,
        TeacherParams,
    )
    from clip_dfkd.pipelines.teacher_labeling.nodes import build_zero_shot_head, load_teacher_model

    bootstrap_project(demo_run)
    # Catalog and parameter paths are relative to the project, as in a run.
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.chdir(demo_run))
    with KedroSession.create(project_path=demo_run, env="demo") as session:
        catalog = session.load_context().catalog
        parameters = catalog.load("parameters")
        images = catalog.load("synthetic_images")
        labels = catalog.load("teacher_labels")
        manifest = catalog.load("synthesis_manifest")
    runtime = RuntimeParams.model_validate(parameters["runtime"])
    teacher_params = TeacherParams.model_validate(parameters["teacher"])
    teacher = load_teacher_model(teacher_params, runtime)
    classes = ClassNames.model_validate(parameters["classes"])
    student_params = StudentDistillationParams.model_validate(parameters["student_distillation"])
    inputs = {
        "images": images,
        "labels": labels,
        "manifest": manifest,
        "teacher": teacher,
        "teacher_params": teacher_params,
        "head": build_zero_shot_head(teacher, classes, teacher_params),
        "classes": classes,
        "runtime": runtime,
        "student_params": student_params.model_copy(
            update={"training": student_params.training.model_copy(update={"epochs": 20})}
        ),
        "evaluation": OodEvaluationParams.model_validate(parameters["ood_evaluation"]),
    }
    with stack:
        yield inputs


def _train_and_evaluate(inputs, labels: pd.DataFrame, mutate_student=None) -> pd.DataFrame:
    from clip_dfkd.pipelines.ood_evaluation.nodes import evaluate_domains
    from clip_dfkd.pipelines.student_distillation.nodes import train_student

    student, _ = train_student(inputs["images"], labels, inputs["classes"], inputs["student_params"], inputs["runtime"])
    if mutate_student is not None:
        mutate_student(student)
    results, _, _ = evaluate_domains(
        student, inputs["teacher"], inputs["head"], inputs["classes"], inputs["evaluation"], inputs["runtime"]
    )
    return results.set_index("domain")


def _rotated(vectors: pd.Series) -> pd.Series:
    """Each row's per-class values moved one class on: every class gets another's score."""
    return vectors.map(lambda v: torch.roll(torch.as_tensor(v), 1).numpy())


def _permuted_labels(inputs) -> pd.DataFrame:
    labels = inputs["labels"].copy()
    labels["teacher_logits"] = _rotated(labels["teacher_logits"])
    labels["teacher_probs"] = _rotated(labels["teacher_probs"])
    return labels


def _labels_from_a_shuffled_head(inputs) -> pd.DataFrame:
    from clip_dfkd.params import TeacherLabelingParams
    from clip_dfkd.pipelines.teacher_labeling.nodes import label_images

    head = torch.roll(inputs["head"], 1, dims=0)  # the zero-shot head's classes in another order
    return label_images(
        inputs["images"],
        inputs["manifest"],
        inputs["teacher"],
        head,
        inputs["teacher_params"],
        TeacherLabelingParams(),
    )


def _served_with_other_normalisation(student) -> None:
    # Trained with the backbone's ImageNet mean/std; served with none.
    student.config["data_config"] = {**student.config["data_config"], "mean": [0.0] * 3, "std": [1.0] * 3}


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "fault",
    [None, "permuted teacher labels", "shuffled zero-shot head", "other normalisation when served"],
)
def test_the_transfer_check_fails_exactly_when_a_fault_is_injected(distillation_inputs, fault) -> None:
    inputs = distillation_inputs
    labels = {
        "permuted teacher labels": _permuted_labels,
        "shuffled zero-shot head": _labels_from_a_shuffled_head,
    }.get(fault, lambda inputs: inputs["labels"])(inputs)
    mutate = _served_with_other_normalisation if fault == "other normalisation when served" else None

    results = _train_and_evaluate(inputs, labels, mutate)

    problems = _transfer_problems(results)
    if fault is None:
        assert problems == [], results
    else:
        assert problems, f"{fault} went unnoticed:\n{results}"


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found
