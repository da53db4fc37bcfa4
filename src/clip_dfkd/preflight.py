"""Checks that read the disk, run before the first node and before the MLflow run starts.

Parameter validation (:mod:`clip_dfkd.params`) sees values only; these checks see files:
every model's weights can be found (files, folders, and with HF_HUB_OFFLINE the Hugging
Face cache), a local generator folder is whole, saved artefacts fit the run, benchmark roots
exist, each domain has class folders and they are known classes, the few-shot source
domains hold k image files of every class, and every output can be written. They also see
what a single parameter cannot: every top-level parameter key is read by some pipeline
(:class:`ParameterSectionsHook`), and the teacher's tokenizer tells the classes apart. A
failed check raises :class:`PreflightError` with one line per problem, and nothing has been
written or logged yet.

Over 400 lines by choice: every check a run makes before it starts is here, in the order
:class:`PreflightHook` makes them, so that one file answers "what can stop a run before it
starts"; each check is a small function of the catalog and parameters.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from kedro.framework.hooks import hook_impl
from kedro.io.core import get_protocol_and_path

from clip_dfkd.atomic import nearest_folder
from clip_dfkd.benchmarks import BenchmarkError, DomainImages, scan_benchmark
from clip_dfkd.datasets import StudentModelDataset, TeacherOutputCacheDataset
from clip_dfkd.errors import UserError
from clip_dfkd.models.generator import (
    incomplete_generator_folder,
    missing_decoder_weights,
    missing_generator_weights,
    missing_tiny_vae_weights,
    unsupported_generator,
)
from clip_dfkd.models.student import OutdatedStudentError, missing_student_weights
from clip_dfkd.models.teacher import (
    indistinguishable_class_problems,
    missing_teacher_weights,
    teacher_token_embedding_dim,
)
from clip_dfkd.models.text_encoders import generator_embedding_dim
from clip_dfkd.params import (
    ClassNames,
    ComparisonParams,
    ImageSynthesisParams,
    OodEvaluationParams,
    PromptGenerationParams,
    TeacherParams,
    as_plain,
)
from clip_dfkd.pipeline_registry import STAGES, every_pipeline
from clip_dfkd.rendering import ray_executor_problem
from clip_dfkd.rerun import kedro_run_command
from clip_dfkd.runtime import unavailable_device
from clip_dfkd.styles import saved_bank_dim


def _saved_bank_problem(
    params: PromptGenerationParams, image_synthesis: ImageSynthesisParams, teacher: TeacherParams
) -> str | None:
    path = params.contrastive.bank_path
    if params.method != "contrastive" or path is None:
        return None
    key = f"prompt_generation.contrastive.bank_path={path!r}"
    if not Path(path).expanduser().is_file():
        return f"{key}: no such file; allowed: a style_bank.safetensors saved by an earlier run, or null to train one"
    try:
        found = saved_bank_dim(Path(path).expanduser())
    except ValueError as exc:
        return f"{key}: {exc}; allowed: a style_bank.safetensors saved by an earlier run, or null to train one"
    # Pseudo-words live in the encoder that conditions synthesis: the teacher's text tower
    # for inversion, the generator's text encoder for diffusion.
    if image_synthesis.backend == "inversion":
        encoder, expected = f"the teacher {teacher.model_name}", teacher_token_embedding_dim(teacher)
    else:
        encoder = f"the text encoder of {image_synthesis.generator.model_id}"
        expected = generator_embedding_dim(image_synthesis.generator)
    if expected is not None and found != expected:
        return (
            f"{key}: its pseudo-words have {found} dimensions; {encoder} (backend {image_synthesis.backend}) "
            f"embeds tokens in {expected}"
        )
    return None


def _synthesis_problem(params: ImageSynthesisParams) -> str | None:
    if params.executor == "ray" and (problem := ray_executor_problem(params.ray)):
        return problem
    if params.backend == "diffusion":
        return (
            missing_generator_weights(params.generator)
            or unsupported_generator(params.generator)
            or incomplete_generator_folder(params.generator)
            or missing_tiny_vae_weights(params.generator)
        )
    if params.inversion.parameterization == "latent":
        return missing_decoder_weights(params.inversion.decoder)
    return None


def _few_shot_problem(
    evaluation: OodEvaluationParams, scanned: dict[str, list[DomainImages]], classes: list[str]
) -> str | None:
    """Why the few-shot draw cannot be served by the benchmarks on disk: a source domain that
    is not evaluated, or a class with fewer than k image files in the source domains."""
    if problem := evaluation.few_shot_source_error(
        {name: [images.domain for images in domains] for name, domains in scanned.items()}
    ):
        return problem
    counts = {name: dict.fromkeys(evaluation.few_shot.source_names(), 0) for name in classes}
    for name, sources in evaluation.few_shot.source_domains.items():
        for images in scanned[name]:
            if images.domain in sources:
                for label in images.labels:
                    counts[classes[label]][f"{name}/{images.domain}"] += 1
    return evaluation.few_shot_shortage_error(counts, "image files")


def _loads_teacher(pipeline, catalog) -> bool:
    """Whether a node of ``pipeline`` loads the teacher's weights, as its tags say. Labelling
    and evaluation do; prompt generation and synthesis only for inversion, where the teacher
    encodes the prompts and guides the images (with diffusion, a render machine needs no CLIP
    weights); the student's training when the teacher runs beside it (``teacher_targets:
    online``); registration only records the teacher's name."""
    from clip_dfkd.pipelines import RUNS_TEACHER, RUNS_TEACHER_FOR_INVERSION, RUNS_TEACHER_ONLINE

    tags = set().union(*(node.tags for node in pipeline.nodes))
    if RUNS_TEACHER in tags:
        return True
    if RUNS_TEACHER_ONLINE in tags and catalog.load("params:student_distillation").teacher_targets == "online":
        return True
    return RUNS_TEACHER_FOR_INVERSION in tags and catalog.load("params:image_synthesis").backend == "inversion"


