"""Every artefact that depends on the class list carries it, and a stage that reads one made
for other classes (or the same classes in another order) stops before any work."""

from __future__ import annotations

import mlflow
import pytest

from clip_dfkd.preflight import PreflightError

DEMO_CLASSES = ["ball", "box", "tent", "kite"]
REORDERED = ["kite", "tent", "box", "ball"]  # the silent failure: every class index shifts


def _run_count(project) -> int:
    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.fixture(scope="module")
def trained(demo_project):
    demo_project.run("student_distillation")
    return demo_project


def test_each_saved_table_and_the_student_carry_their_class_list(trained) -> None:
    catalog = trained.catalog()

    for table in ("prompt_table", "synthesis_manifest", "teacher_labels"):
        assert catalog.load(table).attrs["classes"] == DEMO_CLASSES, table
    assert catalog.load("student_model").class_names == DEMO_CLASSES


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
def test_a_stage_refuses_an_artefact_made_for_other_classes(trained, stage, artefact, rerun) -> None:
    runs_before = _run_count(trained)
    with pytest.raises(PreflightError) as caught, trained.session(runtime_params={"classes": REORDERED}) as session:
        session.run(pipeline_names=[stage])

    assert str(caught.value) == (
        f"{artefact} was made for classes {DEMO_CLASSES}, but classes={REORDERED}; "
        f"rerun `kedro run --pipelines={rerun}` to remake it for these classes"
    )
    assert _run_count(trained) == runs_before


def test_a_named_class_list_is_checked_like_a_written_one(trained) -> None:
    with pytest.raises(
        PreflightError, match=r"^prompt_table was made for classes \['ball', 'box', 'tent', 'kite'\], but "
    ):
        with trained.session(runtime_params={"classes": "vlcs"}) as session:
            session.run(pipeline_names=["image_synthesis"])
