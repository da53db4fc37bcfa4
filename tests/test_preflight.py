"""Runs that cannot succeed stop before any node runs, with one line per problem."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, make_project_copy
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.validation import ParameterValidationError

from clip_dfkd.models import ModelNotFoundError, load_teacher, load_text_to_image
from clip_dfkd.models.student import create_student
from clip_dfkd.models.teacher import indistinguishable_class_problems
from clip_dfkd.params import GeneratorParams, RuntimeParams, StudentParams, TeacherParams
from clip_dfkd.preflight import PreflightError, read_parameter_sections, unread_section_problems
from clip_dfkd.runtime import Runtime
from clip_dfkd.vocabularies import CLASS_LISTS

CPU = Runtime.resolve(RuntimeParams(device="cpu"))


def _outputs(project: Path) -> list[Path]:
    """Files under the data layers, beside the demo's own tiny models and benchmark."""
    demo_assets = (project / "data/06_models/demo", project / "data/01_raw/demo_shapes")
    return [
        p
        for p in (project / "data").rglob("*")
        if p.is_file() and not any(parent in demo_assets for parent in p.parents)
    ]


def _run(project: Path, env: str, runtime_params: dict | None = None, pipelines: list[str] | None = None) -> None:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env, runtime_params=runtime_params) as session:
        session.run(pipeline_names=pipelines)


def test_real_recipe_without_weights_names_every_missing_model(fresh_project, monkeypatch) -> None:
    monkeypatch.chdir(fresh_project)
    with pytest.raises(PreflightError) as caught:
        _run(fresh_project, "base")

    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("teacher: open_clip weights ViT-B-32/openai are not in the local cache")
    assert "set teacher.pretrained to a local checkpoint file" in lines[0]
    assert lines[1].startswith("image_synthesis.generator.model_id='stabilityai/sd-turbo': not in the local")
    assert "hf download stabilityai/sd-turbo --local-dir" in lines[1]
    assert lines[2].startswith("ood_evaluation.benchmarks.pacs.root='data/01_raw/PACS': no such folder")
    assert _outputs(fresh_project) == []


@pytest.mark.parametrize(
    ("backend", "missing"),
    [("diffusion", ["image_synthesis.generator.model_id="]), ("inversion", ["teacher: open_clip weights"])],
)
def test_prompts_and_images_need_the_teachers_weights_only_for_inversion(
    fresh_project, monkeypatch, backend, missing
) -> None:
    """A machine that only renders with diffusion needs the generator, not CLIP."""
    monkeypatch.chdir(fresh_project)
    with pytest.raises(PreflightError) as caught:
        _run(fresh_project, "base", {"image_synthesis": {"backend": backend}}, ["prompt_generation", "image_synthesis"])

    lines = str(caught.value).splitlines()
    assert [line[: len(start)] for line, start in zip(lines, missing, strict=True)] == missing


@pytest.mark.parametrize(("targets", "needs_teacher"), [("online", True), ("centre", False)])
def test_the_students_training_needs_the_teachers_weights_only_online(
    fresh_project, monkeypatch, targets, needs_teacher
) -> None:
    monkeypatch.chdir(fresh_project)
    with pytest.raises(PreflightError) as caught:
        _run(fresh_project, "base", {"student_distillation": {"teacher_targets": targets}}, ["student_distillation"])

    lines = str(caught.value).splitlines()
    assert any(line.startswith("teacher: open_clip weights") for line in lines) == needs_teacher, lines


@pytest.mark.parametrize(
    ("runtime_params", "error", "expected"),
    [
        ({"classes": []}, ParameterValidationError, "classes=[]: must list at least one class name"),
        ({"classes": ["ball", "ball"]}, ParameterValidationError, "classes=['ball', 'ball']: has duplicate names"),
        (
            {"student_distillation": {"student": {"model_name": "resnet-404"}}},
            ParameterValidationError,
            "student_distillation.student.model_name='resnet-404': is not a timm model",
        ),
        (
            {"ood_evaluation": {"benchmarks": {"demo_shapes": {"root": "nowhere"}}}},
            PreflightError,
            "ood_evaluation.benchmarks.demo_shapes.root='nowhere': no such folder",
        ),
        (
            {"classes": ["ball", "box"]},
            PreflightError,
            "ood_evaluation.benchmarks.demo_shapes: class folders 'kite' (in cartoon, night, photo, sketch), 'tent' "
            "(in cartoon, night, photo, sketch) are not in classes",
        ),
        (
            {"teacher": {"pretrained": "weights/missing.safetensors"}},
            PreflightError,
            "teacher.pretrained='weights/missing.safetensors': no such checkpoint file",
        ),
    ],
)
def test_bad_demo_runs_fail_before_writing_anything(
    fresh_project, monkeypatch, runtime_params, error, expected
) -> None:
    monkeypatch.chdir(fresh_project)
    with pytest.raises(error) as caught:
        _run(fresh_project, "demo", runtime_params)

    assert expected in str(caught.value)
    assert _outputs(fresh_project) == []


