"""Student and teacher accuracy per domain on domain-shift benchmarks."""

from clip_dfkd.pipelines.ood_evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
