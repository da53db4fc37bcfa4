"""The one place that loads and builds models: the CLIP teacher, the text-to-image generator
and the timm student. Nodes call these functions; real and tiny demo models take the same path."""

from clip_dfkd.models.errors import ModelNotFoundError
from clip_dfkd.models.generator import load_text_to_image
from clip_dfkd.models.loaders import PROJECT_LOADERS, ModelLoaders
from clip_dfkd.models.student import StudentClassifier, create_student
from clip_dfkd.models.teacher import ClipTeacher, load_teacher, load_zero_shot_teacher

__all__ = [
    "ClipTeacher",
    "ModelLoaders",
    "ModelNotFoundError",
    "PROJECT_LOADERS",
    "StudentClassifier",
    "create_student",
    "load_teacher",
    "load_text_to_image",
    "load_zero_shot_teacher",
]
