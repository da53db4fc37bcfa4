"""The student's training loop, shared by distillation (synthetic images against the teacher's
outputs) and few-shot fine-tuning (real images against their true class and the teacher's
outputs): only the images, the targets and the loss differ."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from clip_dfkd.errors import UserError
from clip_dfkd.imaging import ImageSource, open_rgb
from clip_dfkd.models import StudentClassifier
from clip_dfkd.params import AugmentationParams, TrainingParams
from clip_dfkd.progress import ProgressBar
from clip_dfkd.runtime import FittingBatches, Runtime
from clip_dfkd.views import ViewRenderer, draw_views, image_tensor

logger = logging.getLogger(__name__)

# (student logits, projected student features or None, the batch's targets) ->
# (losses, with the weighted sum to minimise as "total"; batch means to report, e.g. agreement)
StepLoss = Callable[
    [torch.Tensor, torch.Tensor | None, list[torch.Tensor]],
    tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
]
# Per metric, one {"value", "step"} per epoch: the shape kedro-mlflow's MlflowMetricsHistoryDataset logs.
MetricHistory = dict[str, list[dict[str, float]]]


class FreshViews:
    """Targets per image, and a view drawn anew for every image at every step (the teacher's
    targets then come either from one view of the image, e.g. its centre, or from running the
    teacher on the drawn view: ``teacher_view`` renders it as the teacher's input, appended
    to the image's targets for :func:`with_online_teacher`)."""

    def __init__(
        self,
        augmentation: AugmentationParams,
        targets: Sequence[torch.Tensor],
        teacher_view: ViewRenderer | None = None,
    ):
        self._augmentation = augmentation
        self._targets = targets
        self._teacher_view = teacher_view

    def count(self) -> int | None:
        return len(self._targets[0]) if self._targets else None

    def keys(self, order: list[int], generator: torch.Generator) -> list[tuple[int, torch.Tensor]]:
        return list(zip(order, draw_views(len(order), self._augmentation, generator), strict=True))

    def view(self, index: int, key: torch.Tensor) -> torch.Tensor:
        return key

    def targets(self, index: int, key: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
        rows = [target[index] for target in self._targets]
        if self._teacher_view is not None:
            rows.append(self._teacher_view(image, key))
        return rows


class StoredViews:
    """``per_image`` views of every image, each with its own targets (``(images, per_image,
    ...)`` tensors): every step replays one of an image's views, chosen at random, with the
    targets stored for exactly that view."""

    def __init__(self, views: torch.Tensor, targets: Sequence[torch.Tensor]):
        if any(target.shape[:2] != views.shape[:2] for target in targets):
            raise ValueError(f"views of shape {tuple(views.shape)} but targets of {[tuple(t.shape) for t in targets]}")
        self._views = views
        self._targets = targets

    def count(self) -> int:
        return len(self._views)

    def keys(self, order: list[int], generator: torch.Generator) -> list[tuple[int, int]]:
        chosen = torch.randint(self._views.shape[1], (len(order),), generator=generator)
        return list(zip(order, chosen.tolist(), strict=True))

    def view(self, index: int, key: int) -> torch.Tensor:
        return self._views[index, key]

    def targets(self, index: int, key: int, image: torch.Tensor) -> list[torch.Tensor]:
        return [target[index, key] for target in self._targets]


class ViewedImages(Dataset):
    """Training images, each seen at each step through a view (:mod:`clip_dfkd.views`) with
    the targets that belong to that view. Items are keyed ``(image index, view key)``; the
    keys come from :meth:`sampler`, which orders the images anew each epoch and picks each
    one's view, so views and order follow the training seed, with or without workers."""

    def __init__(self, sources: Sequence[ImageSource], renderer: ViewRenderer, views: FreshViews | StoredViews):
        if (count := views.count()) is not None and count != len(sources):
            raise ValueError(f"{len(sources)} images but targets for {count}")
        self._sources = sources
        self._renderer = renderer
        self._views = views

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, key: tuple[int, Any]):
        index, view_key = key
        image = image_tensor(open_rgb(self._sources[index]))
        view = self._views.view(index, view_key)
        # Rendering needs no autograd; the collated batch is an ordinary tensor again.
        with torch.inference_mode():
            pixels = self._renderer(image, view)
            targets = self._views.targets(index, view_key, image)
        return pixels, *targets

    def sampler(self, seed: int) -> Sampler:
        return _ViewSampler(len(self), self._views, seed)


class _ViewSampler(Sampler):
    def __init__(self, count: int, views: FreshViews | StoredViews, seed: int):
        self._count = count
        self._views = views
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        order = torch.randperm(self._count, generator=self._generator).tolist()
        return iter(self._views.keys(order, self._generator))


def with_online_teacher(step_loss: StepLoss, teacher: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> StepLoss:
    """``step_loss`` with the batch's last target, the teacher's rendering of each image's
    view (:class:`FreshViews` with ``teacher_view``), replaced by ``teacher``'s outputs on it."""

    def step(logits: torch.Tensor, embedding: torch.Tensor | None, targets: list[torch.Tensor]):
        *others, teacher_pixels = targets
        # Outside inference mode, so that the losses may keep them for the backward pass.
        outputs = [output.clone() for output in teacher(teacher_pixels)]
        return step_loss(logits, embedding, [*others, *outputs])

    return step


class Mixup:
    """Mixes each image of a batch with another of the same batch, ``w·a + (1 − w)·b`` with a
    weight ``w ~ Beta(alpha, alpha)`` per image, in the student's pixels and, by the same
    weights and pairs, in the teacher's rendering of the view (the batch's last target, see
    :func:`with_online_teacher`): both models see the same mixed image, since resizing and
    normalising commute with mixing. Weights and pairs follow ``seed``."""

    def __init__(self, alpha: float, seed: int):
        self._alpha = alpha
        self._random = np.random.default_rng(seed)

    def __call__(self, pixels: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        count = len(pixels)
        partners = torch.from_numpy(self._random.permutation(count))
        weights = torch.from_numpy(self._random.beta(self._alpha, self._alpha, count))
        *others, teacher_pixels = targets
        return _mixed(pixels, partners, weights), [*others, _mixed(teacher_pixels, partners, weights)]


def _mixed(images: torch.Tensor, partners: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    shape = (len(images),) + (1,) * (images.dim() - 1)
    weights = weights.to(images.device, images.dtype).view(shape)
    return weights * images + (1 - weights) * images[partners.to(images.device)]


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher_T ‖ student_T) on temperature-softened logits. The T² factor keeps the
    gradient scale of the soft targets independent of T (Hinton et al.)."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


class AccumulatedStep:
    """The gradient of a batch's loss, from the whole batch at once or, when that does not
    fit in device memory, from parts of it, each part's loss weighted by its share of the
    batch. Every loss here is a mean over the batch's images, so the accumulated gradient is
    the batch's own; only batch-norm layers in training mode see each part's statistics
    instead of the batch's.

    After an out-of-memory error the partial gradients are dropped and the batch is taken
    again in parts of half the size, down to one image (then :class:`StudentOutOfMemoryError`);
    later batches keep to the part size that fitted.
    """

    def __init__(self, forward, step_loss: StepLoss, scaler, optimizer, runtime: Runtime, description: str):
        self._forward = forward
        self._step_loss = step_loss
        self._scaler = scaler
        self._optimizer = optimizer
        self._runtime = runtime
        self._description = description
        self._fitting = FittingBatches(self._warn_split, self._out_of_memory)

    def backward(self, pixels: torch.Tensor, targets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accumulate the batch's gradient; return its mean losses (``<name>_loss``) and
        measures, detached, on the device."""

        def backward_part(part: range) -> dict[str, torch.Tensor]:
            chunk = slice(part.start, part.stop)
            with self._runtime.autocast():
                logits, embedding = self._forward(pixels[chunk])
            losses, measures = self._step_loss(logits.float(), embedding, [target[chunk] for target in targets])
            share = len(part) / len(pixels)
            self._scaler.scale(losses["total"] * share).backward()
            reported = {f"{name}_loss": value for name, value in losses.items()} | measures
            return {name: value.detach().float() * share for name, value in reported.items()}

        def summed(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            return {name: sum(part[name] for part in parts) for name in parts[0]}

        # zero_grad drops the gradients a failed attempt's parts left (set to None, its default).
        return self._fitting.run_whole(range(len(pixels)), backward_part, summed, self._optimizer.zero_grad)

    def _warn_split(self, tried: int, fits: int) -> None:
        logger.warning(
            "%s: a step on %d images at once does not fit in device memory; accumulating the gradient "
            "over parts of %d (batch-norm statistics are then per part)",
            self._description,
            tried,
            fits,
        )

    def _out_of_memory(self) -> StudentOutOfMemoryError:
        return StudentOutOfMemoryError(
            f"{self._description}: out of device memory training on a single image in "
            f"{str(self._runtime.dtype).removeprefix('torch.')}; set runtime.precision=bf16 (or fp16), "
            "or a smaller student.model_name or student.image_size"
        )


class StudentOutOfMemoryError(UserError, RuntimeError):
    """Not even one image fits a training step on the device; the message says what to change."""


class TooFewTrainingImagesError(UserError, ValueError):
    """A single training image, which batch-norm layers in training mode cannot normalise."""


# The share of the steps over which the learning rate climbs to its peak.
WARM_UP_FRACTION = 0.1


def warm_up_fraction(total_steps: int) -> float:
    """``WARM_UP_FRACTION``, or 0 (no warm-up) when that share is one step or less.

    OneCycleLR ends its warm-up at step ``fraction * total_steps - 1``: at exactly 0 (10 steps
    in all, e.g. 10 epochs of one batch) it divides by zero, and below 0 it has no warm-up
    step anyway."""
    return WARM_UP_FRACTION if WARM_UP_FRACTION * total_steps > 1 else 0.0


def _batch_norm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]


def fit_student(
    student: StudentClassifier,
    images: ViewedImages,
    step_loss: StepLoss,
    training: TrainingParams,
    runtime: Runtime,
    description: str,
    freeze_batch_norm: bool = False,
    mix: Mixup | None = None,
) -> MetricHistory:
    """Train ``student`` in place (AdamW, one-cycle learning rate, mixed precision on an
    accelerator) on ``images`` for ``training.epochs``, minimising ``step_loss``'s total.

    Only parameters that require a gradient are trained. ``freeze_batch_norm`` keeps
    batch-norm layers on their running statistics (neither using nor updating the batch's),
    as fine-tuning on a few images of one domain needs: else they become that domain's. ``mix``
    mixes each batch's images (and the teacher's view of them) before the step. The
    caller seeds (before creating the student, so that its initial weights are seeded too);
    ``training.seed`` orders the images and draws or picks their views.

    A batch whose step does not fit in device memory is taken in parts of half as many
    images, down to one, their gradients accumulated into the batch's (see
    :class:`AccumulatedStep`); later batches keep to the part size that fitted.

    Returns per-epoch means over the images: each loss as ``<name>_loss``, each reported
    measure under its name, the final ``learning_rate`` and ``epoch_seconds``.
    """
    if len(images) < 2 and not freeze_batch_norm and _batch_norm_layers(student):
        raise TooFewTrainingImagesError(
            f"{description}: {len(images)} training image; the student's batch-norm layers need batches of at least 2"
        )
    student.to(runtime.device, memory_format=runtime.memory_format)
    loader = DataLoader(
        images,
        batch_size=min(training.batch_size, len(images)),
        sampler=images.sampler(training.seed),
        drop_last=len(images) > training.batch_size,
        num_workers=runtime.num_workers,
        persistent_workers=runtime.num_workers > 0,  # workers start once, not once per epoch
        pin_memory=runtime.device.type == "cuda",
    )
    optimizer = torch.optim.AdamW(
        [parameter for parameter in student.parameters() if parameter.requires_grad],
        lr=training.learning_rate,
        weight_decay=training.weight_decay,
        fused=True,  # one kernel for every parameter, on CPU and GPU
    )
    total_steps = training.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=training.learning_rate, total_steps=total_steps, pct_start=warm_up_fraction(total_steps)
    )
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(enabled=runtime.device.type == "cuda" and runtime.dtype == torch.float16)
    forward = torch.compile(student.forward_distill) if runtime.compile else student.forward_distill
    step = AccumulatedStep(forward, step_loss, scaler, optimizer, runtime, description)

    history: MetricHistory = defaultdict(list)
    with ProgressBar(total_steps, description, unit="step") as progress:
        for epoch in range(training.epochs):
            student.train()
            if freeze_batch_norm:
                for module in _batch_norm_layers(student):
                    module.eval()
            started = time.perf_counter()
            # Batch-weighted sums kept on the device: reading a value back each step would make
            # the CPU wait for the GPU at every step; they are read once per epoch.
            sums: dict[str, torch.Tensor] = {}
            seen = 0
            for pixels, *targets in loader:
                pixels = pixels.to(runtime.device, non_blocking=True, memory_format=runtime.memory_format)
                targets = [target.to(runtime.device, non_blocking=True) for target in targets]
                if mix is not None:
                    pixels, targets = mix(pixels, targets)
                optimizer.zero_grad(set_to_none=True)
                reported = step.backward(pixels, targets)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                batch = len(pixels)
                seen += batch
                for name, value in reported.items():
                    sums[name] = sums.get(name, 0) + value * batch
                progress.update(1)
            epoch_metrics = {name: value.item() / seen for name, value in sums.items()}
            progress.set_postfix(epoch=epoch + 1, loss=f"{epoch_metrics['total_loss']:.4f}")
            epoch_metrics["learning_rate"] = scheduler.get_last_lr()[0]
            epoch_metrics["epoch_seconds"] = time.perf_counter() - started
            for name, value in epoch_metrics.items():
                history[name].append({"value": value, "step": epoch})
            logger.info(
                "%s, epoch %d/%d: %s",
                description,
                epoch + 1,
                training.epochs,
                ", ".join(f"{name} {value:.4f}" for name, value in epoch_metrics.items() if name != "epoch_seconds"),
            )
    student.to("cpu", memory_format=torch.contiguous_format).eval()
    return dict(history)