def test_the_commands_a_failed_check_suggests_keep_the_env_and_params_of_the_run(fresh_project, monkeypatch) -> None:
    monkeypatch.chdir(fresh_project)
    params = {"classes": "vlcs", "teacher_labeling": {"filter": {"enabled": True, "min_confidence": 0.5}}}
    with pytest.raises(PreflightError) as caught:
        _run(fresh_project, "demo", params, ["teacher_labeling"])

    rerun = (
        "kedro run --env=demo --pipelines=image_synthesis "
        "--params=classes=vlcs,teacher_labeling.filter.enabled=true,teacher_labeling.filter.min_confidence=0.5"
    )
    assert str(caught.value).splitlines() == [
        f"synthesis_manifest: not on disk yet; run `{rerun}` first",
        f"synthetic_images: not on disk yet; run `{rerun}` first",
    ]


def test_a_suggested_command_passes_the_parameters_as_the_command_line_reads_them() -> None:
    from omegaconf import OmegaConf

    from clip_dfkd.rerun import kedro_run_command

    run = {"env": "demo", "runtime_params": {"a": {"b": None, "c": False}, "d": "x y", "e": 2}}
    command = kedro_run_command(run, "--pipelines=p", params={"a.c": True, "f": "<k>"}, without=("e",))
    assert command == "kedro run --env=demo --pipelines=p --params='a.b=null,a.c=true,d=x y,f=<k>'"
    # What the shell hands `kedro run`, parsed as Kedro parses --params (a dot list).
    pairs = shlex.split(command)[-1].removeprefix("--params=").split(",")
    expected = {"a": {"b": None, "c": True}, "d": "x y", "f": "<k>"}
    assert OmegaConf.to_container(OmegaConf.from_dotlist(pairs)) == expected
    assert kedro_run_command(None, "--pipelines=p") == "kedro run --pipelines=p"


def test_a_saved_bank_of_the_wrong_size_fails_before_any_work(fresh_project, monkeypatch) -> None:
    import torch

    from clip_dfkd.styles import StyleBank

    StyleBank("contrastive", "other", torch.zeros(4, 768)).save(fresh_project / "bank768.safetensors")
    monkeypatch.chdir(fresh_project)
    params = {
        "prompt_generation": {"method": "contrastive", "contrastive": {"bank_path": "bank768.safetensors"}},
        "image_synthesis": {"backend": "diffusion"},
    }
    with pytest.raises(PreflightError) as caught:
        _run(fresh_project, "demo", params)

    assert str(caught.value) == (
        "prompt_generation.contrastive.bank_path='bank768.safetensors': its pseudo-words have 768 dimensions; "
        "the text encoder of data/06_models/demo/tiny-stable-diffusion (backend diffusion) embeds tokens in 32"
    )
    assert _outputs(fresh_project) == []


def _runs(project: Path) -> list:
    """The MLflow runs a project's runs left behind."""
    import mlflow

    database = project / "mlflow.db"
    if not database.exists():
        return []
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _write_sdxl_like_folder(folder: Path) -> None:
    folder.mkdir()
    index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _half_copied_generator(project: Path, damage) -> None:
    """The demo's generator copied to ``project/sd``, then ``damage(copy)``."""
    import shutil

    shutil.copytree(project / "data/06_models/demo/tiny-stable-diffusion", project / "sd")
    damage(project / "sd")


def _truncate_index(folder: Path) -> None:
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')


def _empty_unet_folder(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder / "unet")
    (folder / "unet").mkdir()


