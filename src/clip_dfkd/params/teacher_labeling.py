"""``teacher_labeling`` (conf/base/parameters_teacher_labeling.yml)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import (
    Field,
)

from clip_dfkd.params.base import Params


class LabelFilterParams(Params):
    """Drop synthetic images the teacher does not recognise as their intended class."""

    enabled: bool = False
    require_intended_class: bool = True
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)


class ViewLabelingParams(Params):
    """Augmented views of every image, labelled by the teacher for a student that trains
    with ``teacher_targets: stored_views``: ``per_image`` views (0: none), drawn with
    ``student_distillation.augmentation`` from ``seed`` and each image's id."""

    per_image: int = Field(default=8, ge=0)
    seed: int = 0


class TeacherLabelingParams(Params):
    section: ClassVar[str] = "teacher_labeling"

    filter: LabelFilterParams = LabelFilterParams()
    views: ViewLabelingParams = ViewLabelingParams()
