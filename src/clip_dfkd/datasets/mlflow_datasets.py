"""Tables and metrics that also go to the active MLflow run (and are switched off with it, by
kedro-mlflow, for a pipeline it does not track)."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError
from kedro_datasets._typing import TablePreview


class MlflowTableDataset(AbstractDataset[pd.DataFrame, pd.DataFrame]):
    """A table saved through ``dataset`` (any Kedro dataset config, e.g. a kedro-mlflow
    artifact of a CSV file) and, when an MLflow run is active, also logged to it as an MLflow
    table (``mlflow.log_table`` to ``artifact_file``, a ``.json`` path): the MLflow UI shows it
    as a table and its artifact view compares it across runs."""

    def __init__(self, *, dataset: dict[str, Any], artifact_file: str, metadata: dict[str, Any] | None = None):
        self._dataset = AbstractDataset.from_config(f"{artifact_file} (table)", dataset)
        self._artifact_file = artifact_file
        self._logging = True
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return self._dataset.load()

    def save(self, data: pd.DataFrame) -> None:
        self._dataset.save(data)
        import mlflow

        if self._logging_activated and mlflow.active_run() is not None:
            # Missing values as JSON null, which MLflow's table reader expects.
            mlflow.log_table(data.astype(object).where(data.notna(), None), artifact_file=self._artifact_file)

    def preview(self, nrows: int = 5) -> TablePreview:
        return TablePreview(self._dataset.preview(nrows))

    def class_list(self) -> list[str] | None:
        """The class list the saved table records (see :meth:`ParquetDataset.class_list`)."""
        return self._dataset.class_list()

    def content_digest(self) -> str:
        """The saved file's digest (see :meth:`ParquetDataset.content_digest`)."""
        return self._dataset.content_digest()

    # kedro-mlflow switches logging off for the datasets of a pipeline it does not track by
    # setting this on every catalog entry whose class name starts with "Mlflow"; it reaches
    # the wrapped artifact dataset through here.
    @property
    def _logging_activated(self) -> bool:
        return self._logging

    @_logging_activated.setter
    def _logging_activated(self, flag: bool) -> None:
        self._logging = flag
        if hasattr(self._dataset, "_logging_activated"):
            self._dataset._logging_activated = flag

    def _exists(self) -> bool:
        return self._dataset.exists()

    def _describe(self) -> dict[str, Any]:
        return {"dataset": self._dataset._describe(), "artifact_file": self._artifact_file}


# A metric is one {"value", "step"} or a list of them (a history), as kedro-mlflow's datasets take.
MetricPoints = dict[str, float] | list[dict[str, float]]


class MlflowMetricsDataset(AbstractDataset[dict[str, MetricPoints], dict[str, MetricPoints]]):
    """Metrics of one section of the active MLflow run: ``{"loss": [{"value", "step"}, …]}``
    saved under ``prefix`` "training" is logged as ``training/loss``. MLflow's UI makes a
    section of each ``/`` prefix, which kedro-mlflow's metrics datasets (they join with ".")
    cannot give. Logged in batches, as one request per thousand points."""

    _BATCH = 1000  # MLflow's limit on metrics per log_batch call

    def __init__(self, *, prefix: str, metadata: dict[str, Any] | None = None) -> None:
        self._prefix = prefix.strip("/")
        self._logging_activated = True
        self.metadata = metadata

    def load(self) -> dict[str, MetricPoints]:
        client, run_id = self._client_and_run()
        section = f"{self._prefix}/"
        return {
            key.removeprefix(section): [
                {"value": m.value, "step": m.step} for m in client.get_metric_history(run_id, key)
            ]
            for key in client.get_run(run_id).data.metrics
            if key.startswith(section)
        }

    def save(self, data: dict[str, MetricPoints]) -> None:
        if not self._logging_activated:
            return
        from mlflow.entities import Metric

        client, run_id = self._client_and_run()
        now = int(time.time() * 1000)
        points = [
            Metric(f"{self._prefix}/{name}", _significant(point["value"]), now, int(point["step"]))
            for name, history in data.items()
            for point in ([history] if isinstance(history, dict) else history)
        ]
        for start in range(0, len(points), self._BATCH):
            client.log_batch(run_id, metrics=points[start : start + self._BATCH])

    def _client_and_run(self) -> tuple[Any, str]:
        import mlflow

        run = mlflow.active_run()
        if run is None:
            raise DatasetError(f"metrics {self._prefix}/*: no active MLflow run; run them with `kedro run`")
        return mlflow.MlflowClient(), run.info.run_id

    def _exists(self) -> bool:
        try:
            client, run_id = self._client_and_run()
        except DatasetError:
            return False
        section = f"{self._prefix}/"
        return any(key.startswith(section) for key in client.get_run(run_id).data.metrics)

    def _describe(self) -> dict[str, Any]:
        return {"prefix": self._prefix}


def _significant(value: float) -> float:
    """``value`` to 10 significant digits: more than any figure here carries, and MLflow shows
    a mean of fractions as ``0.7025``, not its float noise ``0.7024999999999999``."""
    return float(f"{float(value):.10g}")
