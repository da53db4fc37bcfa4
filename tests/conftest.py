"""Shared fixtures: an offline environment and demo projects copied to temporary folders."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# No test may touch the network; set before huggingface_hub reads it at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# pytest-xdist starts one worker per core. Left alone, each worker's torch (and every `kedro
# run` it starts) would use every core, and the workers would fight over them.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))

import pytest  # noqa: E402

# Shared with the benchmark scripts (benchmarks/ is on pytest's pythonpath).
from demo_projects import (  # noqa: E402
    DATA_LAYERS,
    REPO_ROOT,
    demo_asset_params,
    make_project_copy,
    merge_params,
)

__all__ = ["DATA_LAYERS", "REPO_ROOT", "demo_asset_params", "make_project_copy", "merge_params"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the test files for two workers (pytest-xdist hands them out in this order, one file
    at a time). The suite's critical path is the demo's assets (a minute and a half of teacher
    training) followed by the whole demo run: that file starts first, and builds the assets. The
    other worker meanwhile runs the files that need no demo asset; then come the heavy files,
    then the others, those with most tests first, so that short files fill the end."""
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)

    def rank(path: str) -> tuple[int, int]:
        file_items = files[path]
        if any(item.get_closest_marker("runs_the_whole_demo") for item in file_items):
            return (0, 0)
        if not any("demo_asset_project" in item.fixturenames for item in file_items):
            return (1, -len(file_items))
        if any(item.get_closest_marker("heavy") for item in file_items):
            return (2, -len(file_items))
        return (3, -len(file_items))

    items[:] = [item for path in sorted(files, key=rank) for item in files[path]]


@pytest.fixture(scope="session")
def demo_asset_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose demo assets were built once for the whole session, through the same
    function the demo's hook calls (training the teacher takes most of a minute); every other
    project copy starts with these."""
    from filelock import FileLock

    from clip_dfkd.demo import ensure_demo_assets

    # Under pytest-xdist every worker has its own base folder inside one shared parent: the
    # first worker builds the assets there, the others wait for it and reuse them.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "demo-assets" / "project"
    with FileLock(str(shared / "demo-assets.lock")):
        if not path.exists():
            make_project_copy(path)
        ensure_demo_assets(demo_asset_params(), path)
    return path


# Tests of plumbing run the demo on a small budget (a few images, a few steps); the demo's own
# budget, and what it achieves, is tested by test_knowledge_transfer.py.
PLUMBING_BUDGET = {
    "prompt_generation": {"images_per_class_and_style": 3},
    "image_synthesis": {"inversion": {"iterations": 10}},
    "student_distillation": {
        "student": {"model_name": "test_resnet"},
        "training": {"epochs": 2},
        # A few seconds per registered run; tested by test_serving.py and test_mlflow_server.py.
        "registry": {"export_onnx": False},
    },
}


def plumbing_params(overrides: dict | None = None) -> dict:
    """Runtime parameters for a plumbing test: the small budget, with ``overrides`` on top."""
    return merge_params(PLUMBING_BUDGET, overrides or {})


class StagedDemoProject:
    """A demo project whose pipelines run in-process on the plumbing budget, each at most once,
    prerequisites first."""

    STAGES = ["prompt_generation", "image_synthesis", "teacher_labeling", "student_distillation", "ood_evaluation"]

    def __init__(self, path: Path):
        self.path = path
        self._done: set[str] = set()

    def session(self, env: str = "demo", runtime_params: dict | None = None):
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project

        bootstrap_project(self.path)
        return KedroSession.create(project_path=self.path, env=env, runtime_params=plumbing_params(runtime_params))

    def run(self, stage: str) -> None:
        for earlier in self.STAGES[: self.STAGES.index(stage) + 1]:
            if earlier not in self._done:
                with self.session() as session:
                    session.run(pipeline_names=[earlier])
                self._done.add(earlier)

    def catalog(self):
        with self.session() as session:
            return session.load_context().catalog


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory: pytest.TempPathFactory, demo_asset_project: Path) -> StagedDemoProject:
    path = make_project_copy(tmp_path_factory.mktemp("staged") / "project", demo_asset_project)
    # Kedro resolves catalog paths and the tracking URI from the working directory.
    with contextlib.chdir(path):
        yield StagedDemoProject(path)


@pytest.fixture(scope="session")
def demo_assets(demo_project: StagedDemoProject):
    """The demo's tiny teacher, generator and benchmark, with paths relative to the project
    (the working directory during tests)."""
    from clip_dfkd.demo import DemoAssetsParams, ensure_demo_assets

    params = DemoAssetsParams.model_validate(demo_project.catalog().load("parameters")["demo_assets"])
    ensure_demo_assets(params, demo_project.path)
    return params


@pytest.fixture(scope="session")
def tiny_text_encoders(demo_assets):
    """The demo generator's CLIPTextModel and the demo teacher's open_clip text tower, both
    wrapped for pseudo-words."""
    from clip_dfkd.models import load_teacher
    from clip_dfkd.models.text_encoders import OpenClipTextEncoder, load_generator_text_encoder
    from clip_dfkd.params import GeneratorParams, RuntimeParams, TeacherParams
    from clip_dfkd.runtime import Runtime

    cpu = Runtime.resolve(RuntimeParams(device="cpu"))
    generator = load_generator_text_encoder(GeneratorParams(model_id=demo_assets.generator_dir), cpu)
    teacher = load_teacher(
        TeacherParams(
            model_name="clip-dfkd-tiny", pretrained=demo_assets.teacher_checkpoint, templates=["{class_name}"]
        ),
        cpu,
    )
    return {"diffusers": generator, "open_clip": OpenClipTextEncoder(teacher.model, teacher.tokenizer, "teacher")}


@pytest.fixture(scope="session")
def new_project(tmp_path_factory: pytest.TempPathFactory, demo_asset_project: Path):
    """A factory of unused project copies (with the demo's assets), for fixtures wider than
    one test."""
    return lambda name: make_project_copy(tmp_path_factory.mktemp(name) / "project", demo_asset_project)


@pytest.fixture
def fresh_project(tmp_path: Path, demo_asset_project: Path) -> Path:
    """An unused copy of the project (with the demo's assets), for runs in a subprocess."""
    return make_project_copy(tmp_path / "project", demo_asset_project)


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI, which the project's
    config honours as an override; undo it after each test so that projects stay apart."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
