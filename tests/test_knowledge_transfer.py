"""`kedro run --env=demo` on a fresh project (the README's first command), and proof that
knowledge transfers in the demo's world: the teacher, trained here on three drawing styles,
and the student, distilled from images inverted from that teacher alone, are both far above
chance on every benchmark domain, the unseen "night" style included.

The checks fail for the right reasons: with the teacher's labels permuted (which is what the
zero-shot head's classes in another order give, also checked), or with the student served
pixels normalised for another scale than it was trained on, the same check on the same
images fails (each fault is injected on purpose below).

Thresholds, from `python benchmarks/demo_transfer.py` on seeds 0-7 (each seed redraws the
world and retrains teacher and student; docs/demo.md, "Inversion budget"), with margin below
the seed-0 figures this test runs:
- teacher top-1 per domain: lowest 91 % over seeds 0-7; threshold 70 %;
- student top-1 per domain: seed 0 66-91 % (teacher trained on two torch threads), 57-86 % (one
  thread, as under pytest-xdist); lowest over seeds 0-7 (one thread) 50 %; threshold 40 %;
- student/teacher mean top-1: 0.73-0.84 over seeds 0-7 (seed 0: 0.74 on one thread); threshold
  0.6. A student of teacher-labelled noise reached at most 0.40 (measured with the earlier
  2-layer teacher and 4.9 M student; up to 44 % on a single domain, which is why the
  per-domain floor alone would not tell it apart);
- agreement with the teacher on the held-out night: seed 0 65 % (two threads), seeds 0-7 (one
  thread) 49-65 %; threshold 40 %.
The test runs seed 0 (the README's table).
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from metric_names import undocumented

pytestmark = pytest.mark.runs_the_whole_demo

CHANCE = 1 / 4  # four classes
# Below the lowest figures measured (module docstring).
TEACHER_MIN_TOP1 = 0.70
STUDENT_MIN_TOP1 = 0.40
STUDENT_MIN_SHARE_OF_TEACHER = 0.6
HELD_OUT_MIN_AGREEMENT = 0.40
HELD_OUT = "night"

EXPECTED_ARTIFACTS = {
    "prompt_generation/prompt_table.parquet",
    "image_synthesis/synthetic_sample_grid.png",
    "teacher_labeling/teacher_label_summary.csv",
    "ood_evaluation/ood_evaluation.csv",
    "ood_evaluation/ood_evaluation.md",
    "ood_evaluation/ood_accuracy.png",
    "ood_evaluation/ood_per_class_accuracy.csv",
    "ood_evaluation/ood_confusion_matrices.png",
    "ood_evaluation/ood_promotion.json",
    # MLflow tables, which the UI shows as tables and compares across runs
    "prompt_generation/prompt_table.json",
    "teacher_labeling/teacher_label_summary.json",
    "ood_evaluation/ood_evaluation_table.json",
}


@pytest.fixture(scope="module")
def demo_run(new_project) -> Path:
    """A project after `kedro run --env=demo`, run as a user runs it."""
    project = new_project("demo-run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}  # a log line per line
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env=demo"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, in the order a terminal shows it
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    (project / "terminal.log").write_text(result.stdout)
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
    if results.loc[HELD_OUT, "agreement"] < HELD_OUT_MIN_AGREEMENT:
        agreement = results.loc[HELD_OUT, "agreement"]
        problems.append(f"{HELD_OUT}: agreement with the teacher {agreement:.2f} < {HELD_OUT_MIN_AGREEMENT}")
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
    assert undocumented(metrics) == [], "metric names outside docs/tracking.md's Metric names table"
    results = _results(demo_run)
    for domain in results.index:
        logged = metrics[f"ood/demo_shapes/{domain}/student_top1"]
        assert logged == pytest.approx(results.loc[domain, "student_top1"]), domain
    history = client.get_metric_history(run.info.run_id, "training/total_loss")
    assert [m.step for m in history] == list(range(60))
    assert history[-1].value < history[0].value
    assert EXPECTED_ARTIFACTS <= _artifacts(client, run.info.run_id)

    version = client.get_model_version_by_alias("clip-dfkd-demo-student", "candidate")
    assert version.run_id == run.info.run_id
    assert version.tags["generator"] == "inversion:fourier"
    # The first evaluated version becomes champion and carries its evaluation.
    champion = client.get_model_version_by_alias("clip-dfkd-demo-student", "champion")
    assert champion.version == version.version
    average = results["student_top1"].mean()
    assert float(champion.tags["ood/demo_shapes/average/student_top1"]) == pytest.approx(average, abs=1e-5)
    assert champion.description.startswith(
        "A resnet10t(channels=[12, 24, 48, 96], stem_width=12) classifier of 4 classes (ball, box, tent, kite), "
        "distilled from the CLIP teacher "
        "open_clip:clip-dfkd-tiny/"
    )
    assert "\n\n---\n\n# Out-of-distribution evaluation" in champion.description
    # The run's description: the version it evaluated and why it holds @champion, what it is, the report.
    assert run.data.tags["mlflow.note.content"] == (
        f"**clip-dfkd-demo-student version {version.version}**: @champion -> clip-dfkd-demo-student version "
        f"{version.version} is the first evaluated version: ood/demo_shapes/average/student_top1 = {average:.4f}"
        f"\n\n{champion.description}"
    )
    # The logged model carries the final epoch's training metrics and the evaluation, nothing else.
    logged_model = client.get_logged_model(champion.source.removeprefix("models:/"))
    carried = {m.key: m for m in logged_model.metrics}
    assert carried["training/total_loss"].step == 59
    assert carried["training/total_loss"].value == pytest.approx(history[-1].value)
    assert carried["ood/demo_shapes/night/student_top1"].value == pytest.approx(results.loc["night", "student_top1"])
    assert {key.split("/")[0] for key in carried} == {"training", "ood"}


def test_the_terminal_tells_the_runs_story(demo_run: Path) -> None:
    """conf/logging.yml: the project's lines and the node progress, no per-dataset lines, and
    last lines that say where the results are."""
    lines = [line for line in (demo_run / "terminal.log").read_text().splitlines() if " INFO " in line]
    messages = [line.split(" INFO ", 1)[1].strip() for line in lines]
    assert not any(m.startswith(("Loading data from", "Saving data to")) for m in messages)
    assert any(m.startswith("Completed 24 out of 24 tasks") for m in messages)
    assert any(m.startswith("data-free, demo_shapes/night: student top-1") for m in messages)
    run_line, registered, reports = messages[-3:]
    assert run_line.startswith("MLflow run vanilla prompts · inversion · all stages · demo (finished): mlflow ui ")
    database = demo_run.resolve() / "mlflow.db"
    assert f"--backend-store-uri sqlite:///{database}, then experiment clip-dfkd-demo" in run_line
    assert registered.startswith("Registered model clip-dfkd-demo-student version 1 (@candidate, @champion)")
    assert reports.startswith(f"Reports: {demo_run.resolve() / 'data/08_reporting'}")
    # 161 INFO lines with conf/logging.yml, 308 without (the per-dataset lines).
    assert len(lines) < 200, f"{len(lines)} INFO lines"


def test_the_registered_student_reproduces_the_evaluations_predictions(demo_run: Path, monkeypatch) -> None:
    import mlflow

    monkeypatch.chdir(demo_run)
    mlflow.set_tracking_uri(f"sqlite:///{demo_run / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/clip-dfkd-demo-student@champion")
    evaluated = pd.read_parquet(demo_run / "data/07_model_output/ood_predictions.parquet")
    assert len(evaluated) == 400

    served = model.predict(pd.DataFrame({"path": evaluated["path"]}))
    by_bytes = model.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in evaluated["path"][:40]]}))

    assert served["class_name"].tolist() == evaluated["student_prediction"].tolist()
    pd.testing.assert_frame_equal(by_bytes, served.iloc[:40])
    assert served["probability"].between(CHANCE, 1).all()


def test_the_student_is_smaller_than_the_teachers_image_tower(distillation_inputs) -> None:
    """What distillation promises: the served classifier (backbone and head; the embedding
    projection is used in training only) holds fewer parameters than the image tower it
    replaces. Their speed, side by side: `python benchmarks/stages.py --stages` (docs/demo_student.md)."""
    student = distillation_inputs["student"]
    tower = distillation_inputs["teacher"].model.visual
    student_size = sum(p.numel() for p in student.backbone.parameters())
    tower_size = sum(p.numel() for p in tower.parameters())
    assert student_size < 0.7 * tower_size, (student_size, tower_size)


# --- faults injected on purpose ---------------------------------------------------------


@pytest.fixture(scope="module")
def distillation_inputs(demo_run: Path):
    """The demo run's synthetic images, labels, loaded teacher and distilled student, and
    the demo's own student recipe, with which the faulty students below are trained."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from clip_dfkd.models import load_teacher
    from clip_dfkd.params import (
        ClassNames,
        OodEvaluationParams,
        RuntimeParams,
        StudentDistillationParams,
        TeacherParams,
    )
    from clip_dfkd.runtime import Runtime

    bootstrap_project(demo_run)
    # Catalog and parameter paths are relative to the project, as in a run.
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.chdir(demo_run))
    with KedroSession.create(project_path=demo_run, env="demo") as session:
        catalog = session.load_context().catalog
        parameters = catalog.load("parameters")
        images = catalog.load("synthetic_images")
        labels = catalog.load("teacher_labels")
        view_labels = catalog.load("teacher_view_labels")
        manifest = catalog.load("synthesis_manifest")
        student = catalog.load("student_model")
        teacher_cache = catalog.load("ood_teacher_cache")
    runtime = RuntimeParams.model_validate(parameters["runtime"])
    teacher_params = TeacherParams.model_validate(parameters["teacher"])
    teacher = load_teacher(teacher_params, Runtime.resolve(runtime))
    classes = ClassNames.model_validate(parameters["classes"])
    inputs = {
        "images": images,
        "labels": labels,
        "view_labels": view_labels,
        "manifest": manifest,
        "teacher": teacher,
        "teacher_params": teacher_params,
        "head": teacher.zero_shot_weights(list(classes), teacher_params.templates),
        "classes": classes,
        "runtime": runtime,
        "student": student,
        "teacher_cache": teacher_cache,
        "student_params": StudentDistillationParams.model_validate(parameters["student_distillation"]),
        "evaluation": OodEvaluationParams.model_validate(parameters["ood_evaluation"]),
    }
    with stack:
        yield inputs


