"""Synthetic images → CLIP teacher logits, probabilities and embeddings."""

from clip_dfkd.pipelines.teacher_labeling.pipeline import create_pipeline

__all__ = ["create_pipeline"]