def _image_without_class_folder(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")  # preflight reads names, not pixels


def _write_bank(path: Path, dim: int) -> None:
    from clip_dfkd.styles import StyleBank

    StyleBank("contrastive", "generator", torch.zeros(3, dim)).save(path)


def _write_other_checkpoint(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "text_projection": torch.zeros(16, 8)}, path)


@pytest.mark.parametrize(
    ("runtime_params", "prepare", "expected"),
    [
        (
            {"prompt_generation": {"method": "contrastive", "contrastive": {"bank_path": "notabank.safetensors"}}},
            lambda project: (project / "notabank.safetensors").write_bytes(b"PNG, not tensors" * 8),
            "prompt_generation.contrastive.bank_path='notabank.safetensors': not a safetensors file",
        ),
        (
            {"prompt_generation": {"method": "contrastive", "contrastive": {"bank_path": "other.safetensors"}}},
            lambda project: _write_other_checkpoint(project / "other.safetensors"),
            "prompt_generation.contrastive.bank_path='other.safetensors': a safetensors file without a style bank's",
        ),
        (
            {"teacher": {"pretrained": "other.safetensors"}},
            lambda project: _write_other_checkpoint(project / "other.safetensors"),
            "teacher.pretrained='other.safetensors': the checkpoint does not fit open_clip model 'clip-dfkd-tiny' "
            "(text_projection is [64, 32] in the model, [16, 8] in the file)",
        ),
        (
            {"student_distillation": {"student": {"checkpoint_path": "other.safetensors"}}},
            lambda project: _write_other_checkpoint(project / "other.safetensors"),
            "student_distillation.student.checkpoint_path='other.safetensors': the checkpoint does not fit timm "
            "model 'resnet10t' (",
        ),
        (
            {
                "image_synthesis": {
                    "backend": "inversion",
                    "inversion": {"parameterization": "latent", "decoder": {"model_id": "./no-vae"}},
                }
            },
            lambda project: None,
            "image_synthesis.inversion.decoder.model_id='./no-vae': no config.json there; allowed: a diffusers "
            "AutoencoderKL or VQModel folder",
        ),
        (
            {
                "image_synthesis": {"backend": "inversion"},
                "prompt_generation": {
                    "method": "contrastive",
                    "contrastive": {"bank_path": "gen_bank.safetensors"},
                },
            },
            lambda project: _write_bank(project / "gen_bank.safetensors", dim=32),
            "prompt_generation.contrastive.bank_path='gen_bank.safetensors': its pseudo-words have 32 dimensions; "
            "the teacher clip-dfkd-tiny (backend inversion) embeds tokens in 64",
        ),
        (
            {"runtime": {"device": "cuda:3"}},
            lambda project: None,
            "runtime.device='cuda:3': no such device on this machine; allowed here: auto, cpu",
        ),
        (
            {"image_synthesis": {"backend": "diffusion", "generator": {"model_id": "./sdxl"}}},
            lambda project: _write_sdxl_like_folder(project / "sdxl"),
            "image_synthesis.generator.model_id='./sdxl': a StableDiffusionXLPipeline (text encoders: text_encoder, "
            "text_encoder_2); allowed: a Stable Diffusion 1.x/2.x pipeline with one CLIP text encoder",
        ),
        (
            {"image_synthesis": {"backend": "diffusion", "generator": {"model_id": "./sd"}}},
            lambda project: _half_copied_generator(project, _truncate_index),
            "image_synthesis.generator.model_id='./sd': sd/model_index.json is not readable JSON (Expecting "
            "property name enclosed in double quotes: line 1 column 43 (char 42)); allowed: a whole "
            "save_pretrained folder (model_index.json and a folder for each component it names) or a hub id",
        ),
        (
            {"image_synthesis": {"backend": "diffusion", "generator": {"model_id": "./sd"}}},
            lambda project: _half_copied_generator(project, _empty_unet_folder),
            "image_synthesis.generator.model_id='./sd': sd/model_index.json names components whose folders are "
            "missing or empty: ['unet']; allowed: a whole save_pretrained folder",
        ),
        (
            {"ood_evaluation": {"few_shot": {"k": 26, "source_domains": {"demo_shapes": ["photo"]}}}},
            lambda project: None,
            "ood_evaluation.few_shot.k=26: class 'ball' has 25 image files in the source domains "
            "(demo_shapes/photo: 25), the fewest of any class; allowed: k <= 25, or more source domains",
        ),
        (
            {"ood_evaluation": {"benchmarks": {"demo_shapes": {"root": "flat"}}}},
            lambda project: _image_without_class_folder(project / "flat" / "photo" / "ball_1.png"),
            "ood_evaluation.benchmarks.demo_shapes.root='flat': the domain folders ['photo'] hold no class folder; "
            "expected the layout <root>/<domain>/<class>/<image files>",
        ),
    ],
    ids=[
        "bank-not-safetensors",
        "bank-not-a-bank",
        "teacher-other-architecture",
        "student-other-architecture",
        "latent-decoder-missing",
        "bank-of-the-other-backend",
        "device-absent",
        "sdxl",
        "generator-index-truncated",
        "generator-component-empty",
        "few-shot-k-above-a-class",
        "benchmark-without-class-folders",
    ],
)
def test_unusable_inputs_stop_before_the_mlflow_run_starts(
    fresh_project, monkeypatch, runtime_params, prepare, expected
) -> None:
    prepare(fresh_project)
    monkeypatch.chdir(fresh_project)
    with pytest.raises(PreflightError) as caught:
        _run(fresh_project, "demo", runtime_params)

    assert expected in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1
    assert _outputs(fresh_project) == []
    assert _runs(fresh_project) == []


