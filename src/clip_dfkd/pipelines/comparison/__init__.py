"""The paper's comparison table: student and teacher top-1 per domain for every prompt
method × synthesis backend, read from the tracked MLflow runs (not part of ``kedro run``)."""

from clip_dfkd.pipelines.comparison.pipeline import create_pipeline

__all__ = ["create_pipeline"]