def _train(inputs, labels: pd.DataFrame, view_labels: pd.DataFrame):
    from clip_dfkd.pipelines.student_distillation.nodes import train_student

    student, _ = train_student(
        inputs["images"],
        labels,
        view_labels,
        inputs["classes"],
        inputs["teacher_params"],
        inputs["student_params"],
        inputs["runtime"],
    )
    return student


def _evaluate(inputs, student) -> pd.DataFrame:
    """The evaluation's nodes in the pipeline's order; the teacher's side comes from the demo
    run's cache."""
    from clip_dfkd.pipelines.ood_evaluation.few_shot import draw_few_shot
    from clip_dfkd.pipelines.ood_evaluation.scoring import (
        index_benchmarks,
        predict_student,
        predict_teacher,
        score_domains,
    )

    index, listed_skips = index_benchmarks(inputs["classes"], inputs["evaluation"])
    teacher = predict_teacher(
        index,
        inputs["classes"],
        inputs["teacher_params"],
        inputs["evaluation"],
        inputs["runtime"],
        inputs["teacher_cache"],
    )
    predictions = predict_student(index, student, inputs["evaluation"], inputs["runtime"])
    _, few_shot_index = draw_few_shot(index, inputs["classes"], inputs["evaluation"])  # k = 0: nothing
    few_shot = predict_student(few_shot_index, student, inputs["evaluation"], inputs["runtime"])
    results, _, _ = score_domains(
        index, listed_skips, teacher, predictions, few_shot_index, few_shot, inputs["classes"], inputs["evaluation"]
    )
    return results.set_index("domain")


