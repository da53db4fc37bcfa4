"""What a registered student carries in MLflow besides its weights: the tags of its class
list, the metrics linked to its logged model, and the description of its version; and the
description of the run that evaluated it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from clip_dfkd.naming import stable_hash

# log_model links every run metric logged at the model's step; the student is logged at a step
# no metric uses, and its metrics are linked explicitly (link_latest_metrics).
MODEL_STEP = -1
# The version tags naming the classes a student was made for (class_list_tags).
CLASSES_TAG = "classes"
CLASSES_FINGERPRINT_TAG = "classes_fingerprint"
# Between a version's description (what it is) and its latest evaluation report.
REPORT_SEPARATOR = "\n\n---\n\n"


def class_list_fingerprint(names: Sequence[str]) -> str:
    """A short digest of the class names in their order (the order fixes the class indices)."""
    return stable_hash(list(names), length=12)


def class_list_tags(names: Sequence[str]) -> dict[str, str]:
    """The version tags of a student's class list: the names, comma-joined for reading, and the
    list's fingerprint, exact (a name may hold a comma) and short enough for a search filter
    (``tags.classes_fingerprint = '…'``)."""
    return {CLASSES_TAG: ",".join(names), CLASSES_FINGERPRINT_TAG: class_list_fingerprint(names)}


def shown_classes(names: Sequence[str], limit: int = 12) -> str:
    """``ball, box, tent``, or the first ``limit`` names and ``… (345 in all)``."""
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def link_latest_metrics(client: MlflowClient, run_id: str, model_id: str, selected: Callable[[str], bool]) -> list[str]:
    """Link the latest point (highest step) of each ``selected`` metric of run ``run_id`` to
    the logged model ``model_id``, as MLflow links metrics when it logs a model: the same
    entries again with the model's id, so the run's history gains no point. Returns the keys."""
    linked = []
    for key in sorted(k for k in client.get_run(run_id).data.metrics if selected(k)):
        history = client.get_metric_history(run_id, key)
        last = max(metric.step for metric in history)
        points = [
            Metric(m.key, m.value, m.timestamp, m.step, run_id=run_id, model_id=model_id)
            for m in history
            if m.step == last and m.model_id is None
        ]
        client.log_batch(run_id, metrics=points)
        linked.append(key)
    return linked


def describe_version(client: MlflowClient, name: str, version: str, report: str) -> None:
    """Put ``report`` under the version's own description (what the student is), replacing
    the report of an earlier evaluation."""
    own = own_description(client, name, version)
    client.update_model_version(name, version, description=own + REPORT_SEPARATOR + report if own else report)


def own_description(client: MlflowClient, name: str, version: str) -> str:
    """What the version is, without the evaluation report under it."""
    return (client.get_model_version(name, version).description or "").split(REPORT_SEPARATOR)[0]


def describe_run(decision: dict[str, Any], report: str) -> None:
    """The active run's description (the first thing its page shows): which registered
    version it evaluated and what the promotion decided, what that student is, and the
    evaluation report. Nothing without an active run."""
    if mlflow.active_run() is None:
        return
    name, version = decision.get("registered_model"), decision.get("version")
    parts = [f"**{name} version {version}**: {decision['reason']}" if name else decision["reason"]]
    if name:
        parts.append(own_description(MlflowClient(), name, version))
    mlflow.set_tag("mlflow.note.content", "\n\n".join(part for part in parts if part) + REPORT_SEPARATOR + report)
