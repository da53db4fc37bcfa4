"""``comparison`` (conf/base/parameters_comparison.yml)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import (
    Field,
    field_validator,
)

from clip_dfkd.params.base import Params
from clip_dfkd.params.ood_evaluation import DATA_FREE


class ComparisonParams(Params):
    """Which tracked runs the comparison table reads: the FINISHED runs of the MLflow
    ``experiment`` (null: the project's own, from mlflow.yml) that match ``filter_string`` (an
    MLflow search filter; empty: every run) and carry an ood_evaluation table. ``benchmark``
    (null: every one found) keeps one benchmark's columns; ``setting`` the rows of one
    evaluation setting (``data-free``, or ``few-shot k=<k>`` as ood_evaluation names it);
    ``decimals`` rounds the cells; ``show_range`` adds the student's min–max over a row's
    runs when it has several."""

    section: ClassVar[str] = "comparison"

    experiment: str | None = Field(default=None, min_length=1)
    filter_string: str = ""
    benchmark: str | None = Field(default=None, min_length=1)
    setting: str = Field(default=DATA_FREE, pattern=r"^(data-free|few-shot k=[1-9][0-9]*)$")
    decimals: int = Field(default=2, ge=0, le=6)
    show_range: bool = True

    @field_validator("filter_string")
    @classmethod
    def _mlflow_search_filter(cls, filter_string: str) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.search_utils import SearchUtils

        try:
            SearchUtils.parse_search_filter(filter_string)
        except MlflowException as exc:
            reason = " ".join(exc.message.split())
            raise ValueError(
                f"is not an MLflow search filter ({reason}); allowed: clauses joined with 'and', e.g. "
                "params.prompt_generation.method = 'mix' and tags.seed = '1', or '' for every run"
            ) from None
        return filter_string
