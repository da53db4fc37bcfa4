"""The student: a timm classifier that carries its class names and preprocessing.

``save_pretrained``/``from_pretrained`` mirror diffusers: a folder with ``config.json`` and
``model.safetensors`` is all that is needed to rebuild and run the student. The
preprocessing is timm's data config (input size, interpolation, crop, mean, std), resolved
once from the backbone's pretrained config when the student is created and then stored, so
a saved student is evaluated and served exactly as it was trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clip_dfkd.imaging import Transform
from clip_dfkd.models.checkpoints import architecture_mismatch, checkpoint_shapes
from clip_dfkd.models.errors import ModelNotFoundError
from clip_dfkd.params import StudentParams
from clip_dfkd.rerun import kedro_run_command

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class OutdatedStudentError(ModelNotFoundError):
    """A student saved before preprocessing came from timm. Outside a run the message suggests
    a plain ``kedro run``; the preflight checks say it again with the run's own ``retrain``."""

    def __init__(self, config: Path, retrain: str = kedro_run_command(None, "--pipelines=student_distillation")):
        super().__init__(
            f"{config}: no data_config (saved before preprocessing came from timm); "
            f"allowed: a student saved by this version, e.g. retrain with `{retrain}`"
        )
        self.config = config


class StudentClassifier(nn.Module):
    """A timm backbone with a classifier over ``class_names`` and, for embedding alignment,
    an optional linear projection of its pooled features to the teacher's embedding size."""

    def __init__(
        self,
        model_name: str,
        class_names: Sequence[str],
        image_size: int,
        embedding_dim: int | None = None,
        checkpoint_path: str | None = None,
        data_config: Mapping[str, Any] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """``data_config`` is timm's preprocessing for the backbone; None resolves it from the
        backbone's pretrained config at ``image_size`` (a new student), a saved student passes
        its own (``from_pretrained``). ``model_kwargs`` go to ``timm.create_model`` and are
        saved, so a narrowed architecture is rebuilt as it was trained."""
        super().__init__()
        import timm

        overlay = {"file": checkpoint_path} if checkpoint_path else None
        self.backbone = timm.create_model(
            model_name,
            pretrained=checkpoint_path is not None,
            pretrained_cfg_overlay=overlay,
            num_classes=len(class_names),
            **(model_kwargs or {}),
        )
        # The pooled features the classifier reads (forward_head's pre-logits): wider than
        # num_features in models with a hidden head layer (e.g. MambaOut).
        pooled = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.projection = nn.Linear(pooled, embedding_dim) if embedding_dim else None
        if data_config is None:
            # Interpolation, crop and normalisation as the backbone's pretrained weights expect;
            # only the input size is ours.
            resolved = timm.data.resolve_model_data_config(
                self.backbone, args={"input_size": (3, image_size, image_size)}
            )
            # JSON has no tuples: store lists, so a loaded config equals the saved one.
            data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}
        elif list(data_config["input_size"][-2:]) != [image_size, image_size]:
            raise ValueError(
                f"data_config.input_size={list(data_config['input_size'])}: disagrees with "
                f"image_size={image_size}; allowed: [3, {image_size}, {image_size}]"
            )
        self.config: dict[str, Any] = {
            "model_name": model_name,
            "model_kwargs": dict(model_kwargs or {}),
            "class_names": list(class_names),
            "image_size": image_size,
            "embedding_dim": embedding_dim,
            "data_config": dict(data_config),
        }

    @property
    def class_names(self) -> list[str]:
        return self.config["class_names"]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)

    def forward_distill(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and, when a projection head exists, the projected pooled features."""
        pooled = self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)
        logits = self.backbone.get_classifier()(pooled)
        projected = self.projection(pooled) if self.projection is not None else None
        return logits, projected

    def eval_transform(self) -> Transform:
        """timm's evaluation preprocessing for this student: resize, centre crop, normalise."""
        import timm

        return timm.data.create_transform(**self.config["data_config"], is_training=False)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME)

    def save_for_timm(self, directory: str | Path) -> None:
        """The classifier alone (backbone and head, without the distillation projection) in
        timm's own format, which ``timm.create_model("local-dir:<directory>", pretrained=True)``
        rebuilds with timm alone: architecture arguments, class names (``label_names``) and
        preprocessing (the data config)."""
        import timm

        timm.models.save_for_hf(
            self.backbone,
            str(directory),
            model_config={"label_names": self.class_names},
            model_args=self.config["model_kwargs"],
            data_config=self.config["data_config"],
            safe_serialization=True,
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> StudentClassifier:
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{directory}: no {CONFIG_NAME}; not a saved clip-dfkd student")
        config = json.loads((directory / CONFIG_NAME).read_text())
        if "data_config" not in config:
            raise OutdatedStudentError(directory / CONFIG_NAME)
        student = cls(**config)
        student.load_state_dict(load_file(directory / WEIGHTS_NAME, device=str(device)))
        return student.to(device).eval()


def missing_student_weights(params: StudentParams) -> str | None:
    """Why the student's initial weights cannot be loaded, or None (also when it trains from
    scratch). A checkpoint must hold every parameter of ``params.model_name`` but its
    classifier, with the same shapes: timm loads it non-strictly when the classifier is
    replaced, so a checkpoint of another architecture would otherwise be half-loaded silently."""
    import timm

    if params.checkpoint_path is None:
        return None
    key = f"student_distillation.student.checkpoint_path={params.checkpoint_path!r}"
    path = Path(params.checkpoint_path).expanduser()
    if not path.is_file():
        return (
            f"{key}: no such file; allowed: local timm/ImageNet weights for {params.model_name} "
            "(.safetensors/.pth) or null to train from scratch"
        )
    try:
        found = checkpoint_shapes(path)
    except ValueError as exc:
        return f"{key}: {exc}; allowed: timm weights for {params.model_name}"
    if found is None:
        return None
    with torch.device("meta"):
        model = timm.create_model(params.model_name, **params.model_kwargs)
    # timm names the classifier module(s) that a new class count replaces.
    classifier = model.pretrained_cfg.get("classifier") or ()
    mismatch = architecture_mismatch(model, found, ignored=(classifier,) if isinstance(classifier, str) else classifier)
    if mismatch is None:
        return None
    return (
        f"{key}: the checkpoint does not fit timm model {params.model_name!r} ({mismatch}); allowed: weights "
        f"of {params.model_name}, or set student_distillation.student.model_name to the checkpoint's architecture"
    )


def create_student(
    params: StudentParams, class_names: Sequence[str], embedding_dim: int | None = None
) -> StudentClassifier:
    """A fresh student; ImageNet-initialised when ``params.checkpoint_path`` is set."""
    if problem := missing_student_weights(params):
        raise ModelNotFoundError(problem)
    checkpoint = str(Path(params.checkpoint_path).expanduser()) if params.checkpoint_path else None
    student = StudentClassifier(
        params.model_name,
        class_names,
        image_size=params.image_size,
        embedding_dim=embedding_dim,
        checkpoint_path=checkpoint,
        model_kwargs=params.model_kwargs,
    )
    logger.info(
        "Student %s: %.3gM parameters, %d classes",
        params.architecture,
        sum(p.numel() for p in student.parameters()) / 1e6,
        len(class_names),
    )
    return student


def student_fingerprint(student: torch.nn.Module) -> str:
    """A fingerprint of a model's weights: sha256 over its ``state_dict`` in sorted key order
    (each entry's name, dtype, shape and raw bytes), hex, first 16 characters.

    Equal weights give an equal fingerprint whatever the device or the order the modules were
    built in; any changed value, name or shape gives another.
    """
    digest = hashlib.sha256()
    state = student.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        # Viewed as bytes, so dtypes numpy lacks (bfloat16) hash too.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
