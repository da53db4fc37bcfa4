"""Which function loads each model a stage needs. The stages take a :class:`ModelLoaders`
argument that defaults to the project's loaders; a caller that already holds its models (the
stage benchmark with full-size random weights, a notebook) hands its own, so no code is
patched to swap a model in."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from clip_dfkd.models.generator import load_text_to_image
from clip_dfkd.models.teacher import ClipTeacher, load_teacher
from clip_dfkd.params import GeneratorParams, TeacherParams
from clip_dfkd.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class ModelLoaders:
    """``teacher(params, runtime)`` gives a :class:`ClipTeacher`; ``text_to_image(params,
    runtime)`` a diffusers pipeline. Module-level functions keep it picklable for Ray actors."""

    teacher: Callable[[TeacherParams, Runtime], ClipTeacher] = load_teacher
    text_to_image: Callable[[GeneratorParams, Runtime], Any] = load_text_to_image


PROJECT_LOADERS = ModelLoaders()
