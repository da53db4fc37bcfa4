"""The project's pipelines: ``__default__`` running all five stages in order, each stage, and
the comparison; listed in that order (kedro-viz's pipeline menu follows it)."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

STAGES = ["prompt_generation", "image_synthesis", "teacher_labeling", "student_distillation", "ood_evaluation"]


def register_pipelines() -> dict[str, Pipeline]:
    # `kedro run --pipelines=<stage>` makes find_pipelines import only the requested stages;
    # __default__ is only asked for (and only buildable) when all of them are loaded.
    found = find_pipelines(raise_errors=True)
    found.pop("__default__", None)  # find_pipelines' own would include the comparison
    ordered = [name for name in STAGES if name in found] + sorted(set(found) - set(STAGES))
    pipelines = {name: found[name] for name in ordered}
    if all(stage in pipelines for stage in STAGES):
        pipelines = {"__default__": sum((pipelines[stage] for stage in STAGES), Pipeline([])), **pipelines}
    return pipelines
