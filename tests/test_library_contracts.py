"""Every place where the project leans on a library's internals, asserted in one file: an
upgrade that changes one fails here, by name, before it fails somewhere in a run. Each of these
libraries is held below its next minor version in pyproject.toml; raise the bound only with
this file green.

- kedro-mlflow: switches logging off for an untracked pipeline by setting ``_logging_activated``
  on every catalog entry whose class name starts with "Mlflow" (clip_dfkd.datasets); its
  ``MlflowArtifactDataset`` logs the file at the wrapped dataset's ``_filepath``, which the
  project's ParquetDataset sets as kedro-datasets' datasets do.
- kedro-datasets: the preview types of ``kedro_datasets._typing``, which kedro-viz recognises by
  their names (clip_dfkd.datasets).
- Kedro: ``kedro.io.core.parse_dataset_definition`` (clip_dfkd.datasets); the ``run`` command
  object, whose callback clip_dfkd.cli wraps; the text of ParameterValidationError and
  DatasetError that clip_dfkd.cli reads; typed parameters built with ``model_validate``, where
  clip_dfkd.params makes its one-line messages.
- MLflow: ``SearchUtils.parse_search_filter``, which validates comparison.filter_string before
  any run is read (clip_dfkd.params).
- diffusers: ``AttnProcessor`` and ``set_attn_processor``, with which the stage benchmark counts
  the UNet's FLOPs.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import click
import pytest
from kedro.io import DataCatalog, DatasetError
from kedro.validation import ParameterValidationError
from pydantic import field_validator

from clip_dfkd.cli import _KEDRO_HEADER, _KEDRO_MODEL_ERROR, _KEDRO_NULL_ERROR, _SAVED_FILEPATH
from clip_dfkd.params import Params


def test_kedro_mlflow_switches_the_projects_mlflow_datasets_off_by_their_class_name(tmp_path: Path) -> None:
    from kedro_mlflow.io.catalog.switch_catalog_logging import switch_catalog_logging

    from clip_dfkd.datasets import MlflowMetricsDataset, MlflowTableDataset

    table = MlflowTableDataset(
        dataset={"type": "pandas.CSVDataset", "filepath": str(tmp_path / "t.csv")}, artifact_file="t.json"
    )
    catalog = DataCatalog({"table": table, "metrics": MlflowMetricsDataset(prefix="training")})

    switch_catalog_logging(catalog, False)

    assert table._logging_activated is False
    assert catalog["metrics"]._logging_activated is False


def test_kedro_mlflow_logs_the_projects_parquet_file_as_an_artifact(tmp_path: Path, monkeypatch) -> None:
    import mlflow
    import pandas as pd
    from kedro_mlflow.io.artifacts import MlflowArtifactDataset

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dataset = MlflowArtifactDataset(
        artifact_path="tables",
        dataset={"type": "clip_dfkd.datasets.ParquetDataset", "filepath": str(tmp_path / "t.pq")},
    )
    with mlflow.start_run() as run:
        dataset.save(pd.DataFrame({"a": [1]}))

    assert [entry.path for entry in mlflow.MlflowClient().list_artifacts(run.info.run_id, "tables")] == ["tables/t.pq"]


def test_kedro_datasets_preview_types_carry_the_names_kedro_viz_reads() -> None:
    from kedro_datasets._typing import ImagePreview, JSONPreview, TablePreview

    assert [t.__name__ for t in (ImagePreview, JSONPreview, TablePreview)] == [
        "ImagePreview",
        "JSONPreview",
        "TablePreview",
    ]


def test_kedro_parses_a_dataset_definition_into_its_class_and_arguments() -> None:
    from kedro.io.core import parse_dataset_definition
    from kedro_datasets.pillow import ImageDataset

    dataset_type, arguments = parse_dataset_definition({"type": "pillow.ImageDataset", "filepath": "a.png"})

    assert dataset_type is ImageDataset
    assert arguments == {"filepath": "a.png"}


def test_kedros_run_command_is_a_click_command_with_a_callback() -> None:
    from kedro.framework.cli.project import run

    assert isinstance(run, click.Command) and callable(run.callback)
    assert {"pipelines", "params", "env"} <= {parameter.name for parameter in run.params}


class _Section(Params):
    section: ClassVar[str] = "section"
    width: int

    @field_validator("width")
    @classmethod
    def _positive(cls, width: int) -> int:
        if width <= 0:
            raise ValueError("allowed: 1 or more")
        return width


def _takes_two_sections(section: _Section, other: _Section) -> None: ...


def test_kedros_parameter_validation_reports_as_the_cli_reads_it() -> None:
    from kedro.pipeline import Node, Pipeline
    from kedro.validation.parameter_validator import ParameterValidator

    pipeline = Pipeline([Node(_takes_two_sections, ["params:section", "params:other"], None)])
    validator = ParameterValidator({"__default__": pipeline})
    with pytest.raises(ParameterValidationError) as caught:
        validator.validate_raw_params({"section": {"width": -1}, "other": None})

    lines = str(caught.value).splitlines()
    assert lines[0] == _KEDRO_HEADER
    model_error = next(line for line in lines if "'section'" in line)
    assert (match := _KEDRO_MODEL_ERROR.fullmatch(model_error)), model_error
    assert match["detail"].startswith("section.width=-1: allowed: 1 or more")
    null_error = next(line for line in lines if "'other'" in line)
    assert _KEDRO_NULL_ERROR.fullmatch(null_error), null_error


def test_a_failed_save_names_the_dataset_file_as_the_cli_reads_it(tmp_path: Path) -> None:
    from kedro_datasets.json import JSONDataset

    target = tmp_path / "out.json"
    catalog = DataCatalog({"report": JSONDataset(filepath=str(target))})
    with pytest.raises(DatasetError) as caught:
        catalog.save("report", {"not serialisable": object()})

    assert (match := _SAVED_FILEPATH.search(str(caught.value))), str(caught.value)
    assert match["path"] == target.as_posix()


def test_mlflow_parses_search_filters_and_refuses_bad_ones() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.search_utils import SearchUtils

    assert SearchUtils.parse_search_filter("params.prompt_generation.method = 'mix' and tags.seed = '1'")
    with pytest.raises(MlflowException):
        SearchUtils.parse_search_filter("params.method == ")


def test_diffusers_unets_take_the_plain_attention_processor(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    from clip_dfkd.demo.tiny_models import build_tiny_stable_diffusion

    build_tiny_stable_diffusion(tmp_path, seed=0)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    unet.set_attn_processor(AttnProcessor())

    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