def _stored_views_problem(pipeline, catalog) -> str | None:
    """A student set to replay stored views that will find none: this run's labelling draws
    no views, or the saved teacher_view_labels holds no row (read from the file's footer)."""
    if catalog.load("params:student_distillation").teacher_targets != "stored_views":
        return None
    targets = "student_distillation.teacher_targets=stored_views"
    allowed = "allowed: teacher_labeling.views.per_image >= 1, or teacher_targets centre or online"
    if "teacher_view_labels" in pipeline.all_outputs():
        per_image = catalog.load("params:teacher_labeling").views.per_image
        return (
            f"{targets}: teacher_labeling.views.per_image={per_image} labels no view to replay; {allowed}"
            if not per_image
            else None
        )
    import pyarrow.parquet as pq

    path = saved_file(catalog.get("teacher_view_labels")._describe())
    if path is None or not path.is_file() or pq.read_metadata(path).num_rows:
        return None
    return f"{targets}: the saved teacher_view_labels ({path}) holds no view; {allowed}, and rerun teacher_labeling"


def _shard_run_problem(params: ImageSynthesisParams, pipeline, run_params: dict[str, Any]) -> str | None:
    """A sharded run may only render: its manifest, metrics and sample grid would hold one
    shard, and N runs would overwrite each other's (and rerun any earlier stage N times)."""
    if params.num_shards == 1:
        return None
    from clip_dfkd.pipelines.image_synthesis.pipeline import create_pipeline

    rendering = {node.name for node in create_pipeline().to_outputs("synthetic_images").nodes}
    if not {node.name for node in pipeline.nodes} - rendering:
        return None
    num_shards, shard_index = "image_synthesis.num_shards", "image_synthesis.shard_index"
    render = kedro_run_command(
        run_params,
        "--pipelines=image_synthesis",
        "--to-outputs=synthetic_images",
        params={num_shards: params.num_shards, shard_index: "<k>"},
    )
    gather = kedro_run_command(run_params, "--pipelines=image_synthesis", without=(num_shards, shard_index))
    return (
        f"image_synthesis.num_shards={params.num_shards}: a sharded run renders synthetic_images only; run "
        f"`{render}` for each k, then `{gather}` once, which finds every image on disk and writes the manifest"
    )


# Saved artefacts that carry the class list they were made for.
CLASS_CARRIERS = ("prompt_table", "synthesis_manifest", "teacher_labels", "student_model")


