from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clip_dfkd.imaging import open_rgb
from clip_dfkd.models import StudentClassifier, create_student
from clip_dfkd.models.student import student_fingerprint
from clip_dfkd.params import (
    ClassNames,
    DistillationLossParams,
    ImageSynthesisParams,
    PromptGenerationParams,
    RuntimeParams,
    StudentDistillationParams,
    TeacherParams,
)
from clip_dfkd.runtime import Runtime, seed_everything
from clip_dfkd.serving import register_student_model

logger = logging.getLogger(__name__)


class _DistillationSet(Dataset):
    """Augmented synthetic images with the teacher's logits and embedding as targets."""

    def __init__(self, sources: list[Callable[[], Image.Image]], labels: pd.DataFrame, transform):
        self._sources = sources
        self._logits = torch.from_numpy(np.stack(labels["teacher_logits"].to_numpy())).float()
        self._embeddings = torch.from_numpy(np.stack(labels["teacher_embedding"].to_numpy())).float()
        self._transform = transform

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, index: int):
        return self._transform(open_rgb(self._sources[index])), self._logits[index], self._embeddings[index]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_embedding: torch.Tensor | None,
    teacher_embedding: torch.Tensor,
    params: DistillationLossParams,
) -> dict[str, torch.Tensor]:
    """``kd_weight`` · T² · KL(teacher_T ‖ student_T) + ``embedding_weight`` · alignment.

    The T² factor keeps the gradient scale of the soft targets independent of T (Hinton et
    al.). Alignment compares the projected student feature with the teacher's unit-norm image
    embedding: ``1 − cos`` or the squared L2 distance after normalising the projection.
    """
    temperature = params.temperature
    kd = (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    losses = {"kd": kd}
    total = params.kd_weight * kd
    if student_embedding is not None and params.embedding_weight > 0:
        projected = F.normalize(student_embedding.float(), dim=-1)
        if params.embedding_loss == "cosine":
            alignment = (1 - (projected * teacher_embedding).sum(dim=-1)).mean()
        else:
            alignment = (projected - teacher_embedding).pow(2).sum(dim=-1).mean()
        losses["embedding"] = alignment
        total = total + params.embedding_weight * alignment
    losses["total"] = total
    return losses


def train_student(
    images: dict[str, Callable[[], Image.Image]],
    teacher_labels: pd.DataFrame,
    classes: ClassNames,
    params: StudentDistillationParams,
    runtime: RuntimeParams,
) -> tuple[StudentClassifier, dict[str, list[dict[str, float]]]]:
    """Train the student on the kept synthetic images against the stored teacher outputs.

    Returns the student (on CPU, in eval mode) and per-epoch metrics in the shape
    kedro-mlflow's ``MlflowMetricsHistoryDataset`` logs.
    """
    seed_everything(params.training.seed)
    resolved = Runtime.resolve(runtime)
    labels = teacher_labels[teacher_labels["kept"]].reset_index(drop=True)
    if labels.empty:
        raise ValueError(
            "teacher_labels keeps no image; lower teacher_labeling.filter.min_confidence or "
            "disable teacher_labeling.filter"
        )
    embedding_dim = len(labels["teacher_embedding"].iloc[0]) if params.loss.embedding_weight > 0 else None
    student = create_student(params.student, list(classes), embedding_dim).to(resolved.device)
    dataset = _DistillationSet(
        [images[image_id] for image_id in labels["image_id"]],
        labels,
        student.train_transform(params.augmentation),
    )
    loader = DataLoader(
        dataset,
        batch_size=min(params.training.batch_size, len(dataset)),
        shuffle=True,
        drop_last=len(dataset) > params.training.batch_size,
        num_workers=resolved.num_workers,
        generator=torch.Generator().manual_seed(params.training.seed),
        pin_memory=resolved.device.type == "cuda",
    )
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=params.training.learning_rate,
        weight_decay=params.training.weight_decay,
        fused=True,  # one kernel for every parameter, on CPU and GPU
    )
    total_steps = params.training.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=params.training.learning_rate, total_steps=total_steps, pct_start=0.1
    )
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(enabled=resolved.device.type == "cuda" and resolved.dtype == torch.float16)
    forward = torch.compile(student.forward_distill) if resolved.compile else student.forward_distill

    history: dict[str, list[dict[str, float]]] = defaultdict(list)
    progress = tqdm(total=total_steps, desc="Distilling student", unit="step")
    for epoch in range(params.training.epochs):
        student.train()
        started = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        seen = 0
        for pixels, teacher_logits, teacher_embedding in loader:
            pixels = pixels.to(resolved.device, non_blocking=True)
            teacher_logits = teacher_logits.to(resolved.device, non_blocking=True)
            teacher_embedding = teacher_embedding.to(resolved.device, non_blocking=True)
            with resolved.autocast():
                student_logits, student_embedding = forward(pixels)
            losses = distillation_loss(
                student_logits.float(), teacher_logits, student_embedding, teacher_embedding, params.loss
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            batch = len(pixels)
            seen += batch
            batch_losses = {f"{name}_loss": float(value.detach()) for name, value in losses.items()}
            for name, value in batch_losses.items():
                sums[name] += value * batch
            sums["teacher_agreement"] += float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
            progress.update(1)
            progress.set_postfix(epoch=epoch + 1, loss=f"{batch_losses['total_loss']:.4f}")
        epoch_metrics = {name: value / seen for name, value in sums.items()}
        epoch_metrics["learning_rate"] = scheduler.get_last_lr()[0]
        epoch_metrics["epoch_seconds"] = time.perf_counter() - started
        for name, value in epoch_metrics.items():
            history[name].append({"value": value, "step": epoch})
        logger.info(
            "epoch %d/%d: loss %.4f, teacher agreement %.3f",
            epoch + 1,
            params.training.epochs,
            epoch_metrics["total_loss"],
            epoch_metrics["teacher_agreement"],
        )
    progress.close()
    return student.cpu().eval(), dict(history)


def register_student(
    student: StudentClassifier,
    classes: ClassNames,
    teacher: TeacherParams,
    image_synthesis: ImageSynthesisParams,
    prompt_generation: PromptGenerationParams,
    params: StudentDistillationParams,
) -> dict[str, str]:
    """Log the student as an MLflow pyfunc model, register it and point the alias at it.

    The returned registration carries the weights' ``fingerprint`` (also a version tag), by
    which ood_evaluation matches the student it scores to this registered version.
    """
    fingerprint = student_fingerprint(student)
    registration = register_student_model(
        student,
        registered_name=params.registry.model_name,
        alias=params.registry.alias,
        tags={
            "teacher": f"open_clip:{teacher.model_name}/{teacher.pretrained}",
            "generator": (
                f"diffusion:{image_synthesis.generator.model_id}"
                if image_synthesis.backend == "diffusion"
                else f"inversion:{image_synthesis.inversion.parameterization}"
            ),
            "prompt_method": prompt_generation.method,
            "classes": ",".join(classes),
            "student": params.student.model_name,
            "fingerprint": fingerprint,
        },
    )
    return {**registration, "fingerprint": fingerprint}
