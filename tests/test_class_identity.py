"""Every artefact that depends on the class list carries it, and a stage that reads one made
for other classes (or the same classes in another order), or one it cannot use at all, stops
before any work."""

from __future__ import annotations

import json

import mlflow
import pyarrow.parquet as pq
import pytest
from conftest import plumbing_params

from clip_dfkd.datasets import CLASSES_KEY
from clip_dfkd.models import student as student_module
from clip_dfkd.preflight import CLASS_CARRIERS, PreflightError
from clip_dfkd.rerun import kedro_run_command

DEMO_CLASSES = ["ball", "box", "tent", "kite"]
REORDERED = ["kite", "tent", "box", "ball"]  # the silent failure: every class index shifts
TABLES = {
    "prompt_table": "data/02_intermediate/prompt_table.parquet",
    "synthesis_manifest": "data/03_primary/synthesis_manifest.parquet",
    "teacher_labels": "data/04_feature/teacher_labels.parquet",
}


def _run_count(project) -> int:
    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.fixture(scope="module")
def trained(demo_project):
    demo_project.run("student_distillation")
    return demo_project


def test_each_saved_table_and_the_student_carry_their_class_list(trained, monkeypatch) -> None:
    catalog = trained.catalog()

    for table, path in TABLES.items():
        assert catalog.load(table).attrs["classes"] == DEMO_CLASSES, table
        # Under the project's own key in the Parquet footer, not pandas' copy of DataFrame.attrs.
        footer = pq.read_schema(trained.path / path).metadata
        assert footer[CLASSES_KEY] == json.dumps(DEMO_CLASSES).encode() and b"PANDAS_ATTRS" not in footer, table
    assert catalog.load("student_model").class_names == DEMO_CLASSES
    # Read from headers alone: neither a table's rows nor the student's weights.
    _forbid_reading_rows_and_weights(monkeypatch, CLASS_CARRIERS)
    assert {name: catalog[name].class_list() for name in CLASS_CARRIERS} == dict.fromkeys(CLASS_CARRIERS, DEMO_CLASSES)


def _forbid_reading_rows_and_weights(monkeypatch, artefacts) -> None:
    read_table = pq.read_table

    def rows_unless_forbidden(source, *args, **kwargs):
        name = getattr(source, "path", str(source))
        if any(name.endswith(f"/{artefact}.parquet") for artefact in artefacts):
            raise AssertionError(f"read the rows of {name}")
        return read_table(source, *args, **kwargs)

    def no_weights(*args, **kwargs):
        raise AssertionError("loaded the student's weights")

    monkeypatch.setattr(pq, "read_table", rows_unless_forbidden)
    monkeypatch.setattr(student_module, "load_file", no_weights)


@pytest.mark.parametrize(
    ("stage", "artefact", "rerun"),
    [
        ("image_synthesis", "prompt_table", "prompt_generation"),
        ("teacher_labeling", "synthesis_manifest", "prompt_generation,image_synthesis"),
        ("student_distillation", "teacher_labels", "prompt_generation,image_synthesis,teacher_labeling"),
        (
            "ood_evaluation",
            "student_model",
            "prompt_generation,image_synthesis,teacher_labeling,student_distillation",
        ),
    ],
)
def test_a_stage_refuses_an_artefact_made_for_other_classes(trained, stage, artefact, rerun, monkeypatch) -> None:
    runs_before = _run_count(trained)
    if artefact != "synthesis_manifest":  # whose image ids labelling checks on disk before it starts
        _forbid_reading_rows_and_weights(monkeypatch, [artefact])
    with pytest.raises(PreflightError) as caught, trained.session(runtime_params={"classes": REORDERED}) as session:
        session.run(pipeline_names=[stage])

    # With the run's env and parameters (tests/test_preflight.py checks how they are written).
    run = {"env": "demo", "runtime_params": plumbing_params({"classes": REORDERED})}
    assert str(caught.value) == (
        f"{artefact} was made for classes {DEMO_CLASSES}, but classes={REORDERED}; "
        f"rerun `{kedro_run_command(run, f'--pipelines={rerun}')}` to remake it for these classes"
    )
    assert _run_count(trained) == runs_before


def test_a_named_class_list_is_checked_like_a_written_one(trained) -> None:
    with pytest.raises(
        PreflightError, match=r"^prompt_table was made for classes \['ball', 'box', 'tent', 'kite'\], but "
    ):
        with trained.session(runtime_params={"classes": "vlcs"}) as session:
            session.run(pipeline_names=["image_synthesis"])


def test_a_stage_refuses_saved_inputs_it_cannot_use_and_says_how_to_remake_them(trained) -> None:
    """Images of the manifest gone, and a student saved by an older version: with the command
    that remakes them, in this run's env and with its parameters."""
    run = {"env": "demo", "runtime_params": plumbing_params()}
    images = sorted((trained.path / "data/03_primary/synthetic_images").rglob("*.png"))
    gone = images[0].with_suffix(".aside")
    config = trained.path / "data/06_models/student/config.json"
    saved = config.read_text()
    images[0].rename(gone)
    config.write_text(json.dumps({key: value for key, value in json.loads(saved).items() if key != "data_config"}))
    try:
        with pytest.raises(PreflightError) as labelling, trained.session() as session:
            session.run(pipeline_names=["teacher_labeling"])
        with pytest.raises(PreflightError) as evaluation, trained.session() as session:
            session.run(pipeline_names=["ood_evaluation"])
    finally:
        gone.rename(images[0])
        config.write_text(saved)

    image_id = str(images[0].relative_to(trained.path / "data/03_primary/synthetic_images").with_suffix(""))
    assert str(labelling.value) == (
        f"synthetic_images lacks 1 of the {len(images)} images in synthesis_manifest (first: {image_id!r}); "
        f"rerun `{kedro_run_command(run, '--pipelines=image_synthesis')}`"
    )
    retrain = kedro_run_command(run, "--pipelines=student_distillation")
    assert str(evaluation.value) == (
        f"{config}: no data_config (saved before preprocessing came from timm); allowed: a student saved by this "
        f"version, e.g. retrain with `{retrain}`"
    )
