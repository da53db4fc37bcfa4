"""The teacher open_clip builds for a pretrained tag is the model those weights were trained as."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from torch import nn

from clip_dfkd.models import load_teacher
from clip_dfkd.params import RuntimeParams, TeacherParams
from clip_dfkd.runtime import Runtime

REPO_ROOT = Path(__file__).resolve().parents[2]


def _activations(model: nn.Module) -> set[str]:
    return {type(block.mlp.gelu).__name__ for tower in (model.visual, model) for block in tower.transformer.resblocks}


@pytest.fixture
def weights_stubbed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """open_clip finds a "downloaded" file and loads nothing from it: the architecture is
    what it builds for the tag, without the weights that cannot be had here."""
    import open_clip

    stand_in = tmp_path / "open_clip_model.safetensors"
    stand_in.touch()
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda *args, **kwargs: str(stand_in))
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *args, **kwargs: str(stand_in))
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *args, **kwargs: None)


@pytest.mark.parametrize(
    ("model_name", "pretrained", "activation"),
    [("ViT-B-32", "openai", "QuickGELU"), ("ViT-B-32", "laion2b_s34b_b79k", "GELU")],
)
def test_a_tag_builds_the_activation_its_weights_were_trained_with(
    weights_stubbed, model_name: str, pretrained: str, activation: str
) -> None:
    params = TeacherParams(model_name=model_name, pretrained=pretrained, templates=["{class_name}"])
    teacher = load_teacher(params, Runtime.resolve(RuntimeParams(device="cpu")))

    assert _activations(teacher.model) == {activation}


def test_the_base_recipe_builds_openais_quickgelu_vit_b_32(weights_stubbed) -> None:
    base = yaml.safe_load((REPO_ROOT / "conf/base/parameters.yml").read_text())
    teacher = load_teacher(TeacherParams(**base["teacher"]), Runtime.resolve(RuntimeParams(device="cpu")))

    assert teacher.name == "ViT-B-32/openai"
    assert _activations(teacher.model) == {"QuickGELU"}


@pytest.mark.parametrize(("recorded", "activation"), [({"quick_gelu": True}, "QuickGELU"), (None, "GELU")])
def test_a_checkpoint_file_builds_what_the_hubs_config_beside_it_records(
    weights_stubbed, tmp_path: Path, recorded: dict | None, activation: str
) -> None:
    # An unreadable stand-in: the architecture check leaves it to the (stubbed) loader.
    checkpoint = tmp_path / "hub-download" / "open_clip_pytorch_model.bin"
    checkpoint.parent.mkdir()
    checkpoint.touch()
    if recorded is not None:
        (checkpoint.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": recorded}))
    params = TeacherParams(model_name="ViT-B-32", pretrained=str(checkpoint), templates=["{class_name}"])
    teacher = load_teacher(params, Runtime.resolve(RuntimeParams(device="cpu")))

    assert _activations(teacher.model) == {activation}