def _stage_making(dataset: str) -> str:
    """The stage whose pipeline writes ``dataset``."""
    pipelines = every_pipeline()
    return next(stage for stage in STAGES if dataset in pipelines[stage].all_outputs())


def _missing_input(name: str, catalog, run_params: dict[str, Any]) -> str | None:
    if catalog.exists(name):
        return None
    return f"{name}: not on disk yet; run `{kedro_run_command(run_params, f'--pipelines={_stage_making(name)}')}` first"


def _unrendered_images(catalog, run_params: dict[str, Any]) -> str | None:
    """Images of the saved manifest that are not on disk (deleted, or a folder from another
    run): labelling would stop at them. Rendering again makes exactly those."""
    from clip_dfkd.pipelines.teacher_labeling.nodes import missing_images

    problem = missing_images(catalog.load("synthetic_images"), catalog.load("synthesis_manifest"))
    return problem and f"{problem}; rerun `{kedro_run_command(run_params, '--pipelines=image_synthesis')}`"


def _class_list_problem(name: str, catalog, classes: list[str], run_params: dict[str, Any]) -> str | None:
    """Why the saved artefact ``name`` cannot be used with ``classes`` (or at all: a student
    saved by an older version), or None. Only its header is read (a Parquet footer, a
    student's ``config.json``), never its rows or weights.

    Classes enter at prompt generation, so the fix is to rerun every stage from there up to
    the one that makes the artefact.
    """
    try:
        found = catalog[name].class_list()
    except OutdatedStudentError as outdated:
        return str(
            OutdatedStudentError(outdated.config, kedro_run_command(run_params, f"--pipelines={_stage_making(name)}"))
        )
    if found == classes:
        return None
    stages = STAGES[: STAGES.index(_stage_making(name)) + 1]
    made_for = f"was made for classes {found}" if found else "records no class list (made by an older version)"
    rerun = kedro_run_command(run_params, f"--pipelines={','.join(stages)}")
    return f"{name} {made_for}, but classes={classes}; rerun `{rerun}` to remake it for these classes"


def _saved_inputs(pipeline) -> set[str]:
    """The inputs of ``pipeline`` that are datasets, not parameters."""
    return {name for name in pipeline.inputs() if not name.startswith("params:") and name != "parameters"}


def _local_filepath(described: dict[str, Any]) -> Path | None:
    """The ``filepath`` of a file dataset described so (its ``_describe()``) when it is local."""
    protocol, path = get_protocol_and_path(str(described["filepath"]))
    return Path(path) if described.get("protocol", protocol) == "file" else None


def saved_file(described: dict[str, Any]) -> Path | None:
    """The local file that a dataset described so (its ``_describe()``, wrappers' included)
    writes in place, or None: a folder, a versioned file, data in memory, in MLflow or in a
    remote store."""
    if "filepath" in described:
        return None if described.get("version") else _local_filepath(described)
    inner = described.get("dataset")
    return saved_file(inner) if isinstance(inner, dict) and "path" not in described else None


def _written_folder(described: dict[str, Any]) -> Path | None:
    """The local folder in which a dataset described so (its ``_describe()``) creates files,
    or None: it keeps its data in memory, in MLflow or in a remote store."""
    if "filepath" in described:
        if (path := _local_filepath(described)) is None:
            return None
        # A versioned dataset writes <filepath>/<version>/<file name>.
        return path if described.get("version") else path.parent
    if "path" in described:  # a folder of files: partitions, cache entries, a saved model
        protocol, path = get_protocol_and_path(str(described["path"]))
        return Path(path) if protocol == "file" else None
    inner = described.get("dataset")
    return _written_folder(inner) if isinstance(inner, dict) else None


def _output_folders(pipeline, catalog) -> dict[Path, list[str]]:
    """Each local folder that the run creates files in, with the datasets that write there:
    the pipeline's outputs and the caches it fills while reading them."""
    folders = defaultdict(list)
    outputs = pipeline.all_outputs()
    for name in sorted(outputs | _saved_inputs(pipeline)):
        dataset = catalog.get(name)
        if dataset is None or not (name in outputs or isinstance(dataset, TeacherOutputCacheDataset)):
            continue  # in memory, or only read
        if (folder := _written_folder(dataset._describe())) is not None:
            # A saved model replaces its folder whole, by a rename in the folder around it.
            folders[folder.parent if isinstance(dataset, StudentModelDataset) else folder].append(name)
    return folders


