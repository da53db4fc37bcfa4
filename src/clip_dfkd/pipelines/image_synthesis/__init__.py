"""Prompts → surrogate images, rendered by a text-to-image backend."""

from clip_dfkd.pipelines.image_synthesis.pipeline import create_pipeline

__all__ = ["create_pipeline"]
