"""The registry's "better students only" alias.

Every registered student keeps the candidate alias of its own run; a second alias (champion by
default) moves to a new version only when its evaluation beats the version holding it, and
only a comparable holder is beaten: one made for the same class list (``models:/…@champion``
never changes its classes) and scored on the deciding benchmark read from the same folder.
Otherwise the alias stays and the decision says why. Each evaluated version carries its
evaluation: the metrics (on its MLflow logged model and as version tags, which the registry
page shows and a promotion compares), the folder each benchmark was read from, and the report
as its description.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from clip_dfkd.models import StudentClassifier
from clip_dfkd.models.student import student_fingerprint
from clip_dfkd.params import DATA_FREE, OodEvaluationParams
from clip_dfkd.tracking import (
    CLASSES_FINGERPRINT_TAG,
    CLASSES_TAG,
    class_list_fingerprint,
    describe_run,
    describe_version,
    link_latest_metrics,
    shown_classes,
)

logger = logging.getLogger(__name__)

# The names ood_evaluation logs its metrics under (catalog: ood_evaluation_metrics, prefix
# "ood"); the "average" domain decides promotion.
FIGURE_TAG = "ood/{benchmark}/{domain}/{metric}"
# The folder those figures were read from (the evaluation table's root, absolute).
ROOT_TAG = "ood/{benchmark}/root"


def describe_evaluated_student(student: StudentClassifier, registration: dict[str, Any]) -> dict[str, Any]:
    """Which student the evaluation scored: its config, its weights' fingerprint and, when the
    saved registration (``student_registration``) carries the same fingerprint, the
    registered model name, version and MLflow run. A registration without a fingerprint, or
    with another one, may be for a different student (the student folder can be retrained or
    replaced after registering), so it is not claimed; ``reason`` says why."""
    fingerprint = student_fingerprint(student)
    record: dict[str, Any] = {
        "config": dict(student.config),
        "fingerprint": fingerprint,
        "registered_model": None,
        "version": None,
        "run_id": None,
        "reason": None,
    }
    registered = registration.get("fingerprint")
    if registered == fingerprint:
        record.update(
            registered_model=registration["name"], version=registration["version"], run_id=registration["run_id"]
        )
    elif registered is None:
        record["reason"] = (
            f"student_registration of {registration.get('name')} version {registration.get('version')} records "
            "no fingerprint, so it cannot be matched to the evaluated student"
        )
    else:
        record["reason"] = (
            f"student_registration of {registration.get('name')} version {registration.get('version')} is for a "
            f"student with fingerprint {registered}, not the evaluated {fingerprint}"
        )
    if record["reason"]:
        logger.warning("Evaluated student %s is not matched to a registered model: %s", fingerprint, record["reason"])
    return record


def promote_student(
    evaluated_student: dict[str, Any], evaluation_table: pd.DataFrame, report: str, params: OodEvaluationParams
) -> dict[str, Any]:
    """Record the evaluation on the scored student's registered version and move the
    promotion alias (``champion``) to it only when it beats the version holding it. Only the
    data-free rows score that version; a few-shot student is another model."""
    data_free = evaluation_table[evaluation_table["setting"] == DATA_FREE]
    decision = promote_if_better(evaluated_student, data_free, report, params)
    describe_run(decision, report)
    return decision


def promote_if_better(
    evaluated_student: dict[str, Any], evaluation_table: pd.DataFrame, report: str, params: OodEvaluationParams
) -> dict[str, Any]:
    """Record the evaluation on the evaluated student's registered version and move the
    promotion alias to it when it is better. Returns what was decided and why (one line,
    also logged)."""
    promotion = params.promotion
    benchmark = params.promotion_benchmark()
    key = FIGURE_TAG.format(benchmark=benchmark, domain="average", metric=promotion.metric)
    name, version = evaluated_student.get("registered_model"), evaluated_student.get("version")
    decision: dict[str, Any] = {"alias": promotion.alias, "metric": key, "registered_model": name, "version": version}
    if name is None:
        return _decided(
            decision,
            False,
            None,
            f"not promoted: the evaluated student is no registered version ({evaluated_student.get('reason')})",
        )
    averages = evaluation_table[
        (evaluation_table["benchmark"] == benchmark) & (evaluation_table["domain"] == "average")
    ]
    score = float(averages[promotion.metric].iloc[0]) if len(averages) else math.nan
    if math.isnan(score):
        return _decided(decision, False, None, f"not promoted: {key} was not measured (no readable image)")
    root = averages["root"].iloc[0]

    client = MlflowClient()
    _record_evaluation(client, name, version, evaluation_table, report)
    try:
        holder = client.get_model_version_by_alias(name, promotion.alias)
    except MlflowException:
        holder = None
    if holder is None:
        return _promote(
            client, decision, score, f"{name} version {version} is the first evaluated version: {key} = {score:.4f}"
        )
    if str(holder.version) == str(version):
        return _decided(
            decision, True, score, f"{name} version {version} already holds @{promotion.alias}: {key} = {score:.4f}"
        )
    classes = evaluated_student["config"]["class_names"]
    if difference := _not_comparable(holder, version, classes, benchmark, root, key):
        return _decided(
            decision,
            False,
            score,
            f"@{promotion.alias} stays on {name} version {holder.version}: {difference}; not compared",
        )
    held = holder.tags[key]
    if score > float(held) + promotion.min_improvement:
        return _promote(
            client,
            decision,
            score,
            f"{name} version {version} beats version {holder.version}: {key} {score:.4f} > {float(held):.4f}",
        )
    margin = f" + {promotion.min_improvement}" if promotion.min_improvement else ""
    return _decided(
        decision,
        False,
        score,
        f"@{promotion.alias} stays on {name} version {holder.version}: {key} {score:.4f} <= {float(held):.4f}{margin}",
    )


def _not_comparable(
    holder: ModelVersion, version: str, classes: list[str], benchmark: str, root: str, key: str
) -> str | None:
    """Why the alias holder's score cannot be set against the evaluated version's ``key``
    (``classes``, scored on ``benchmark`` at ``root``), or None when it can: another class
    list, or none recorded; no such figure; figures of another folder, or of an unrecorded one."""
    held = holder.version
    recorded = _recorded_class_list(holder.tags)
    if recorded is None:
        return (
            f"version {held} records no class list (no {CLASSES_TAG} or {CLASSES_FINGERPRINT_TAG} tag), "
            f"version {version} was made for classes [{shown_classes(classes)}]"
        )
    fingerprint = class_list_fingerprint(classes)
    if recorded != fingerprint:
        return (
            f"version {version} was made for classes [{shown_classes(classes)}] ({fingerprint}), version {held} "
            f"for [{shown_classes(holder.tags.get(CLASSES_TAG, '?').split(','))}] ({recorded})"
        )
    if key not in holder.tags:
        return f"version {held} has no {key} (it was not evaluated on {benchmark})"
    held_root = holder.tags.get(ROOT_TAG.format(benchmark=benchmark))
    if held_root is None:
        return f"version {held}'s {key} names no {benchmark} folder (evaluated before the folder was recorded)"
    if held_root != root:
        return f"version {version} was evaluated on {benchmark} at {root}, version {held} at {held_root}"
    return None


def _recorded_class_list(tags: dict[str, str]) -> str | None:
    """The fingerprint of the class list a version records: its classes_fingerprint tag or, on
    a version registered before that tag, the fingerprint of its comma-joined classes tag;
    None when it records neither."""
    if CLASSES_FINGERPRINT_TAG in tags:
        return tags[CLASSES_FINGERPRINT_TAG]
    if CLASSES_TAG in tags:
        return class_list_fingerprint(tags[CLASSES_TAG].split(","))
    return None


def _promote(client: MlflowClient, decision: dict[str, Any], score: float, reason: str) -> dict[str, Any]:
    client.set_registered_model_alias(decision["registered_model"], decision["alias"], decision["version"])
    return _decided(decision, True, score, f"@{decision['alias']} -> {reason}")


def _decided(decision: dict[str, Any], holds_alias: bool, score: float | None, reason: str) -> dict[str, Any]:
    logger.info("Promotion: %s", reason)
    return {**decision, "holds_alias": holds_alias, "score": score, "reason": reason}


def _record_evaluation(client: MlflowClient, name: str, version: str, table: pd.DataFrame, report: str) -> None:
    """Every figure of ``table`` as a version tag and, when the version has an MLflow 3 logged
    model and this evaluation an active run, linked to that model from the run's metrics;
    the report under the version's description."""
    figures = {
        FIGURE_TAG.format(benchmark=row.benchmark, domain=row.domain, metric=metric): float(value)
        for row in table.itertuples()
        for metric in ("student_top1", "teacher_top1", "agreement", "student_teacher_ratio")
        if not pd.isna(value := getattr(row, metric))
    }
    for tag, value in figures.items():
        client.set_model_version_tag(name, version, tag, f"{value:.6g}")
    for benchmark, root in dict(zip(table["benchmark"], table["root"], strict=True)).items():
        client.set_model_version_tag(name, version, ROOT_TAG.format(benchmark=benchmark), root)
    registered = client.get_model_version(name, version)
    # A version registered by log_model has its logged model as source ("models:/m-…"); the
    # sqlite store leaves model_id empty.
    model_id = registered.model_id
    if not model_id and (registered.source or "").startswith("models:/m-"):
        model_id = registered.source.removeprefix("models:/")
    if model_id and (run := mlflow.active_run()) is not None:
        # The evaluation stage logged them to this run just before (ood_evaluation_metrics).
        link_latest_metrics(client, run.info.run_id, model_id, figures.__contains__)
    describe_version(client, name, version, report)
