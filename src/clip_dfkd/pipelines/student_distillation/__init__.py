"""Synthetic images + teacher outputs → a small timm student, registered in MLflow."""

from clip_dfkd.pipelines.student_distillation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
