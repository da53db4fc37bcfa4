"""Typed parameters of every pipeline, one module per parameters file of conf/base.

Kedro validates a node's ``params:`` input against the pydantic model in the node's type
hint before any node runs, so a bad value stops a run before heavy work. Each error is
reported on one line that names the full key, the bad value and what is allowed.

Only static checks live here (types, ranges, names known to open_clip/timm/diffusers).
Checks that read the disk (weights paths, benchmark folders) run in
:class:`clip_dfkd.preflight.PreflightHook`, so that ``kedro viz`` works on machines without
the data.
"""

from clip_dfkd.params.base import InvalidParameterError, Params, as_plain, looks_like_path
from clip_dfkd.params.comparison import ComparisonParams
from clip_dfkd.params.image_synthesis import (
    GeneratorParams,
    ImageSynthesisParams,
    InversionDecoderParams,
    InversionParams,
    RayExecutorParams,
)
from clip_dfkd.params.ood_evaluation import (
    DATA_FREE,
    BenchmarkLayout,
    BenchmarkParams,
    FewShotParams,
    OodEvaluationParams,
    PromotionParams,
)
from clip_dfkd.params.prompt_generation import ContrastivePromptParams, MixPromptParams, PromptGenerationParams
from clip_dfkd.params.shared import ClassNames, RuntimeParams, ScaleRange, TeacherParams
from clip_dfkd.params.student_distillation import (
    AugmentationParams,
    DistillationLossParams,
    RegistryParams,
    StudentDistillationParams,
    StudentParams,
    TeacherTargets,
    TrainingParams,
)
from clip_dfkd.params.teacher_labeling import LabelFilterParams, TeacherLabelingParams, ViewLabelingParams

__all__ = [
    "AugmentationParams",
    "BenchmarkLayout",
    "BenchmarkParams",
    "ClassNames",
    "ComparisonParams",
    "ContrastivePromptParams",
    "DATA_FREE",
    "DistillationLossParams",
    "FewShotParams",
    "GeneratorParams",
    "ImageSynthesisParams",
    "InvalidParameterError",
    "InversionDecoderParams",
    "InversionParams",
    "LabelFilterParams",
    "MixPromptParams",
    "OodEvaluationParams",
    "Params",
    "PromotionParams",
    "PromptGenerationParams",
    "RayExecutorParams",
    "RegistryParams",
    "RuntimeParams",
    "ScaleRange",
    "StudentDistillationParams",
    "StudentParams",
    "TeacherLabelingParams",
    "TeacherParams",
    "TeacherTargets",
    "TrainingParams",
    "ViewLabelingParams",
    "as_plain",
    "looks_like_path",
]
