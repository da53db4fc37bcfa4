"""The parameters every pipeline reads: ``classes``, ``runtime`` and ``teacher``
(conf/base/parameters.yml)."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    Field,
    NonNegativeInt,
    PositiveInt,
    RootModel,
    field_validator,
    model_validator,
)

from clip_dfkd.params.base import WEIGHT_SUFFIXES, OneLineErrors, Params, bad_value, check_template, looks_like_path
from clip_dfkd.vocabularies import CLASS_LISTS, resolve_named_list


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


class ClassNames(OneLineErrors, RootModel[list[str]]):
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
    # DataLoader workers decoding images; auto: one per core but the main process's, at most 8.
    num_workers: Literal["auto"] | NonNegativeInt = "auto"
    # The student's, the UNet's and the VAE's convolutions in channels-last layout, which tensor
    # cores run without transposing; null: on CUDA only.
    channels_last: bool | None = None
    # fp32 matrix products in TF32 on CUDA (Ampere and newer): tensor-core speed, 10-bit mantissa.
    tf32: bool = True

    @field_validator("num_workers", mode="before")
    @classmethod
    def _auto_or_a_count(cls, value: Any) -> Any:
        # One line for a bad value, not one per member of the type's union.
        if isinstance(value, str) and value.isdigit():
            return int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError("allowed: auto, or a number of workers >= 0")

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
            check_template(template, {"class_name"}, {"class_name"})
        return templates

    @model_validator(mode="after")
    def _known_tag_or_path(self) -> TeacherParams:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(self.model_name)
        if self.pretrained not in tags and not looks_like_path(self.pretrained):
            raise bad_value(
                "pretrained",
                self.pretrained,
                f"neither a pretrained tag of {self.model_name} (allowed: {', '.join(tags) or 'none'}) "
                f"nor a checkpoint path (one with a '/', or ending in {', '.join(sorted(WEIGHT_SUFFIXES))})",
            )
        return self
