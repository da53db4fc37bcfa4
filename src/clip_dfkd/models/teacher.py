"""The CLIP teacher: open_clip model, its preprocessing and a zero-shot head."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clip_dfkd.errors import UserError
from clip_dfkd.imaging import ImageSource, iterate_batches, open_rgb
from clip_dfkd.models.checkpoints import architecture_mismatch, checkpoint_shapes
from clip_dfkd.models.errors import ModelNotFoundError
from clip_dfkd.models.hub import hub_reachable
from clip_dfkd.models.model_configs import building_without_weights, register_project_model_configs
from clip_dfkd.params import TeacherParams, looks_like_path
from clip_dfkd.progress import ProgressBar
from clip_dfkd.runtime import FittingBatches, Runtime
from clip_dfkd.views import ViewRenderer, image_tensor

logger = logging.getLogger(__name__)


@dataclass
class ClipTeacher:
    """An open_clip model ready for zero-shot classification and embedding."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    runtime: Runtime
    name: str
    _fitting: FittingBatches = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._fitting = FittingBatches(self._warn_split, self._out_of_memory)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings of a preprocessed batch."""
        with self.runtime.autocast():
            features = self.model.encode_image(pixels.to(self.runtime.device))
        return F.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised float32 text embeddings."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.runtime.device)
            with self.runtime.autocast():
                chunks.append(self.model.encode_text(tokens).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    def zero_shot_weights(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """One unit vector per class: the normalised mean of its prompt-ensemble embeddings."""
        prompts = zero_shot_prompts(class_names, templates)
        embeddings = self.encode_texts(prompts).view(len(class_names), len(templates), -1)
        return F.normalize(embeddings.mean(dim=1), dim=-1)

    def classify(self, pixels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-shot logits (CLIP's logit scale applied) and the normalised image embeddings.

        A batch that does not fit in device memory is encoded half as many images at a time,
        down to one, with a warning; later batches keep to the size that fitted.
        """
        embeddings = self._fitting.run(pixels, self.encode_images, torch.cat)
        return self.logit_scale * embeddings @ weights.T, embeddings

    def _warn_split(self, tried: int, fits: int) -> None:
        logger.warning("teacher: %d images at once do not fit in device memory; encoding %d at a time", tried, fits)

    def _out_of_memory(self) -> TeacherOutOfMemoryError:
        return TeacherOutOfMemoryError(
            f"teacher: out of device memory encoding a single image with {self.name} in "
            f"{str(self.runtime.dtype).removeprefix('torch.')}; set runtime.precision=bf16 (or fp16), or a "
            "smaller teacher.model_name"
        )

    def classify_images(
        self, sources: Sequence[ImageSource], weights: torch.Tensor, batch_size: int, description: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`classify` over every image of ``sources``, in order, decoded in batches (in
        DataLoader workers when the runtime has them) with a progress bar; both on the CPU.

        Raises:
            UnreadableImagesError: at the first batch with an image that cannot be decoded.
        """
        logits, embeddings = [], []
        batches = iterate_batches(sources, self.preprocess, batch_size, self.runtime.device, self.runtime.num_workers)
        with ProgressBar(len(sources), description, unit="img") as progress:
            for indices, ok, pixels in batches:
                if not bool(ok.all()):
                    raise UnreadableImagesError(indices[~ok].tolist())
                batch_logits, batch_embeddings = self.classify(pixels, weights)
                logits.append(batch_logits.cpu())
                embeddings.append(batch_embeddings.cpu())
                progress.update(len(pixels))
        return torch.cat(logits), torch.cat(embeddings)

    @property
    def view_renderer(self) -> ViewRenderer:
        """How a view (:mod:`clip_dfkd.views`) becomes this teacher's input: its image size,
        interpolation and normalisation."""
        return ViewRenderer.for_open_clip(self.model.visual.preprocess_cfg)

    def classify_views(
        self,
        sources: Sequence[ImageSource],
        views: torch.Tensor,
        weights: torch.Tensor,
        batch_size: int,
        description: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`classify` on every view of ``views`` ``(images, per_image, 8)``, rendered by
        :attr:`view_renderer`: logits ``(images, per_image, classes)`` and embeddings
        ``(images, per_image, dim)``, on the CPU. Each image is decoded once for all its views."""
        per_image = views.shape[1]
        loader = DataLoader(
            _RenderedViews(sources, views, self.view_renderer),
            batch_size=max(1, batch_size // per_image),
            num_workers=self.runtime.num_workers,
            pin_memory=self.runtime.device.type == "cuda",
        )
        logits, embeddings = [], []
        with ProgressBar(len(sources) * per_image, description, unit="view") as progress:
            for pixels in loader:
                batch_logits, batch_embeddings = self.classify(pixels.flatten(0, 1), weights)
                logits.append(batch_logits.cpu().unflatten(0, (-1, per_image)))
                embeddings.append(batch_embeddings.cpu().unflatten(0, (-1, per_image)))
                progress.update(pixels.shape[0] * per_image)
        return torch.cat(logits), torch.cat(embeddings)


class _RenderedViews(Dataset):
    """Item ``i``: every view of image ``i``, rendered, ``(per_image, 3, size, size)``."""

    def __init__(self, sources: Sequence[ImageSource], views: torch.Tensor, renderer: ViewRenderer):
        self._sources = sources
        self._views = views
        self._renderer = renderer

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = image_tensor(open_rgb(self._sources[index]))
        with torch.inference_mode():
            return torch.stack([self._renderer(image, view) for view in self._views[index]])


def zero_shot_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The prompts of a zero-shot head, class by class: every template with the class's name."""
    return [template.format(class_name=name) for name in class_names for template in templates]


def teacher_tokenizer(model_name: str) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for ``model_name``, padding or cutting to its context length
    (``context_length``, from the model's config); no weights are read."""
    import open_clip

    register_project_model_configs()
    return open_clip.get_tokenizer(model_name)


def _token_counts(tokenizer: Callable[..., torch.Tensor], texts: Sequence[str]) -> torch.Tensor:
    """How many tokens each text has uncut, start and end tokens included: tokenised in a
    context long enough for any text (a token stands for at least one UTF-8 byte, and a
    character is at most four), the position after its last token that is not padding."""
    room = 4 * max(map(len, texts)) + 3
    tokens = tokenizer(list(texts), context_length=room)
    padding = tokens[:, -1:]  # the last position is padding in every row
    return room - (tokens != padding).int().flip(1).argmax(dim=1)


def indistinguishable_class_problems(params: TeacherParams, class_names: Sequence[str]) -> list[str]:
    """Classes that the teacher's zero-shot head cannot tell apart, one line each: a class
    whose prompt (a template of ``params.templates`` with its name) is longer than the
    teacher's context, which cuts off the end; and classes whose prompts are the same tokens
    under every template, so the same head row (or why the tokenizer cannot be loaded). From
    the tokenizer alone: fast, and no weights are read."""
    try:
        tokenizer = teacher_tokenizer(params.model_name)
    except OSError as exc:  # a Hugging Face tokenizer, neither in the local cache nor downloadable here
        reason = str(exc).splitlines()[0]
        return [
            f"teacher.model_name={params.model_name}: its tokenizer cannot be loaded here ({reason}); allowed: a "
            f"model whose tokenizer is cached (open_clip.get_tokenizer({params.model_name!r}) fills "
            "~/.cache/huggingface where there is network)"
        ]
    limit = tokenizer.context_length
    prompts = zero_shot_prompts(class_names, params.templates)
    counts = _token_counts(tokenizer, prompts).view(len(class_names), len(params.templates))
    problems = []
    for index, name in enumerate(class_names):
        longest = int(counts[index].argmax())
        if (count := int(counts[index, longest])) > limit:
            prompt = prompts[index * len(params.templates) + longest]
            problems.append(
                f"classes: {name!r} makes the teacher's prompt {prompt!r} {count} tokens long (start and end "
                f"included), and teacher.model_name={params.model_name} reads {limit}: the rest is cut off; allowed: "
                f"names whose every prompt of teacher.templates fits in {limit} tokens"
            )
    seen = tokenizer(prompts).view(len(class_names), -1)
    classes_by_tokens: dict[tuple[int, ...], list[str]] = {}
    for name, tokens in zip(class_names, seen, strict=True):
        classes_by_tokens.setdefault(tuple(tokens.tolist()), []).append(name)
    for same in (names for names in classes_by_tokens.values() if len(names) > 1):
        problems.append(
            f"classes: {' and '.join(map(repr, same))} are the same tokens for teacher.model_name="
            f"{params.model_name} in every prompt of teacher.templates, so the teacher cannot tell them apart; "
            "allowed: names that its tokenizer tells apart"
        )
    return problems


class TeacherOutOfMemoryError(UserError, RuntimeError):
    """Not even one image fits on the device; the message says what to change."""


class UnreadableImagesError(ValueError):
    """Images the teacher was asked to classify that cannot be decoded (``indices`` into its
    sources); the caller says what to do about them."""

    def __init__(self, indices: list[int]):
        super().__init__(f"images {indices} cannot be decoded")
        self.indices = indices


def missing_teacher_weights(params: TeacherParams) -> str | None:
    """Why the teacher's weights cannot be loaded here, or None when they can (or may still
    be downloaded). Cheap: reads the disk and the Hugging Face cache, never the network; a
    checkpoint file must also fit ``params.model_name``."""
    import open_clip

    if looks_like_path(params.pretrained):
        if Path(params.pretrained).expanduser().is_file():
            return checkpoint_architecture_problem(params)
        return (
            f"teacher.pretrained={params.pretrained!r}: no such checkpoint file; allowed: a local "
            "open_clip checkpoint (.pt/.bin/.safetensors) or a tag of "
            f"open_clip.list_pretrained_tags_by_model({params.model_name!r})"
        )
    if hub_reachable():
        return None  # open_clip downloads it on first use
    try:
        # With HF_HUB_OFFLINE set this only looks in the cache.
        open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(params.model_name, params.pretrained))
    except Exception:  # noqa: BLE001 - any failure means "not in the cache"
        return _download_hint(params)
    return None


def checkpoint_architecture_problem(params: TeacherParams) -> str | None:
    """Why the checkpoint file ``params.pretrained`` does not fit ``params.model_name``, or
    None (also for a layout open_clip's loader is left to judge)."""
    import open_clip

    register_project_model_configs()
    key = f"teacher.pretrained={params.pretrained!r}"
    try:
        found = checkpoint_shapes(Path(params.pretrained).expanduser())
    except ValueError as exc:
        return f"{key}: {exc}; allowed: an open_clip checkpoint of {params.model_name}"
    if found is None:
        return None
    with building_without_weights():
        model = open_clip.create_model(params.model_name, device="meta", **pretrained_tag_settings(params))
    # open_clip resizes position embeddings to the model's grid when it loads a checkpoint.
    mismatch = architecture_mismatch(model, found, ignored=("positional_embedding", "visual.positional_embedding"))
    if mismatch is None:
        return None
    return (
        f"{key}: the checkpoint does not fit open_clip model {params.model_name!r} ({mismatch}); allowed: a "
        f"checkpoint of {params.model_name}, or set teacher.model_name to the checkpoint's architecture"
    )


def _download_hint(params: TeacherParams) -> str:
    return (
        f"teacher: open_clip weights {params.display_name} are not in the local "
        "cache and cannot be downloaded here; download them where there is network "
        f"(open_clip.create_model_and_transforms({params.model_name!r}, pretrained={params.pretrained!r}) "
        "fills ~/.cache/huggingface) or set teacher.pretrained to a local checkpoint file"
    )


def pretrained_tag_settings(params: TeacherParams) -> dict[str, bool]:
    """The model settings that ``params.pretrained``'s own pretrained config records.

    open_clip builds ``ViT-B-32`` with GELU, but OpenAI's (and several LAION and MetaCLIP)
    weights were trained with QuickGELU; loading them into a GELU model only warns and gives
    a subtly different teacher. A tag's config is open_clip's; a checkpoint file's is the
    ``model_cfg`` of an ``open_clip_config.json`` beside it (the file open_clip's Hugging Face
    hub repositories carry). A bare file records nothing: its model name must say it
    (``ViT-B-32-quickgelu`` for a local copy of OpenAI's weights).
    """
    import open_clip

    if looks_like_path(params.pretrained):
        beside = Path(params.pretrained).expanduser().with_name("open_clip_config.json")
        try:
            recorded = json.loads(beside.read_text()).get("model_cfg", {})
        except (OSError, ValueError):
            recorded = {}
    else:
        recorded = open_clip.get_pretrained_cfg(params.model_name, params.pretrained)
    return {"force_quick_gelu": True} if recorded.get("quick_gelu", False) else {}


def teacher_token_embedding_dim(params: TeacherParams) -> int | None:
    """The size of the teacher's token embeddings (where inversion's pseudo-words live), from
    its open_clip config alone; None for a config this cannot read (e.g. an HF text tower)."""
    import open_clip

    register_project_model_configs()
    return (open_clip.get_model_config(params.model_name) or {}).get("text_cfg", {}).get("width")


def load_teacher(params: TeacherParams, runtime: Runtime) -> ClipTeacher:
    """Load an open_clip model from a pretrained tag or a local checkpoint file."""
    import open_clip

    register_project_model_configs()
    if problem := missing_teacher_weights(params):
        raise ModelNotFoundError(problem)
    pretrained = params.pretrained
    if looks_like_path(pretrained):
        pretrained = str(Path(pretrained).expanduser())
    logger.info("Loading teacher %s (%s)", params.model_name, params.pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            params.model_name, pretrained=pretrained, device=runtime.device, **pretrained_tag_settings(params)
        )
    except RuntimeError as exc:
        if looks_like_path(params.pretrained):
            raise ModelNotFoundError(
                f"teacher.pretrained={params.pretrained!r}: the checkpoint does not fit "
                f"open_clip model {params.model_name!r} ({str(exc).splitlines()[0]})"
            ) from exc
        raise ModelNotFoundError(_download_hint(params)) from exc
    model.eval().requires_grad_(False)
    return ClipTeacher(
        model=model,
        preprocess=preprocess,
        tokenizer=teacher_tokenizer(params.model_name),
        runtime=runtime,
        name=params.display_name,
    )


def load_zero_shot_teacher(
    params: TeacherParams, runtime: Runtime, class_names: Sequence[str]
) -> tuple[ClipTeacher, torch.Tensor]:
    """:func:`load_teacher` and its zero-shot head over ``class_names`` from ``params.templates``."""
    teacher = load_teacher(params, runtime)
    return teacher, teacher.zero_shot_weights(list(class_names), params.templates)