def test_outputs_that_cannot_be_written_stop_the_run_before_it_starts(fresh_project, monkeypatch) -> None:
    """Tests run as root, which passes every permission check: a file where the reports folder
    should be, a catalog entry under /proc and a file where MLflow's artifact folder should be
    stand for outputs that no one can write."""
    reporting = fresh_project / "data/08_reporting"
    reporting.rmdir()
    reporting.write_text("a file where a folder should be")
    (fresh_project / "mlartifacts").write_text("a file where a folder should be")
    manifest = {"type": "clip_dfkd.datasets.ParquetDataset", "filepath": "/proc/clip-dfkd/synthesis_manifest.parquet"}
    (fresh_project / "conf/demo/catalog.yml").write_text(json.dumps({"synthesis_manifest": manifest}))
    monkeypatch.chdir(fresh_project)

    with pytest.raises(PreflightError) as caught:
        _run(fresh_project, "demo", pipelines=["prompt_generation", "image_synthesis"])

    artifacts = fresh_project / "mlartifacts"
    assert str(caught.value).splitlines() == [
        "synthesis_manifest: cannot create files in /proc/clip-dfkd (/proc: No such file or directory); make it a "
        "writable folder or point its catalog entry elsewhere",
        f"prompt_diversity_plot, synthetic_sample_grid: cannot create files in {reporting} ({reporting} is a file, "
        "not a folder); make it a writable folder or point their catalog entries elsewhere",
        f"MLflow artifact location: cannot create files in {artifacts} ({artifacts} is a file, not a folder); make "
        "it a writable folder or log to another experiment (tracking.experiment.name in mlflow.yml)",
    ]
    assert _outputs(fresh_project) == [reporting]  # and no probe file left in the folders that were writable
    assert _runs(fresh_project) == []


def test_loaders_fail_with_the_same_clear_messages() -> None:
    teacher = TeacherParams(model_name="ViT-B-32", pretrained="openai", templates=["a {class_name}"])
    with pytest.raises(
        ModelNotFoundError, match=r"^teacher: open_clip weights ViT-B-32/openai are not in the local cache"
    ):
        load_teacher(teacher, CPU)
    with pytest.raises(ModelNotFoundError, match=r"generator.model_id='stabilityai/sd-turbo': not in the local"):
        load_text_to_image(GeneratorParams(model_id="stabilityai/sd-turbo"), CPU)
    with pytest.raises(ModelNotFoundError, match=r"generator.model_id='./models/sd': no diffusers pipeline there"):
        load_text_to_image(GeneratorParams(model_id="./models/sd"), CPU)
    with pytest.raises(ModelNotFoundError, match=r"checkpoint_path='/nope/resnet18.pth': no such file"):
        create_student(StudentParams(model_name="resnet18", checkpoint_path="/nope/resnet18.pth"), ["a", "b"])


