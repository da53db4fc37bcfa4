"""The project's pipelines: ``__default__`` running all five stages in order, each stage, and
the comparison; listed in that order (kedro-viz's pipeline menu follows it)."""

import importlib
import pkgutil

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

import clip_dfkd.pipelines

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


def every_pipeline() -> dict[str, Pipeline]:
    """Every pipeline of the project by name, also during a run that asked Kedro to load only
    some (``kedro.framework.project.pipelines`` then holds those alone). Found as
    ``find_pipelines`` finds them: each sub-package of :mod:`clip_dfkd.pipelines`."""
    packages = [module.name for module in pkgutil.iter_modules(clip_dfkd.pipelines.__path__) if module.ispkg]
    return {name: importlib.import_module(f"clip_dfkd.pipelines.{name}").create_pipeline() for name in packages}