def _rotated(vectors: pd.Series) -> pd.Series:
    """Each row's per-class values moved one class on: every class gets another's score."""
    return vectors.map(lambda v: torch.roll(torch.tensor(v), 1).numpy())


def _permuted_labels(inputs) -> pd.DataFrame:
    labels = inputs["labels"].copy()
    labels["teacher_logits"] = _rotated(labels["teacher_logits"])
    return labels


def _student_of_permuted_labels(inputs):
    """Trained with the demo's recipe on labels whose classes are rotated, in the labels its
    teacher_targets reads (the demo replays stored views)."""
    assert inputs["student_params"].teacher_targets == "stored_views"
    view_labels = inputs["view_labels"].assign(teacher_logits=_rotated(inputs["view_labels"]["teacher_logits"]))
    return _train(inputs, _permuted_labels(inputs), view_labels)


def _student_of_views_of_other_images(inputs):
    """Trained on stored views replayed with the targets of another image's views, as a join of
    views to images in the wrong order would give: images are listed class by class, so a
    shift by half the list gives most of them another class's targets."""
    view_labels = inputs["view_labels"]
    ids = list(dict.fromkeys(view_labels["image_id"]))
    shifted = dict(zip(ids, ids[len(ids) // 2 :] + ids[: len(ids) // 2], strict=True))
    return _train(inputs, inputs["labels"], view_labels.assign(image_id=view_labels["image_id"].map(shifted)))


def _labels_from_a_shuffled_head(inputs) -> pd.DataFrame:
    from clip_dfkd.params import TeacherLabelingParams
    from clip_dfkd.pipelines.teacher_labeling.nodes import teacher_labels

    head = torch.roll(inputs["head"], 1, dims=0)  # the zero-shot head's classes in another order
    return teacher_labels(
        inputs["images"],
        inputs["manifest"],
        inputs["teacher"],
        head,
        inputs["teacher_params"].batch_size,
        TeacherLabelingParams(),
    )


def _demo_student_served_with_another_crop(inputs):
    """The demo's student served a centre crop of half its input's side (``crop_pct`` 0.5
    instead of the one it was trained with), a classic preprocessing mismatch between training
    and serving. (The former fault here, pixels on a 0-255 scale normalised with 0-1
    statistics, went unnoticed once the student learnt from stored views: 55-93 % of the
    teacher's top-1 per domain at seed 0. A ReLU network is nearly invariant to scaling its
    input, so that fault is close to serving without mean subtraction.)"""
    student = copy.deepcopy(inputs["student"])
    student.config["data_config"] = {**student.config["data_config"], "crop_pct": 0.5}
    return student


FAULTY_STUDENTS = {
    "permuted teacher labels": _student_of_permuted_labels,
    "stored views replayed with other images' targets": _student_of_views_of_other_images,
    "half-size centre crop when served": _demo_student_served_with_another_crop,
}


def test_a_shuffled_zero_shot_head_labels_as_the_permuted_labels_do(distillation_inputs) -> None:
    """The zero-shot head's classes in another order, through the labelling node's own code,
    give every image the permuted teacher labels: the student of those labels is the one the
    transfer check below catches (trained once: a second student of the same labels would
    add 70-90 s to the suite and nothing to the proof)."""
    import numpy as np

    shuffled = _labels_from_a_shuffled_head(distillation_inputs).set_index("image_id")
    permuted = _permuted_labels(distillation_inputs).set_index("image_id").loc[shuffled.index]

    np.testing.assert_allclose(
        np.stack(shuffled["teacher_logits"].to_numpy()),
        np.stack(permuted["teacher_logits"].to_numpy()),
        rtol=1e-4,
        atol=1e-4,
    )
    demo = distillation_inputs["labels"].set_index("image_id").loc[shuffled.index]
    assert (shuffled["teacher_prediction"] == (demo["teacher_prediction"] + 1) % 4).all()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", [None, *FAULTY_STUDENTS])
def test_the_transfer_check_fails_exactly_when_a_fault_is_injected(demo_run, distillation_inputs, fault) -> None:
    """The control is the demo's own student, evaluated again in-process; a faulty student
    is trained with the demo's own recipe, so only the fault tells it apart."""
    inputs = distillation_inputs
    student = inputs["student"] if fault is None else FAULTY_STUDENTS[fault](inputs)

    results = _evaluate(inputs, student)

    problems = _transfer_problems(results)
    if fault is None:
        pd.testing.assert_series_equal(results["student_top1"], _results(demo_run)["student_top1"])
        assert problems == [], results
    else:
        assert problems, f"{fault} went unnoticed:\n{results}"


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


# --- few-shot: what a few real images teach ---------------------------------------------

# Measured on the seed-0 demo, the demo's student with its classifier's rows rotated (it sees
# the shapes but names every one wrong), after a linear probe on 5 true-labelled photos per
# class (draw seed 0), per held-out domain: 0.52-0.86 with the demo trained on one torch thread
# (as under pytest-xdist on two cores), 0.63-0.79 on two; with the photos' labels rotated as
# well (the fault): 0.05-0.20. Night, the domain the narrow student separates least, sets the
# floor. At learning rate 1e-2 the probe had not moved far enough in 30 steps (0.23-0.45).
FEW_SHOT_MIN_TOP1 = 0.4
FEW_SHOT_PROBE = {
    "k": 5,
    "source_domains": {"demo_shapes": ["photo"]},
    "kd_weight": 0.0,  # the true labels alone must teach it
    "layers": "classifier",
    "training": {"epochs": 30, "batch_size": 32, "learning_rate": 3.0e-2},
}


def _few_shot_top1(inputs, student, few_shot: dict, rotate_shot_labels: bool = False, fine_tune: bool = True):
    """Per held-out domain, the top-1 of ``student`` fine-tuned by the few-shot nodes with the
    ``few_shot`` parameters (or, with ``fine_tune`` false, of ``student`` itself)."""
    from clip_dfkd.params import OodEvaluationParams
    from clip_dfkd.pipelines.ood_evaluation.few_shot import draw_few_shot, fine_tune_student
    from clip_dfkd.pipelines.ood_evaluation.scoring import index_benchmarks, predict_student

    evaluation = OodEvaluationParams.model_validate({**inputs["evaluation"].model_dump(), "few_shot": few_shot})
    index, _ = index_benchmarks(inputs["classes"], evaluation)
    shots, held_out = draw_few_shot(index, inputs["classes"], evaluation)
    if rotate_shot_labels:
        shots = shots.assign(label=(shots["label"] + 1) % len(inputs["classes"]))
    if fine_tune:
        student, _ = fine_tune_student(
            student, shots, inputs["classes"], inputs["teacher_params"], evaluation, inputs["runtime"]
        )
    scored = held_out.merge(predict_student(held_out, student, evaluation, inputs["runtime"]), on="path")
    return (scored["student_label"] == scored["label"]).groupby(scored["domain"]).mean()


@pytest.mark.parametrize("rotate_shot_labels", [False, True], ids=["true labels", "fault: rotated labels"])
def test_a_few_labelled_photos_teach_a_student_that_names_every_shape_wrong(
    distillation_inputs, rotate_shot_labels
) -> None:
    inputs = distillation_inputs
    student = copy.deepcopy(inputs["student"])
    classifier = student.backbone.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(classifier.weight.roll(1, dims=0))
        classifier.bias.copy_(classifier.bias.roll(1, dims=0))

    top1 = _few_shot_top1(inputs, student, FEW_SHOT_PROBE, rotate_shot_labels)

    assert sorted(top1.index) == ["cartoon", "night", "sketch"]  # photo gave the shots
    if rotate_shot_labels:
        assert (top1 < FEW_SHOT_MIN_TOP1).all(), top1
    else:
        assert (top1 >= FEW_SHOT_MIN_TOP1).all(), top1


# The few-shot defaults were chosen with benchmarks/demo_transfer.py on seeds 0-3
# (docs/few_shot.md): a copy of the demo's student fine-tuned, as configured, on 5 photos per
# class must not score lower than the student itself on any domain that gave no shot, three
# drawings in a hundred forgiven. Measured on the seed-0 demo, per domain (cartoon, night,
# sketch), trained on one / two torch threads: configured 0/0/0 and 0/0/0 points; the fault,
# every layer at ten times the learning rate, -1/-21/-10 and -26/-18/-28. (The default before,
# every layer at 1e-4, gave +1/+4/+4 and -6/+3/-3 with this narrow student: not reliably harmful
# any more, so no longer the fault.)
FEW_SHOT_SHOTS = {"k": 5, "source_domains": {"demo_shapes": ["photo"]}}
FEW_SHOT_MAX_DROP = 0.03


@pytest.mark.parametrize("fault", [False, True], ids=["configured", "fault: all layers at 1e-3"])
def test_few_shot_as_configured_lowers_no_domain_that_gave_no_shot(distillation_inputs, fault) -> None:
    inputs = distillation_inputs
    configured = inputs["evaluation"].few_shot.model_dump() | FEW_SHOT_SHOTS
    if fault:
        configured["layers"] = "all"
        configured["training"]["learning_rate"] = 1.0e-3
    data_free = _few_shot_top1(inputs, inputs["student"], configured, fine_tune=False)
    few_shot = _few_shot_top1(inputs, inputs["student"], configured)

    lowest = (few_shot - data_free).min()
    if fault:
        assert lowest < -FEW_SHOT_MAX_DROP, (data_free, few_shot)
    else:
        assert lowest >= -FEW_SHOT_MAX_DROP, (data_free, few_shot)