def test_unreachable_hub_without_offline_mode_names_every_missing_model_at_once(fresh_project) -> None:
    """No HF_HUB_OFFLINE, and nothing answers where the hub should be: one quick probe, then
    the same lines as offline mode (not minutes of retries and a network error)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{closed}", "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "400"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "kedro", "run"], cwd=fresh_project, env=env, capture_output=True, text=True, timeout=240
    )
    seconds = time.perf_counter() - started

    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"The Hugging Face hub (http://127.0.0.1:{closed}) does not answer (ConnectError): working offline" in output
    assert "teacher: open_clip weights ViT-B-32/openai are not in the local cache" in output
    assert "image_synthesis.generator.model_id='stabilityai/sd-turbo': not in the local Hugging Face cache" in output
    print(f"failed in {seconds:.1f} s")
    assert _outputs(fresh_project) == []


# --- parameter sections ---------------------------------------------------------------

SECTIONS = (
    "classes, comparison, demo_assets, image_synthesis, ood_evaluation, prompt_generation, runtime, "
    "student_distillation, teacher, teacher_labeling"
)


def test_a_misspelt_parameter_section_stops_the_run_before_every_other_check(tmp_path, monkeypatch) -> None:
    """The real recipe, whose weights are missing here: the misspelt section is the only problem reported.
    (tests/test_cli.py runs the demo's command: its assets are not even built.)"""
    project = make_project_copy(tmp_path / "project")
    monkeypatch.chdir(project)
    with pytest.raises(PreflightError) as caught:
        _run(project, "base", {"promt_generation": {"method": "mix"}})

    assert str(caught.value) == (
        "promt_generation: not a parameter section that any pipeline reads, so its values would be ignored; "
        f"did you mean prompt_generation? allowed: {SECTIONS}"
    )
    assert _runs(project) == []


def test_a_dotted_key_is_refused_and_underscored_keys_are_left_alone() -> None:
    # What a --config file's `params: {prompt_generation.method: mix}` passes: Kedro keeps the dotted key.
    parameters = {"prompt_generation.method": "mix", "_anchors": {"size": 32}, "classes": ["ball"]}

    assert unread_section_problems(parameters, set(SECTIONS.split(", "))) == [
        "prompt_generation.method: a parameter key with a dot, which Kedro does not split into sections here (a "
        "--config file's params mapping is used as written), so its value would be ignored; allowed: nested keys "
        '(prompt_generation: {...}) or params as one string, "prompt_generation.method=...", as on the command line'
    ]


def test_every_section_of_the_projects_config_is_read_by_a_pipeline_or_a_hook() -> None:
    import yaml

    bootstrap_project(REPO_ROOT)
    configured = {
        key for path in (REPO_ROOT / "conf").glob("*/parameters*.yml") for key in yaml.safe_load(path.read_text())
    }
    assert read_parameter_sections() == configured == set(SECTIONS.split(", "))


def test_a_run_of_one_pipeline_knows_the_others_sections_and_checks_the_class_names(tmp_path, monkeypatch) -> None:
    """Kedro loads only the pipelines a run asks for; the sections of the others are still
    known. Teacher labelling reads classes and teacher: the tokenizer check comes first."""
    project = make_project_copy(tmp_path / "project")
    monkeypatch.chdir(project)
    with pytest.raises(PreflightError) as caught:
        _run(project, "base", {"classes": ["dog", "t-shirt", "t - shirt"]}, ["teacher_labeling"])

    lines = str(caught.value).splitlines()
    assert lines[0].startswith(
        "classes: 't-shirt' and 't - shirt' are the same tokens for teacher.model_name=ViT-B-32 in every prompt"
    )
    assert (
        "synthesis_manifest: not on disk yet; run `kedro run --env=base --pipelines=image_synthesis "
        "--params='classes=[dog, t-shirt, t - shirt]'` first"
    ) in lines
    assert not [line for line in lines if "not a parameter section" in line]
    assert _runs(project) == []


# --- class names the teacher cannot tell apart ----------------------------------------

DEMO_TEACHER = TeacherParams(
    model_name="clip-dfkd-tiny",
    pretrained="data/06_models/demo/clip-dfkd-tiny.safetensors",
    templates=["a {class_name}.", "a photo of a {class_name}."],  # the longest prompt is the second
)
CLIP_TEACHER = TeacherParams(model_name="ViT-B-32", pretrained="openai", templates=["a photo of a {class_name}."])
# 9 tokens; the demo teacher's prompts add 7 (start, "a photo of a", ".", end) to reach its 16.
NINE_TOKENS = "spotted woodpecker of the northern pine forests in spring"


def test_classes_that_tokenise_alike_are_named_together() -> None:
    for teacher in (DEMO_TEACHER, CLIP_TEACHER):
        assert indistinguishable_class_problems(teacher, ["ball", "t-shirt", "rock & roll", "t - shirt", "box"]) == [
            f"classes: 't-shirt' and 't - shirt' are the same tokens for teacher.model_name={teacher.model_name} in "
            "every prompt of teacher.templates, so the teacher cannot tell them apart; allowed: names that its "
            "tokenizer tells apart"
        ]


def test_a_prompt_cut_at_the_context_length_names_its_class_and_tokens() -> None:
    assert indistinguishable_class_problems(DEMO_TEACHER, ["ball", NINE_TOKENS]) == []
    longer = f"{NINE_TOKENS} rain"
    assert indistinguishable_class_problems(DEMO_TEACHER, ["ball", longer]) == [
        f"classes: {longer!r} makes the teacher's prompt 'a photo of a {longer}.' 17 tokens long (start and end "
        "included), and teacher.model_name=clip-dfkd-tiny reads 16: the rest is cut off; allowed: names whose every "
        "prompt of teacher.templates fits in 16 tokens"
    ]
    # CLIP reads 77 tokens: 70 words fit beside the template's 7, 71 do not.
    fits, cut = " ".join(["ball"] * 70), " ".join(["ball"] * 71)
    assert indistinguishable_class_problems(CLIP_TEACHER, [fits]) == []
    (problem,) = indistinguishable_class_problems(CLIP_TEACHER, [cut])
    assert problem.startswith(f"classes: {cut!r} makes the teacher's prompt ")
    assert "78 tokens long (start and end included), and teacher.model_name=ViT-B-32 reads 77" in problem


def test_names_cut_to_the_same_prompt_are_both_reported() -> None:
    # The demo teacher keeps 14 tokens of the prompt between start and end: "a photo of a",
    # NINE_TOKENS and "rain"; the rest is cut off.
    today, tonight = f"{NINE_TOKENS} rain today", f"{NINE_TOKENS} rain tonight"
    teacher = DEMO_TEACHER.model_copy(update={"templates": ["a photo of a {class_name}."]})
    problems = indistinguishable_class_problems(teacher, [today, tonight, "ball"])

    assert [problem.split(" makes ")[0] for problem in problems[:2]] == [f"classes: {today!r}", f"classes: {tonight!r}"]
    assert "18 tokens long" in problems[0]
    assert problems[2].startswith(f"classes: {today!r} and {tonight!r} are the same tokens")
    assert len(problems) == 3
    # Beside "a {class_name}.", whose prompts are whole and differ, they are only cut off.
    problems = indistinguishable_class_problems(DEMO_TEACHER, [today, tonight])
    assert [problem.split(" makes ")[0] for problem in problems] == [f"classes: {today!r}", f"classes: {tonight!r}"]


def test_a_tokenizer_that_cannot_be_loaded_is_one_line() -> None:
    """nllb-clip's tokenizer comes from the Hugging Face hub, which the tests cannot reach."""
    teacher = TeacherParams(
        model_name="nllb-clip-base-siglip", pretrained="nllb.safetensors", templates=["{class_name}"]
    )

    (problem,) = indistinguishable_class_problems(teacher, ["ball", "box"])
    assert problem.startswith("teacher.model_name=nllb-clip-base-siglip: its tokenizer cannot be loaded here (")
    assert "\n" not in problem


def test_the_recipe_teacher_tells_every_named_class_list_apart() -> None:
    import yaml

    recipe = yaml.safe_load((REPO_ROOT / "conf/base/parameters.yml").read_text())["teacher"]
    for name, classes in CLASS_LISTS.items():
        assert indistinguishable_class_problems(TeacherParams.model_validate(recipe), classes) == [], name
