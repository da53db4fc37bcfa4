"""Typed parameters of every pipeline.

Kedro validates a node's ``params:`` input against the pydantic model in the node's type
hint before any node runs, so a bad value stops a run before heavy work. Each error is
reported on one line that names the full key, the bad value and what is allowed.

Only static checks live here (types, ranges, names known to open_clip/timm/diffusers).
Checks that read the disk (weights paths, benchmark folders) run in
:class:`clip_dfkd.preflight.PreflightHook`, so that ``kedro viz`` works on machines without
the data.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from clip_dfkd.benchmark_layouts import LAYOUTS
from clip_dfkd.errors import UserError
from clip_dfkd.vocabularies import CLASS_LISTS, STYLE_LISTS, resolve_named_list


class InvalidParameterError(UserError, ValueError):
    """A parameter value that is not allowed; the message is one line."""


def _bad(field: str, value: Any, reason: str) -> PydanticCustomError:
    """An error of a cross-field check, reported against ``field`` like a field error."""
    return PydanticCustomError("bad_param", reason, {"field": field, "value": value})


def _one_line(section: str, exc: ValidationError) -> str:
    messages = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if error["type"] == "bad_param":
            loc.append(error["ctx"]["field"])
            value = error["ctx"]["value"]
        else:
            value = error["input"]
        message = error["msg"].removeprefix("Value error, ")
        key = ".".join([section, *loc]).strip(".")
        messages.append(f"{key}={value!r}: {message}")
    return "; ".join(messages)


class _OneLineErrors:
    """Turns pydantic's multi-line report into one line per bad key."""

    section: ClassVar[str] = ""

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)  # type: ignore[misc]
        except ValidationError as exc:
            raise InvalidParameterError(_one_line(cls.section, exc)) from None


