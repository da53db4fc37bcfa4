"""The promotion alias (champion) moves only to a better evaluated student."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from clip_dfkd.params import OodEvaluationParams
from clip_dfkd.promotion import promote_if_better
from clip_dfkd.tracking import class_list_fingerprint, class_list_tags

NAME = "clip-dfkd-student"
CLASSES = ["ball", "box", "tent", "kite"]
ROOTS = {"pacs": "/data/pacs", "vlcs": "/data/vlcs"}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty sqlite MLflow store, its tables made once: a copy opens in a tenth of a second,
    where making the tables takes over a second."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_registered_models()
    return path


@pytest.fixture
def registry(tmp_path, empty_store: Path) -> MlflowClient:
    """A fresh sqlite registry with three versions of one model, registered for CLASSES."""
    uri = f"sqlite:///{shutil.copy(empty_store, tmp_path / 'mlflow.db')}"
    mlflow.set_tracking_uri(uri)  # the registry that promote_if_better's client talks to
    client = MlflowClient(uri)
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(tmp_path), tags=class_list_tags(CLASSES))
    return client


def _params(**promotion) -> OodEvaluationParams:
    return OodEvaluationParams.model_validate(
        {"benchmarks": {"pacs": {"root": "a"}, "vlcs": {"root": "b"}}, "promotion": promotion}
    )


def _table(pacs: float, vlcs: float = 0.5, pacs_root: str = ROOTS["pacs"]) -> pd.DataFrame:
    rows = [
        {"benchmark": benchmark, "root": root, "domain": domain, "student_top1": top1, "teacher_top1": 0.9}
        for benchmark, root, top1 in (("pacs", pacs_root, pacs), ("vlcs", ROOTS["vlcs"], vlcs))
        for domain in ("photo", "average")
    ]
    table = pd.DataFrame(rows)
    return table.assign(agreement=table["student_top1"], student_teacher_ratio=table["student_top1"] / 0.9)


def _evaluate(
    version: str, table: pd.DataFrame, params: OodEvaluationParams | None = None, classes: list[str] = CLASSES
) -> dict:
    student = {"registered_model": NAME, "version": version, "reason": None, "config": {"class_names": classes}}
    return promote_if_better(student, table, f"# report of version {version}", params or _params())


def _champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_the_first_evaluated_version_becomes_champion_and_carries_its_evaluation(registry) -> None:
    decision = _evaluate("1", _table(0.6))

    assert _champion(registry) == "1" and decision["holds_alias"]
    assert decision["reason"].startswith(f"@champion -> {NAME} version 1 is the first evaluated version")
    version = registry.get_model_version(NAME, "1")
    assert version.tags["ood/pacs/average/student_top1"] == "0.6"
    assert version.tags["ood/vlcs/photo/agreement"] == "0.5"
    assert version.description == "# report of version 1"


def test_the_champion_stays_on_a_worse_student_and_moves_to_a_better_one(registry) -> None:
    _evaluate("1", _table(0.6))

    worse = _evaluate("2", _table(0.55, vlcs=0.99))  # better on vlcs, which does not decide
    assert _champion(registry) == "1" and not worse["holds_alias"]
    assert worse["reason"] == (f"@champion stays on {NAME} version 1: ood/pacs/average/student_top1 0.5500 <= 0.6000")
    assert registry.get_model_version(NAME, "2").tags["ood/pacs/average/student_top1"] == "0.55"

    better = _evaluate("3", _table(0.7))
    assert _champion(registry) == "3" and better["holds_alias"]
    assert "beats version 1" in better["reason"]


def test_the_deciding_benchmark_metric_and_margin_are_configurable(registry) -> None:
    params = _params(benchmark="vlcs", min_improvement=0.05)
    _evaluate("1", _table(0.6, vlcs=0.5), params)

    assert not _evaluate("2", _table(0.9, vlcs=0.54), params)["holds_alias"]  # within the margin
    assert _evaluate("3", _table(0.1, vlcs=0.56), params)["holds_alias"]
    assert _champion(registry) == "3"


def test_an_unregistered_student_is_not_promoted(registry) -> None:
    student = {"registered_model": None, "version": None, "reason": "fingerprint differs"}

    decision = promote_if_better(student, _table(0.9), "", _params())

    assert not decision["holds_alias"]
    assert decision["reason"] == "not promoted: the evaluated student is no registered version (fingerprint differs)"
    assert "champion" not in registry.get_registered_model(NAME).aliases


def test_a_promotion_benchmark_that_is_not_evaluated_fails_on_one_line() -> None:
    from clip_dfkd.params import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=r"^ood_evaluation.promotion.benchmark='domainnet': not an enabled"):
        _params(benchmark="domainnet")


def test_a_new_evaluation_replaces_the_report_under_the_versions_own_description(registry) -> None:
    registry.update_model_version(NAME, "2", description="A resnet18 classifier of 7 classes.")

    _evaluate("2", _table(0.6))
    decision = promote_if_better(
        {"registered_model": NAME, "version": "2", "reason": None, "config": {"class_names": CLASSES}},
        _table(0.7),
        "# second report",
        _params(),
    )

    assert decision["holds_alias"]
    assert registry.get_model_version(NAME, "2").description == (
        "A resnet18 classifier of 7 classes.\n\n---\n\n# second report"
    )


def test_the_champion_never_moves_to_a_version_of_another_class_list(registry) -> None:
    """Not even with a better figure of the same benchmark folder: ``models:/…@champion``
    would change its classes."""
    _evaluate("1", _table(0.6))
    other = ["dog", "elephant"]
    registry.create_model_version(NAME, source="elsewhere", tags=class_list_tags(other))

    decision = _evaluate("4", _table(0.9), classes=other)

    assert _champion(registry) == "1" and not decision["holds_alias"]
    assert decision["reason"] == (
        f"@champion stays on {NAME} version 1: version 4 was made for classes [dog, elephant] "
        f"({class_list_fingerprint(other)}), version 1 for [ball, box, tent, kite] "
        f"({class_list_fingerprint(CLASSES)}); not compared"
    )
    # Its evaluation is recorded all the same, with the folder each benchmark was read from.
    tags = registry.get_model_version(NAME, "4").tags
    assert (tags["ood/pacs/average/student_top1"], tags["ood/vlcs/root"]) == ("0.9", "/data/vlcs")


def test_a_holder_registered_before_the_class_fingerprint_is_compared_by_its_classes_tag(registry) -> None:
    _evaluate("1", _table(0.6))
    registry.delete_model_version_tag(NAME, "1", "classes_fingerprint")

    assert _evaluate("2", _table(0.7))["holds_alias"]

    registry.delete_model_version_tag(NAME, "2", "classes_fingerprint")
    registry.delete_model_version_tag(NAME, "2", "classes")
    unknown = _evaluate("3", _table(0.8))
    assert _champion(registry) == "2"
    assert unknown["reason"] == (
        f"@champion stays on {NAME} version 2: version 2 records no class list (no classes or "
        "classes_fingerprint tag), version 3 was made for classes [ball, box, tent, kite]; not compared"
    )


def test_a_holder_without_the_deciding_figure_of_the_same_folder_is_not_compared(registry) -> None:
    _evaluate("1", _table(0.6))

    elsewhere = _evaluate("2", _table(0.9, pacs_root="/other/pacs"))
    assert elsewhere["reason"] == (
        f"@champion stays on {NAME} version 1: version 2 was evaluated on pacs at /other/pacs, version 1 at "
        "/data/pacs; not compared"
    )
    registry.delete_model_version_tag(NAME, "1", "ood/pacs/root")
    unrecorded = _evaluate("2", _table(0.9))
    assert unrecorded["reason"] == (
        f"@champion stays on {NAME} version 1: version 1's ood/pacs/average/student_top1 names no pacs folder "
        "(evaluated before the folder was recorded); not compared"
    )
    # The case: a version with no figure of the deciding benchmark was beaten by default.
    registry.delete_model_version_tag(NAME, "1", "ood/pacs/average/student_top1")
    unmeasured = _evaluate("3", _table(0.9))
    assert unmeasured["reason"] == (
        f"@champion stays on {NAME} version 1: version 1 has no ood/pacs/average/student_top1 (it was not "
        "evaluated on pacs); not compared"
    )
    assert _champion(registry) == "1"
