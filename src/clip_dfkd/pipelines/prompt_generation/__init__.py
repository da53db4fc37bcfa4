"""Class names × styles → one prompt per image to synthesise."""

from clip_dfkd.pipelines.prompt_generation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
