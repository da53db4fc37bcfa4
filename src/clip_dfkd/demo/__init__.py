"""The offline demo: its worlds (:mod:`~clip_dfkd.demo.world`: shapes drawn in styles, and their
captions), the tiny models built and trained here (:mod:`~clip_dfkd.demo.tiny_models`), and the
assets a demo project needs (:mod:`~clip_dfkd.demo.assets`: the teacher trained on its world, the
benchmark). Nothing outside the demo imports it but the demo's hook; the served model never
carries it."""

from clip_dfkd.demo.assets import (
    DemoAssetsParams,
    DemoTeacherError,
    DemoTeacherTrainingParams,
    ensure_demo_assets,
    held_out_domains,
)

__all__ = [
    "DemoAssetsParams",
    "DemoTeacherError",
    "DemoTeacherTrainingParams",
    "ensure_demo_assets",
    "held_out_domains",
]