class Params(_OneLineErrors, BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def as_plain(value: Any) -> Any:
    """A parameter section as plain data (dicts, lists, strings, numbers): Kedro hands a node or
    hook a validated model when a node type-hints the section, the value as written otherwise."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _check_template(template: str, required: set[str], allowed: set[str]) -> str:
    try:
        found = _placeholders(template)
    except ValueError as exc:
        raise ValueError(f"is not a format string ({exc})") from None
    if missing := required - found:
        raise ValueError(f"lacks the placeholder(s) {{{', '.join(sorted(missing))}}}")
    if unknown := found - allowed:
        raise ValueError(f"has unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return template


_WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


def looks_like_path(value: str) -> bool:
    """A weights reference is a local file when it has a path separator or a weights suffix."""
    return "/" in value or "\\" in value or value.startswith(("~", ".")) or Path(value).suffix in _WEIGHT_SUFFIXES


# --- shared ---------------------------------------------------------------------------


def _scale_range(scale: tuple[float, float]) -> tuple[float, float]:
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError("allowed: [low, high] with 0 < low <= high <= 1")
    return scale


# The range of the fraction of an image's area that a random crop covers.
ScaleRange = Annotated[tuple[float, float], AfterValidator(_scale_range)]


# Characters that show nothing on their own: controls (Cc), format characters such as the
# zero-width space and joiners, the soft hyphen and the byte-order mark (Cf), and separators (Z*).
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Zs", "Zl", "Zp"}


def _visible_form(name: str) -> str:
    """What a reader sees of ``name``: without format characters (Cf), compatibility forms
    folded (NFKC: a composed and a decomposed ``é`` agree) and case-folded."""
    shown = "".join(char for char in name if unicodedata.category(char) != "Cf")
    return unicodedata.normalize("NFKC", shown).casefold()


class ClassNames(_OneLineErrors, RootModel[list[str]]):
    """The category names the student learns; their order fixes the class indices.

    A list, or the name of a benchmark's class list (``pacs``, ``vlcs``: see
    :data:`clip_dfkd.vocabularies.CLASS_LISTS`), which ``--params`` can set.

    Whitespace is normalised: leading and trailing whitespace is stripped and every run of
    whitespace inside a name (spaces, tabs, newlines, no-break spaces) becomes one space, so
    ``"ball "`` is ``ball``. The normalised names are the class names everywhere: in prompts,
    labels and the class lists that saved artefacts record. Refused: a name with no visible
    character (empty, or only whitespace, control or zero-width characters), a name with a
    control character, and two names that read the same (equal ignoring case, Unicode
    compatibility forms and invisible format characters such as the zero-width space).
    """

    section: ClassVar[str] = "classes"

    @field_validator("root", mode="before")
    @classmethod
    def _named_list(cls, value: Any) -> Any:
        return resolve_named_list(value, CLASS_LISTS)

    @field_validator("root")
    @classmethod
    def _normalised_and_distinct(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("must list at least one class name")
        normalised = [" ".join(name.split()) for name in names]
        # Each name as written, with the Unicode categories of its characters once normalised.
        shown = [
            (name, {unicodedata.category(char) for char in normal})
            for name, normal in zip(names, normalised, strict=True)
        ]
        if blank := [name for name, found in shown if found <= _INVISIBLE_CATEGORIES]:
            raise ValueError(f"has names with no visible character {blank}; allowed: names with a visible character")
        if controls := [name for name, found in shown if "Cc" in found]:
            raise ValueError(
                f"has names with control characters {controls}; allowed: printable characters "
                "(tabs and newlines count as spaces)"
            )
        spellings: dict[str, list[str]] = {}
        for name, normal in zip(names, normalised, strict=True):
            spellings.setdefault(_visible_form(normal), []).append(name)
        if duplicates := [group for group in spellings.values() if len(group) > 1]:
            raise ValueError(
                f"has duplicate names {' and '.join(map(repr, duplicates))} (the same ignoring case, spacing, Unicode "
                "normalisation and invisible characters); class names must be unique"
            )
        return normalised

    def __iter__(self):  # type: ignore[override]
        return iter(self.root)

    def __len__(self) -> int:
        return len(self.root)

    def __getitem__(self, index: int) -> str:
        return self.root[index]

    def index(self, name: str) -> int:
        return self.root.index(name)


class RuntimeParams(Params):
    """Where and how the models run; ``auto`` picks CUDA and bf16 when available."""

    section: ClassVar[str] = "runtime"

    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    compile: bool = False
    num_workers: int = Field(default=0, ge=0)
    # The student's convolutions in channels-last layout, which tensor cores run without
    # transposing; null: on CUDA only.
    channels_last: bool | None = None

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device == "auto" or device == "cpu" or device == "mps":
            return device
        if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
            return device
        raise ValueError("allowed: auto, cpu, cuda, cuda:<index>, mps")


class TeacherParams(Params):
    """The CLIP teacher, loaded with open_clip.

    ``pretrained`` is either one of open_clip's pretrained tags for ``model_name`` (downloaded
    to the cache on first use) or the path of a local checkpoint file.
    """

    section: ClassVar[str] = "teacher"

    model_name: str
    pretrained: str
    templates: list[str] = Field(min_length=1)
    batch_size: PositiveInt = 64

    @property
    def display_name(self) -> str:
        """``<model_name>/<pretrained>``: how logs, manifests and model cards name the teacher."""
        return f"{self.model_name}/{self.pretrained}"

    @field_validator("model_name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        import open_clip

        from clip_dfkd.models.model_configs import register_project_model_configs

        register_project_model_configs()
        known = open_clip.list_models()
        if name not in known:
            examples = ", ".join(m for m in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14") if m in known)
            raise ValueError(
                f"is not an open_clip model; allowed: one of open_clip.list_models() (e.g. {examples}) "
                "or a config registered with open_clip.add_model_config"
            )
        return name

    @field_validator("templates")
    @classmethod
    def _templates_name_the_class(cls, templates: list[str]) -> list[str]:
        for template in templates:
            _check_template(template, {"class_name"}, {"class_name"})
        return templates

    @model_validator(mode="after")
    def _known_tag_or_path(self) -> TeacherParams:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(self.model_name)
        if self.pretrained not in tags and not looks_like_path(self.pretrained):
            raise _bad(
                "pretrained",
                self.pretrained,
                f"neither a pretrained tag of {self.model_name} (allowed: {', '.join(tags) or 'none'}) "
                f"nor a checkpoint path (one with a '/', or ending in {', '.join(sorted(_WEIGHT_SUFFIXES))})",
            )
        return self


# --- prompt_generation ----------------------------------------------------------------


class MixPromptParams(Params):
    """Mix-Prompt: each pseudo-word is a Dirichlet(alpha)-weighted mix of k style words.

    The defaults make peaked mixes over several words: with 4 words at alpha 0.3 the largest
    weight is 0.7 on average and a second word has more than 0.1 in about 4 mixes of 5, so a
    mix stays near one or two real words while different mixes reach the whole dictionary.
    """

    k: PositiveInt = 4
    alpha: PositiveFloat = 0.3


class ContrastivePromptParams(Params):
    """Contrastive-Prompt: a bank of learned pseudo-words, or a saved one to reuse."""

    iterations: PositiveInt = 300
    learning_rate: PositiveFloat = 0.01
    style_weight: float = Field(default=1.0, ge=0.0)
    content_weight: float = Field(default=1.0, ge=0.0)
    temperature: PositiveFloat = 0.1
    # After each step a vector longer than this × the median norm of the run's real-word token
    # rows is scaled back to it; None: unbounded (12–16× in the demo). 1.0, as long as a typical
    # real word, gave the most diverse prompts in the demo (docs/prompt_diversification.md).
    max_norm_ratio: PositiveFloat | None = 1.0
    bank_path: str | None = None


class PromptGenerationParams(Params):
    """Class names × styles → one prompt per image to synthesise.

    ``vanilla`` fills ``templates`` with the hand-written ``styles``; ``mix``, ``random`` and
    ``contrastive`` make ``num_styles`` pseudo-words in the text encoder's token-embedding
    space and fill ``pseudo_word_template`` with a placeholder that stands for them.
    """

    section: ClassVar[str] = "prompt_generation"

    method: Literal["vanilla", "mix", "random", "contrastive"] = "contrastive"
    styles: list[str] = Field(default=STYLE_LISTS["neutral"], min_length=1)
    templates: list[str] = Field(default=["a {style} of a {class_name}"], min_length=1)
    pseudo_word_template: str = "a {style} style of a {class_name}"
    num_styles: PositiveInt = 16
    images_per_class_and_style: PositiveInt = 8
    seed: int = 0
    mix: MixPromptParams = MixPromptParams()
    contrastive: ContrastivePromptParams = ContrastivePromptParams()

    @field_validator("styles", mode="before")
    @classmethod
    def _named_styles(cls, value: Any) -> Any:
        return resolve_named_list(value, STYLE_LISTS)

    @field_validator("styles")
    @classmethod
    def _unique_styles(cls, styles: list[str]) -> list[str]:
        if len({s.lower() for s in styles}) != len(styles):
            raise ValueError("has duplicate styles; styles must be unique")
        return styles

    @field_validator("templates")
    @classmethod
    def _templates_have_slots(cls, templates: list[str]) -> list[str]:
        for template in templates:
            _check_template(template, {"style", "class_name"}, {"style", "class_name"})
        return templates

    @field_validator("pseudo_word_template")
    @classmethod
    def _pseudo_word_template_has_slots(cls, template: str) -> str:
        return _check_template(template, {"style", "class_name"}, {"style", "class_name"})

    @model_validator(mode="after")
    def _mix_fits_the_dictionary(self) -> PromptGenerationParams:
        if self.method == "mix" and self.mix.k > len(self.styles):
            raise _bad(
                "mix.k",
                self.mix.k,
                f"larger than the style dictionary ({len(self.styles)} styles); allowed: 1..{len(self.styles)}",
            )
        return self


# --- image_synthesis ------------------------------------------------------------------


class GeneratorParams(Params):
    """A diffusers text-to-image pipeline: a hub id or a local ``save_pretrained`` folder."""

    section: ClassVar[str] = "image_synthesis.generator"

    model_id: str
    revision: str | None = None
    variant: str | None = None
    scheduler: str | None = None
    num_inference_steps: PositiveInt = 4
    guidance_scale: float = Field(default=0.0, ge=0.0)
    negative_prompt: str = ""
    height: PositiveInt = 512
    width: PositiveInt = 512
    # The VAE decodes the batch one image at a time (slicing) or in overlapping tiles (tiling,
    # for large images): less memory, the same images up to rounding.
    vae_slicing: bool = False
    vae_tiling: bool = False
    # A diffusers AutoencoderTiny (hub id or folder; madebyollin/taesd for SD 1.x/2.x) decodes
    # in place of the pipeline's VAE: for few-step generators the full VAE's decode is a large
    # share of each image's time. Other pixels, so it is part of every image's id.
    tiny_vae: str | None = None

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str | None) -> str | None:
        if name is None:
            return None
        import diffusers

        schedulers = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        if name not in schedulers:
            raise ValueError(f"is not a diffusers scheduler; allowed: null or {', '.join(schedulers)}")
        return name

    @field_validator("height", "width")
    @classmethod
    def _fits_the_latent_grid(cls, size: int) -> int:
        # Stable Diffusion VAEs downsample by 8; other sizes crash deep inside the UNet.
        if size % 8:
            raise ValueError("must be a multiple of 8")
        return size


class InversionDecoderParams(Params):
    """A diffusers decoder whose latent the inversion optimises: an ``AutoencoderKL`` (Stable
    Diffusion's VAE: ``subfolder: vae`` of a pipeline) or a ``VQModel`` (a VQGAN converted to
    diffusers), from a hub id or a local folder."""

    model_id: str
    subfolder: str | None = None
    revision: str | None = None


class InversionParams(Params):
    """Teacher-guided inversion (the paper's synthesis, after VQGAN-CLIP): each image is
    optimised until the teacher's embeddings of random augmented cut-outs of it match the
    prompt's text embedding. See docs/inversion.md for the formulation and sources."""

    section: ClassVar[str] = "image_synthesis.inversion"

    parameterization: Literal["pixels", "fourier", "latent"] = "fourier"
    image_size: PositiveInt = 224
    # pixels only: optimise a grid_size × grid_size image, upsampled (null: full resolution).
    grid_size: PositiveInt | None = 16
    iterations: PositiveInt = 400
    learning_rate: PositiveFloat = 0.1
    cutouts: PositiveInt = 32
    cutout_scale: ScaleRange = (0.25, 1.0)
    noise: float = Field(default=0.1, ge=0.0)
    color_jitter: float = Field(default=0.1, ge=0.0)
    tv_weight: float = Field(default=0.0, ge=0.0)
    log_every: PositiveInt = 10
    decoder: InversionDecoderParams | None = None

    @model_validator(mode="after")
    def _latent_needs_a_decoder(self) -> InversionParams:
        if self.parameterization == "latent" and self.decoder is None:
            raise _bad(
                "decoder",
                None,
                "parameterization latent needs a decoder; allowed: {model_id, subfolder, revision} of a diffusers "
                "AutoencoderKL or VQModel",
            )
        return self


class RayExecutorParams(Params):
    """Where and how wide Ray renders: ``address`` null starts a Ray on this machine, ``auto``
    joins the cluster this machine belongs to, ``ray://<head>:10001`` a remote one. Each actor
    loads one generator (or teacher, for inversion) and renders whole batches."""

    address: str | None = None
    num_actors: PositiveInt = 1
    # null: one GPU per actor when the Ray cluster has GPUs, none otherwise.
    num_gpus_per_actor: float | None = Field(default=None, ge=0.0)
    num_cpus_per_actor: float = Field(default=1.0, gt=0.0)


class ImageSynthesisParams(Params):
    """``diffusion`` samples a diffusers text-to-image ``generator``; ``inversion`` optimises
    each image against the teacher and needs no generator. ``num_shards``/``shard_index``
    make a run render only its share of the images (see docs/scaling.md); ``executor``
    ``ray`` renders on Ray actors instead of in this process."""

    section: ClassVar[str] = "image_synthesis"

    backend: Literal["diffusion", "inversion"] = "diffusion"
    generator: GeneratorParams | None = None
    inversion: InversionParams = InversionParams()
    batch_size: PositiveInt = 4
    sample_grid_columns: PositiveInt = 8
    num_shards: PositiveInt = 1
    shard_index: NonNegativeInt = 0
    executor: Literal["local", "ray"] = "local"
    ray: RayExecutorParams = RayExecutorParams()

    @model_validator(mode="after")
    def _shard_index_in_range(self) -> ImageSynthesisParams:
        if self.shard_index >= self.num_shards:
            raise _bad(
                "shard_index",
                self.shard_index,
                f"outside [0, {self.num_shards}) for num_shards={self.num_shards}; allowed: 0..{self.num_shards - 1}",
            )
        return self

    @model_validator(mode="after")
    def _diffusion_needs_a_generator(self) -> ImageSynthesisParams:
        if self.backend == "diffusion" and self.generator is None:
            raise _bad(
                "generator", None, "backend diffusion needs a generator; allowed: {model_id, ...} or backend inversion"
            )
        return self


# --- teacher_labeling -----------------------------------------------------------------


class LabelFilterParams(Params):
    """Drop synthetic images the teacher does not recognise as their intended class."""

    enabled: bool = False
    require_intended_class: bool = True
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)