def _unwritable_reason(folder: Path, probed: dict[Path, str | None]) -> str | None:
    """Why no file can be created in ``folder`` (made first where missing), or None.

    Only creating one shows it: root passes every permission check (``os.access``), yet not a
    read-only mount or a file standing where a folder should be. One probe file, removed at
    once, per existing folder (``probed`` keeps the answers).
    """
    existing = nearest_folder(folder)
    if existing != folder and os.path.lexists(blocker := existing / folder.relative_to(existing).parts[0]):
        return f"{blocker} is a file, not a folder"
    if existing not in probed:
        try:
            handle, probe = tempfile.mkstemp(prefix=".clip-dfkd-write-probe-", dir=existing)
        except OSError as exc:
            probed[existing] = exc.strerror if existing == folder else f"{existing}: {exc.strerror}"
        else:
            os.close(handle)
            os.unlink(probe)
            probed[existing] = None
    return probed[existing]


def _unwritable_outputs(pipeline, catalog) -> list[str]:
    """One line per output folder (and the MLflow artifact folder) that cannot be written."""
    probed: dict[Path, str | None] = {}
    problems = []
    folders = _output_folders(pipeline, catalog)
    for folder, names in sorted(folders.items()):
        if reason := _unwritable_reason(folder, probed):
            entries = "its catalog entry" if len(names) == 1 else "their catalog entries"
            problems.append(
                f"{', '.join(names)}: cannot create files in {folder} ({reason}); make it a writable folder or "
                f"point {entries} elsewhere"
            )
    # Artifacts are logged as outputs are saved (the registered student has one too): a run
    # that writes no file logs none.
    if folders and (artifacts := _local_artifact_folder()) and (reason := _unwritable_reason(artifacts, probed)):
        problems.append(
            f"MLflow artifact location: cannot create files in {artifacts} ({reason}); make it a writable folder "
            "or log to another experiment (tracking.experiment.name in mlflow.yml)"
        )
    return problems


def _local_artifact_folder() -> Path | None:
    """The local folder where the run's MLflow experiment keeps artifacts, or None when they
    go to a server. kedro-mlflow has set (and created) the experiment when the context was
    created; MLflow exports its id as MLFLOW_EXPERIMENT_ID."""
    import mlflow
    from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID

    if (experiment_id := MLFLOW_EXPERIMENT_ID.get()) is None:
        return None
    location = urlparse(mlflow.get_experiment(experiment_id).artifact_location)
    return Path(url2pathname(location.path)) if location.scheme in ("", "file") else None


class PreflightError(UserError, ValueError):
    """Files that a run needs and that are missing; one line per problem."""


def read_parameter_sections() -> set[str]:
    """The top-level parameter keys that something reads: the ``params:`` inputs of every
    pipeline's nodes (``params:a.b`` reads ``a``), whichever pipelines run, and the
    ``parameter_sections`` that the project's hooks declare."""
    from kedro.framework.project import settings

    inputs = {name for pipeline in every_pipeline().values() for name in pipeline.inputs()}
    sections = {name.removeprefix("params:").split(".")[0] for name in inputs if name.startswith("params:")}
    return sections | {section for hook in settings.HOOKS for section in getattr(hook, "parameter_sections", ())}


def unread_section_problems(parameters: Mapping[str, Any], known: set[str]) -> list[str]:
    """One line per top-level key of ``parameters`` that nothing in ``known`` reads, so that
    its values would be ignored: a misspelt section, or a dotted key that Kedro took as one
    name (a ``--config`` file's ``params`` mapping is used as written, unlike ``--params``).
    Keys starting with ``_`` are Kedro's convention for YAML anchors and variables."""
    problems = []
    for key in parameters:
        if key in known or key.startswith("_"):
            continue
        section = key.split(".")[0]
        if section in known:
            problems.append(
                f"{key}: a parameter key with a dot, which Kedro does not split into sections here (a --config "
                "file's params mapping is used as written), so its value would be ignored; allowed: nested keys "
                f'({section}: {{...}}) or params as one string, "{key}=...", as on the command line'
            )
            continue
        closest = difflib.get_close_matches(section, known, n=1)
        guess = f"did you mean {closest[0]}? " if closest else ""
        unread = "not a parameter section" if key == section else f"{section} is not a parameter section"
        problems.append(
            f"{key}: {unread} that any pipeline reads, so its values would be ignored; {guess}"
            f"allowed: {', '.join(sorted(known))}"
        )
    return problems


