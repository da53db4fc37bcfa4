"""Rendering synthesis manifest rows into images, in this process or on Ray actors.

A renderer (:mod:`~clip_dfkd.rendering.renderers`) turns manifest rows into images. The image
synthesis stage hands Kedro one lazy loader per image; an executor
(:mod:`~clip_dfkd.rendering.executors`, :mod:`~clip_dfkd.rendering.on_ray`) serves those
loaders batch by batch, rendering a batch when its first image is asked for. Each image
carries its record in its PNG (:mod:`~clip_dfkd.rendering.records`).
"""

from clip_dfkd.rendering.executors import LazyImages, LocalImages, OnDemandImages
from clip_dfkd.rendering.on_ray import RayImages, ray_executor_problem
from clip_dfkd.rendering.records import RECORD_KEY, RenderTiming, attach_record, read_record, read_saved_record
from clip_dfkd.rendering.renderers import (
    DiffusionRenderer,
    InversionRenderer,
    RenderedBatch,
    Renderer,
    RenderingOutOfMemoryError,
    create_renderer,
)

__all__ = [
    "RECORD_KEY",
    "DiffusionRenderer",
    "InversionRenderer",
    "LazyImages",
    "LocalImages",
    "OnDemandImages",
    "RayImages",
    "RenderTiming",
    "RenderedBatch",
    "Renderer",
    "RenderingOutOfMemoryError",
    "attach_record",
    "create_renderer",
    "ray_executor_problem",
    "read_record",
    "read_saved_record",
]