class ViewLabelingParams(Params):
    """Augmented views of every image, labelled by the teacher for a student that trains
    with ``teacher_targets: stored_views``: ``per_image`` views (0: none), drawn with
    ``student_distillation.augmentation`` from ``seed`` and each image's id."""

    per_image: int = Field(default=8, ge=0)
    seed: int = 0


class TeacherLabelingParams(Params):
    section: ClassVar[str] = "teacher_labeling"

    filter: LabelFilterParams = LabelFilterParams()
    views: ViewLabelingParams = ViewLabelingParams()


# --- student_distillation -------------------------------------------------------------


class StudentParams(Params):
    """A timm classifier; ``checkpoint_path`` optionally initialises it from local ImageNet weights."""

    model_name: str
    # Keyword arguments of timm.create_model(model_name), saved with the student: a narrower or
    # shallower variant of a family (e.g. resnet10t with channels: [8, 16, 32, 64]).
    model_kwargs: dict[str, Any] = {}
    checkpoint_path: str | None = None
    image_size: PositiveInt = 224

    @field_validator("model_name")
    @classmethod
    def _known_timm_model(cls, name: str) -> str:
        import timm

        if not timm.is_model(name):
            raise ValueError(
                "is not a timm model; allowed: a name from timm.list_models() "
                "(e.g. resnet18, resnet50, mobilenetv3_large_100, efficientnet_b0)"
            )
        return name

    @property
    def architecture(self) -> str:
        """The timm name, followed by its keyword arguments where there are any."""
        if not self.model_kwargs:
            return self.model_name
        return f"{self.model_name}({', '.join(f'{key}={value}' for key, value in self.model_kwargs.items())})"

    @model_validator(mode="after")
    def _model_kwargs_build(self) -> StudentParams:
        """Builds the architecture on the meta device (no memory, no weights), so a keyword
        timm does not take fails here rather than after synthesis and labelling."""
        if not self.model_kwargs:
            return self
        import timm
        import torch

        try:
            with torch.device("meta"):
                timm.create_model(self.model_name, num_classes=2, **self.model_kwargs)
        except Exception as exc:  # timm raises TypeError, ValueError, KeyError, ... by family
            raise _bad(
                "model_kwargs",
                self.model_kwargs,
                f"timm.create_model({self.model_name!r}) refused them ({type(exc).__name__}: {exc}); "
                "allowed: keyword arguments of that model's constructor",
            ) from None
        return self