class ParameterSectionsHook:
    """Refuses a run whose parameters have a top-level key that no pipeline and no hook reads
    (``--params=promt_generation.method=mix`` would otherwise run the configured method):
    before every other hook, so before the demo's assets are built and the MLflow run starts.
    A key read by a pipeline that does not run is fine."""

    @hook_impl
    def before_pipeline_run(self, catalog) -> None:
        if problems := unread_section_problems(catalog.load("parameters"), read_parameter_sections()):
            raise PreflightError("\n".join(problems))


class PreflightHook:
    """Checks what parameter validation cannot see, before the first node runs: the teacher's
    tokenizer tells the classes apart, every model's weights can be found (files, folders,
    and with HF_HUB_OFFLINE the Hugging Face cache), benchmark roots exist, each domain has
    class folders and they are known classes, the few-shot source domains are among their
    domains and hold k image files of every class, and a file can be created where each
    output goes."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        used = {name.removeprefix("params:") for name in pipeline.inputs() if name.startswith("params:")}
        classes = list(ClassNames.model_validate(as_plain(catalog.load("params:classes"))))
        problems = []
        if {"classes", "teacher"} <= used:
            problems += indistinguishable_class_problems(catalog.load("params:teacher"), classes)
        if "runtime" in used:
            problems.append(unavailable_device(catalog.load("params:runtime")))
        if "teacher" in used and _loads_teacher(pipeline, catalog):
            problems.append(missing_teacher_weights(catalog.load("params:teacher")))
        if "image_synthesis" in used:
            synthesis = catalog.load("params:image_synthesis")
            problems += [_synthesis_problem(synthesis), _shard_run_problem(synthesis, pipeline, run_params)]
        if "prompt_generation" in used:
            problems.append(
                _saved_bank_problem(
                    catalog.load("params:prompt_generation"),
                    catalog.load("params:image_synthesis"),
                    catalog.load("params:teacher"),
                )
            )
        if "student_distillation" in used:
            problems.append(missing_student_weights(catalog.load("params:student_distillation").student))
            if "teacher_view_labels" in pipeline.inputs() | pipeline.all_outputs():
                problems.append(_stored_views_problem(pipeline, catalog))
        saved = sorted(_saved_inputs(pipeline))
        missing = {name: problem for name in saved if (problem := _missing_input(name, catalog, run_params))}
        problems += missing.values()
        if {"synthetic_images", "synthesis_manifest"} <= set(saved) - set(missing):
            problems.append(_unrendered_images(catalog, run_params))
        problems += [
            _class_list_problem(name, catalog, classes, run_params)
            for name in CLASS_CARRIERS
            if name in saved and name not in missing
        ]
        if "ood_evaluation" in used:
            evaluation = catalog.load("params:ood_evaluation")
            scanned = {}
            for name, benchmark in evaluation.enabled_benchmarks().items():
                try:
                    scanned[name] = scan_benchmark(name, benchmark, classes)
                except BenchmarkError as exc:
                    problems.append(str(exc))
            if evaluation.few_shot.k and len(scanned) == len(evaluation.enabled_benchmarks()):
                problems.append(_few_shot_problem(evaluation, scanned, classes))
        if "comparison" in used:
            from clip_dfkd.pipelines.comparison.tracked_runs import comparison_problem

            # Before the comparison's own MLflow run starts: no empty run is left behind.
            comparison = ComparisonParams.model_validate(as_plain(catalog.load("params:comparison")))
            problems.append(comparison_problem(comparison, run_params))
        problems += _unwritable_outputs(pipeline, catalog)
        if problems := [problem for problem in problems if problem]:
            raise PreflightError("\n".join(problems))
