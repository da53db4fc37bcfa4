"""The project's pipelines: one per stage, and ``__default__`` running all five in order."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

STAGES = ["prompt_generation", "image_synthesis", "teacher_labeling", "student_distillation", "ood_evaluation"]


def register_pipelines() -> dict[str, Pipeline]:
    # `kedro run --pipelines=<stage>` makes find_pipelines import only the requested stages;
    # __default__ is only asked for (and only buildable) when all of them are loaded.
    pipelines = find_pipelines(raise_errors=True)
    if all(stage in pipelines for stage in STAGES):
        pipelines["__default__"] = sum((pipelines[stage] for stage in STAGES), Pipeline([]))
    return pipelines