class DistillationLossParams(Params):
    temperature: PositiveFloat = 4.0
    kd_weight: float = Field(default=1.0, ge=0.0)
    # Weight of 1 − cos(student projection, teacher embedding). (A squared L2 distance between
    # the two unit vectors would be exactly twice it: a weight, not another loss.)
    embedding_weight: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _some_signal(self) -> DistillationLossParams:
        if self.kd_weight == 0 and self.embedding_weight == 0:
            raise _bad("kd_weight", 0, "kd_weight and embedding_weight are both 0; allowed: at least one > 0")
        return self


# Where the teacher's targets for a training step come from: its outputs on the whole image
# (``centre``, computed once), on views of the image stored ahead with their outputs and
# replayed exactly (``stored_views``), or the teacher run on the step's own views (``online``).
TeacherTargets = Literal["centre", "stored_views", "online"]


class AugmentationParams(Params):
    crop_scale: ScaleRange = (0.5, 1.0)
    horizontal_flip: bool = True
    color_jitter: float = Field(default=0.3, ge=0.0)


class TrainingParams(Params):
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    learning_rate: PositiveFloat = 1e-3
    weight_decay: float = Field(default=0.05, ge=0.0)
    seed: int = 0

    @field_validator("batch_size")
    @classmethod
    def _batch_norm_needs_two(cls, batch_size: int) -> int:
        # A batch-norm layer in training mode normalises by the batch's statistics: one image
        # has none (timm's ResNets fail outright once the feature map is 1 x 1).
        if batch_size < 2:
            raise ValueError("a training batch needs at least 2 images (batch-norm statistics); allowed: >= 2")
        return batch_size


