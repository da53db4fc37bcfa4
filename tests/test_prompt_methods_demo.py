"""`kedro run --env=demo --params=prompt_generation.method=<m>,image_synthesis.backend=<b>` for
every prompt method, and both synthesis backends between them: the stages the method changes
(prompts, images, labels) for each, the whole demo for Contrastive-Prompt with inversion, where
the teacher serves every stage (distillation and evaluation do not depend on the method, and
every other demo test runs them)."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import plumbing_params
from kedro.framework.hooks import hook_impl
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from metric_names import undocumented

from clip_dfkd.styles import StyleBank

pytestmark = pytest.mark.heavy


def _mean_pairwise_cosine_distance(labels: pd.DataFrame) -> float:
    vectors = np.stack(labels["teacher_embedding"].to_numpy()).astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = len(vectors) * (len(vectors) - 1)
    return float((1 - vectors @ vectors.T).sum() / pairs)


class ModelsLeftBehind:
    """At each stage boundary (a node of another namespace than the last), the teachers,
    generators, text encoders and prompt encoders still alive that this run loaded."""

    def __init__(self):
        self.left_behind: list[tuple[str, list[str]]] = []
        self.stages_seen = 0
        self._stage = None

    @staticmethod
    def _models() -> list[object]:
        """Every model object the garbage collector tracks, garbage in cycles included."""
        import open_clip
        from diffusers import DiffusionPipeline, ModelMixin
        from transformers import PreTrainedModel

        from clip_dfkd.models import ClipTeacher
        from clip_dfkd.models.text_encoders import PseudoWordEncoder

        kinds = (ClipTeacher, PseudoWordEncoder, DiffusionPipeline, ModelMixin, PreTrainedModel, open_clip.CLIP)
        # Decided once per type: an isinstance check on each of the process's million objects
        # costs seconds per stage boundary.
        is_model: dict[type, bool] = {}
        found = []
        for thing in gc.get_objects():
            kind = type(thing)
            if kind not in is_model:
                is_model[kind] = issubclass(kind, kinds)
            if is_model[kind]:
                found.append(thing)
        return found

    def _alive(self) -> list[object]:
        """The models still referenced from somewhere (a full collection, which takes a second
        in this process, only when some model is found at all)."""
        found = [thing for thing in self._models() if id(thing) not in self._before]
        if not found:
            return []
        del found
        gc.collect()
        return [thing for thing in self._models() if id(thing) not in self._before]

    @hook_impl
    def before_pipeline_run(self) -> None:
        # Strong references, so that no id is reused by a model of this run.
        self._before = {id(thing): thing for thing in self._models()}

    @hook_impl(trylast=True)  # after the project's own hooks have run
    def before_node_run(self, node) -> None:
        if node.namespace == self._stage:
            return
        self._stage = node.namespace
        self.stages_seen += 1
        alive = [type(thing).__name__ for thing in self._alive()]
        if alive:
            self.left_behind.append((node.name, alive))


@pytest.fixture(scope="module")
def project(new_project) -> Path:
    path = new_project("methods")
    with contextlib.chdir(path):
        yield path


# Vanilla prompts with inversion are the demo's own settings, which every other demo test runs.
# Each method runs once with each encoder's pseudo-words in play: Mix-Prompt in the teacher's
# token space, Random-Prompt in the generator's, Contrastive-Prompt (the one that learns through
# its encoder) in both.
@pytest.mark.parametrize(
    ("method", "backend"),
    [
        ("vanilla", "diffusion"),
        ("mix", "inversion"),
        ("random", "diffusion"),
        ("contrastive", "diffusion"),
        ("contrastive", "inversion"),
    ],
)
def test_every_prompt_method_runs_the_demo(project: Path, method: str, backend: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    bootstrap_project(project)
    runtime_params = plumbing_params({"prompt_generation": {"method": method}, "image_synthesis": {"backend": backend}})
    whole = (method, backend) == ("contrastive", "inversion")  # the teacher in every stage
    models = ModelsLeftBehind()
    with KedroSession.create(project_path=project, env="demo", runtime_params=runtime_params) as session:
        session._hook_manager.register(models)
        session.run(pipeline_names=None if whole else ["prompt_generation", "image_synthesis", "teacher_labeling"])

    # The teacher, the generator and the prompt encoder live only in the node that loads them:
    # none is left when the next stage starts (synthesis never shares the device with the
    # teacher, nor training with either).
    assert models.stages_seen >= (5 if whole else 3)
    assert models.left_behind == []
    bank = StyleBank.load(project / "data/02_intermediate/style_bank.safetensors")
    manifest = pd.read_parquet(project / "data/03_primary/synthesis_manifest.parquet")
    assert len(manifest) == 36
    assert manifest["method"].eq(method).all()
    assert manifest["backend"].eq(backend).all()
    if method == "vanilla":
        assert bank.names == [] and manifest["style_vector_id"].isna().all()
    else:
        assert bank.method == method and len(bank.names) == 3
        # Pseudo-words live in the encoder that conditions synthesis: 64-d teacher, 32-d generator.
        assert bank.dim == (64 if backend == "inversion" else 32)
        assert set(manifest["style_vector_id"]) == set(bank.names)
        assert manifest["prompt"].str.contains("[S*]", regex=False).all()
    images = project / "data/03_primary/synthetic_images"
    assert all((images / f"{image_id}.png").is_file() for image_id in manifest["image_id"])

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("clip-dfkd-demo")
    runs = mlflow.search_runs([experiment.experiment_id], order_by=["start_time DESC"], output_format="list")
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert mlflow.active_run() is None  # the next session starts a run of its own
    assert run.data.params["prompt_generation.method"] == method
    assert undocumented(run.data.metrics) == [], "metric names outside docs/tracking.md's Metric names table"
    # Diversity is measured on what the run made: each class's prompts differ (three styles), and
    # the images' figure is the mean pairwise cosine distance of the stored teacher embeddings.
    labels = pd.read_parquet(project / "data/04_feature/teacher_labels.parquet")
    classes = sorted(labels["class_name"].unique())
    prompt_diversity = [run.data.metrics[f"prompts/diversity/class/{name}"] for name in classes]
    assert min(prompt_diversity) > 0.001
    assert run.data.metrics["prompts/diversity/average"] == pytest.approx(np.mean(prompt_diversity))
    image_diversity = {name: _mean_pairwise_cosine_distance(group) for name, group in labels.groupby("class_name")}
    for name, value in image_diversity.items():
        assert run.data.metrics[f"images/diversity/class/{name}"] == pytest.approx(value, abs=1e-4)
    assert run.data.metrics["images/diversity/average"] == pytest.approx(np.mean(list(image_diversity.values())))
    assert ("prompts/contrastive/style_loss" in run.data.metrics) == (method == "contrastive")
    # The stage's real cost, which its node time leaves out: every image of this method and
    # backend is new to the project's folder, so this run rendered each of them.
    assert run.data.metrics["synthesis/rendered_images"] == len(manifest)
    assert run.data.metrics["synthesis/render_seconds"] > 0
    assert run.data.metrics["synthesis/seconds_per_image"] == pytest.approx(
        run.data.metrics["synthesis/render_seconds"] / len(manifest)
    )
    if backend == "inversion":
        # Each image's final loss in the manifest; the mean loss curve, per logged iteration, in MLflow.
        assert manifest["inversion_loss"].between(0, 10).all()
        curve = MlflowClient().get_metric_history(run.info.run_id, "synthesis/inversion_loss")
        assert [m.step for m in curve] == [0, 9]
        assert curve[-1].value < curve[0].value
        final_loss = run.data.metrics["synthesis/inversion_final_loss"]
        assert final_loss == pytest.approx(manifest["inversion_loss"].mean())
