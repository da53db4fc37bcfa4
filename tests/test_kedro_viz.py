"""kedro-viz on the demo project after a run, through its own REST app in-process: every node
of every pipeline answers, the stages are collapsible groups, datasets sit in their data
layers, and the previews people look at (tables with array columns, the report, the
synthetic images, the student's config) render."""

from __future__ import annotations

import base64
import contextlib
import io
import json

import pytest
from conftest import DATA_LAYERS, StagedDemoProject
from PIL import Image

STAGES = ["prompt_generation", "image_synthesis", "teacher_labeling", "student_distillation", "ood_evaluation"]


@pytest.fixture(scope="module")
def viz(new_project):
    """A TestClient on kedro-viz's REST app for a demo project of its own, after all five
    stages ran there (on the plumbing budget)."""
    from fastapi.testclient import TestClient
    from kedro_viz.api.apps import create_api_app_from_project
    from kedro_viz.data_access import data_access_manager
    from kedro_viz.server import load_and_populate_data

    project = StagedDemoProject(new_project("viz"))
    # Catalog and parameter paths are relative to the project, as in a run.
    with contextlib.chdir(project.path):
        project.run("ood_evaluation")
        data_access_manager.reset_fields()
        load_and_populate_data(project.path, env="demo")
        yield TestClient(create_api_app_from_project(project.path)), data_access_manager


def _graph(client, pipeline: str | None = None) -> dict:
    response = client.get("/api/main" if pipeline is None else f"/api/pipelines/{pipeline}")
    assert response.status_code == 200, response.text
    return response.json()


def test_every_node_of_every_pipeline_answers(viz) -> None:
    client, manager = viz
    listed = [pipeline["id"] for pipeline in _graph(client)["pipelines"]]
    for pipeline in listed:
        _graph(client, pipeline)  # also makes each pipeline's group nodes

    failures = {}
    for node_id in manager.nodes.get_node_ids():
        response = client.get(f"/api/nodes/{node_id}")
        if response.status_code != 200:
            failures[node_id] = response.text[:200]

    assert listed == ["__default__", *STAGES, "comparison"]  # the order they run in
    assert not failures


def test_the_stages_are_groups_and_the_datasets_sit_in_their_layers(viz) -> None:
    client, _ = viz
    graph = _graph(client)

    groups = set(graph["modular_pipelines"]) - {"__root__"}
    layers = {node["name"]: node.get("layer") for node in graph["nodes"] if node["type"] == "data"}

    assert groups == set(STAGES)
    assert graph["layers"] == [layer for layer in DATA_LAYERS if layer in graph["layers"]]
    assert {"02_intermediate", "03_primary", "04_feature", "06_models", "08_reporting"} <= set(graph["layers"])
    assert layers["teacher_labels"] == "04_feature" and layers["student_model"] == "06_models"


def _preview(client, manager, dataset: str) -> tuple[str, object]:
    node_id = next(node.id for node in manager.nodes.as_list() if node.name == dataset and node.type == "data")
    metadata = client.get(f"/api/nodes/{node_id}").json()
    return metadata.get("preview_type"), metadata.get("preview")


def test_what_people_look_at_has_a_preview(viz) -> None:
    client, manager = viz

    kind, labels = _preview(client, manager, "teacher_labels")
    assert kind == "TablePreview"
    row = dict(zip(labels["columns"], labels["data"][0], strict=True))
    assert row["teacher_embedding"].endswith("values)")  # an array cell, summarised

    kind, report = _preview(client, manager, "ood_evaluation_report")
    assert kind == "TextPreview" and report.startswith("# Out-of-distribution evaluation")

    kind, images = _preview(client, manager, "synthetic_images")
    assert kind == "ImagePreview"
    grid = Image.open(io.BytesIO(base64.b64decode(images)))
    assert grid.width > grid.height > 0

    kind, config = _preview(client, manager, "student_model")
    assert kind == "JSONPreview" and json.loads(config)["class_names"] == ["ball", "box", "tent", "kite"]