class RegistryParams(Params):
    model_name: str = Field(default="clip-dfkd-student", min_length=1)
    alias: str = Field(default="candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    # Also log the student as ONNX beside the registered model (a few seconds per run).
    export_onnx: bool = True


class StudentDistillationParams(Params):
    section: ClassVar[str] = "student_distillation"

    student: StudentParams
    training: TrainingParams = TrainingParams()
    loss: DistillationLossParams = DistillationLossParams()
    augmentation: AugmentationParams = AugmentationParams()
    teacher_targets: TeacherTargets = "stored_views"
    registry: RegistryParams = RegistryParams()


# --- ood_evaluation -------------------------------------------------------------------


BenchmarkLayout = Literal[("folders", *LAYOUTS)]  # type: ignore[valid-type]


class BenchmarkParams(Params):
    """A benchmark folder: ``layout`` names a published benchmark's layout (docs/benchmarks.md)
    or ``folders``, ``<root>/<domain>/<class>/<image files>``. ``domains`` defaults to the
    benchmark's published ones (every domain folder for ``folders``); ``split: test`` reads the
    official test list where the benchmark has one, ``all`` every image; ``class_aliases``
    maps a benchmark folder or class word to a class of the run. ``enabled: false`` keeps the
    entry in the configuration but neither checks nor evaluates it."""

    root: str
    layout: BenchmarkLayout = "folders"
    domains: list[str] | None = None
    split: Literal["test", "all"] = "test"
    class_aliases: dict[str, str] = {}
    enabled: bool = True

    def resolved_root(self) -> str:
        """The folder ``root`` names, absolute and with links resolved: what an evaluation
        records, so that scores of two folders under one benchmark name are told apart."""
        return str(Path(self.root).expanduser().resolve())


class PromotionParams(Params):
    """The registry alias that moves only to a better student: the evaluated version takes
    ``alias`` when its ``metric`` averaged over ``benchmark``'s domains (null: the first
    enabled benchmark) beats the current holder's by more than ``min_improvement``, or when
    no version holds it yet; a holder it cannot be compared with (another class list, no such
    figure from the same benchmark folder) keeps it (clip_dfkd.promotion)."""

    alias: str = Field(default="champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    benchmark: str | None = Field(default=None, min_length=1)
    metric: Literal["student_top1", "agreement", "student_teacher_ratio"] = "student_top1"
    min_improvement: float = Field(default=0.0, ge=0.0)


# The evaluation setting of the distilled student as it is, having seen no real image.
DATA_FREE = "data-free"


class FewShotParams(Params):
    """The few-shot setting: ``k`` real images per class (0: data-free only), drawn with
    ``seed`` from ``source_domains`` (``{benchmark: [domain, ...]}``), fine-tune the distilled
    student against their true class (``label_weight``, cross-entropy) and the teacher's
    zero-shot logits on the view being trained on (``kd_weight``, T² · KL at ``temperature``;
    ``teacher_targets`` as in student_distillation); that student is
    scored on every other evaluated domain, next to the data-free one. ``layers``: train
    ``all`` of them or only the ``classifier`` (a linear probe); ``freeze_batch_norm`` keeps
    the batch-norm statistics the student learnt on the synthetic images; ``interpolation``
    moves the distilled weights only that share of the way to the fine-tuned ones (WiSE-FT,
    Wortsman et al. 2022: 1 is the fine-tuned student, smaller keeps more of what it knew
    of the other domains)."""

    k: int = Field(default=0, ge=0)
    source_domains: dict[str, list[str]] = {}
    seed: int = 0
    label_weight: float = Field(default=1.0, ge=0.0)
    kd_weight: float = Field(default=1.0, ge=0.0)
    temperature: PositiveFloat = 4.0
    # The classifier alone by default: fine-tuning every layer on one domain's shots pulls the
    # features towards that domain and away from the others (docs/few_shot.md).
    layers: Literal["all", "classifier"] = "classifier"
    freeze_batch_norm: bool = True
    training: TrainingParams = TrainingParams(epochs=30, batch_size=32, learning_rate=1e-4)
    augmentation: AugmentationParams = AugmentationParams()
    # stored_views labels views_per_image views of each few-shot image before fine-tuning.
    teacher_targets: TeacherTargets = "stored_views"
    views_per_image: PositiveInt = 8
    interpolation: float = Field(default=1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_signal(self) -> FewShotParams:
        if self.label_weight == 0 and self.kd_weight == 0:
            raise _bad("label_weight", 0, "label_weight and kd_weight are both 0; allowed: at least one > 0")
        if self.k and not any(self.source_domains.values()):
            raise _bad(
                "source_domains",
                self.source_domains,
                "k > 0 needs domains to draw from; allowed: {benchmark: [domain, ...]}, e.g. {pacs: [photo]}",
            )
        return self

    def describe(self) -> str:
        """The setting's name in reports: ``few-shot k=<k>``."""
        return f"few-shot k={self.k}"

    def source_names(self) -> list[str]:
        """The source domains as ``<benchmark>/<domain>``, in configuration order."""
        return [f"{benchmark}/{domain}" for benchmark, domains in self.source_domains.items() for domain in domains]


class OodEvaluationParams(Params):
    section: ClassVar[str] = "ood_evaluation"

    benchmarks: dict[str, BenchmarkParams] = Field(min_length=1)
    batch_size: PositiveInt = 64
    promotion: PromotionParams = PromotionParams()
    few_shot: FewShotParams = FewShotParams()

    @model_validator(mode="after")
    def _one_enabled(self) -> OodEvaluationParams:
        if not any(benchmark.enabled for benchmark in self.benchmarks.values()):
            raise _bad(
                "benchmarks",
                {name: {"enabled": False} for name in self.benchmarks},
                "every benchmark is disabled; allowed: at least one benchmark with enabled: true",
            )
        enabled = list(self.enabled_benchmarks())
        if self.promotion.benchmark is not None and self.promotion.benchmark not in enabled:
            raise _bad(
                "promotion.benchmark",
                self.promotion.benchmark,
                f"not an enabled benchmark; allowed: {enabled}",
            )
        if self.few_shot.k:
            self._check_few_shot_sources()
        return self

    def _check_few_shot_sources(self) -> None:
        """The few-shot sources against the domains known without reading the disk (a
        ``folders`` benchmark's are checked when it is scanned, by the preflight hook)."""
        if problem := self.few_shot_source_problem(
            {name: self.evaluated_domains(name) for name in self.enabled_benchmarks()}
        ):
            raise _bad(*problem)

    def few_shot_source_problem(self, found: Mapping[str, Sequence[str] | None]) -> tuple[str, Any, str] | None:
        """Why the few-shot sources do not fit the evaluated domains ``found`` per enabled
        benchmark (None: not known yet), as ``(key, value, reason)``: a source benchmark that
        is not enabled, a source domain that is not evaluated, or no domain left to score."""
        sources = self.few_shot.source_domains
        if unknown := [name for name in sources if name not in found]:
            return "few_shot.source_domains", sources, f"{unknown} not enabled benchmarks; allowed: {list(found)}"
        for name, domains in sources.items():
            known = found[name]
            if known is not None and (missing := [domain for domain in domains if domain not in known]):
                return (
                    f"few_shot.source_domains.{name}",
                    domains,
                    f"{missing} not evaluated domains; allowed: {list(known)}",
                )
        if all(known is not None and set(known) <= set(sources.get(name, [])) for name, known in found.items()):
            return (
                "few_shot.source_domains",
                sources,
                "leaves no evaluated domain to score the few-shot student on; allowed: sources that leave one out",
            )
        return None

    def few_shot_source_error(self, found: Mapping[str, Sequence[str]]) -> str | None:
        """:meth:`few_shot_source_problem` for the domains found on disk, as one line."""
        if problem := self.few_shot_source_problem(found):
            key, value, reason = problem
            return f"{self.section}.{key}={value!r}: {reason}"
        return None

    def few_shot_shortage_error(self, counts: Mapping[str, Mapping[str, int]], images: str) -> str | None:
        """Why the source domains cannot give ``few_shot.k`` images of every class, as one
        line, or None. ``counts``: per class, the ``images`` found (``"image files"`` before
        the run, ``"readable images"`` once decoded) in each source domain
        (``<benchmark>/<domain>``, as :meth:`FewShotParams.source_names`)."""
        k = self.few_shot.k
        totals = {name: sum(found.values()) for name, found in counts.items()}
        if all(total >= k for total in totals.values()):
            return None
        key = f"{self.section}.few_shot.k={k}"
        sources = ", ".join(self.few_shot.source_names())
        if absent := [name for name, total in totals.items() if total == 0]:
            classes = f"class {absent[0]!r} has" if len(absent) == 1 else f"classes {absent} have"
            return (
                f"{key}: {classes} no {images} in the source domains {sources}; allowed: "
                f"{self.section}.few_shot.source_domains that hold k={k} {images} of every class"
            )
        fewest = min(totals, key=totals.get)
        where = ", ".join(f"{domain}: {count}" for domain, count in counts[fewest].items())
        return (
            f"{key}: class {fewest!r} has {totals[fewest]} {images} in the source domains ({where}), the fewest "
            f"of any class; allowed: k <= {totals[fewest]}, or more source domains"
        )

    def evaluated_domains(self, name: str) -> list[str] | None:
        """The domains evaluated of benchmark ``name``: its ``domains``, else its published
        ones; None for a ``folders`` layout without ``domains`` (every folder on disk)."""
        benchmark = self.benchmarks[name]
        if benchmark.domains is not None:
            return list(benchmark.domains)
        if benchmark.layout == "folders":
            return None
        layout = LAYOUTS[benchmark.layout]
        return list(layout.default_domains or layout.domains)

    def promotion_benchmark(self) -> str:
        """The benchmark whose average decides promotion."""
        return self.promotion.benchmark or next(iter(self.enabled_benchmarks()))

    def enabled_benchmarks(self) -> dict[str, BenchmarkParams]:
        return {name: benchmark for name, benchmark in self.benchmarks.items() if benchmark.enabled}


# --- comparison -----------------------------------------------------------------------


class ComparisonParams(Params):
    """Which tracked runs the comparison table reads: the FINISHED runs of the MLflow
    ``experiment`` (null: the project's own, from mlflow.yml) that match ``filter_string`` (an
    MLflow search filter; empty: every run) and carry an ood_evaluation table. ``benchmark``
    (null: every one found) keeps one benchmark's columns; ``setting`` the rows of one
    evaluation setting (``data-free``, or ``few-shot k=<k>`` as ood_evaluation names it);
    ``decimals`` rounds the cells; ``show_range`` adds the student's min–max over a row's
    runs when it has several."""

    section: ClassVar[str] = "comparison"

    experiment: str | None = Field(default=None, min_length=1)
    filter_string: str = ""
    benchmark: str | None = Field(default=None, min_length=1)
    setting: str = Field(default=DATA_FREE, pattern=r"^(data-free|few-shot k=[1-9][0-9]*)$")
    decimals: int = Field(default=2, ge=0, le=6)
    show_range: bool = True

    @field_validator("filter_string")
    @classmethod
    def _mlflow_search_filter(cls, filter_string: str) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.search_utils import SearchUtils

        try:
            SearchUtils.parse_search_filter(filter_string)
        except MlflowException as exc:
            reason = " ".join(exc.message.split())
            raise ValueError(
                f"is not an MLflow search filter ({reason}); allowed: clauses joined with 'and', e.g. "
                "params.prompt_generation.method = 'mix' and tags.seed = '1', or '' for every run"
            ) from None
        return filter_string
