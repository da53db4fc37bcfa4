"""What every parameter model shares: one-line errors, template checks, paths."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from clip_dfkd.errors import UserError


class InvalidParameterError(UserError, ValueError):
    """A parameter value that is not allowed; the message is one line."""


def bad_value(field: str, value: Any, reason: str) -> PydanticCustomError:
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


class OneLineErrors:
    """Turns pydantic's multi-line report into one line per bad key."""

    section: ClassVar[str] = ""

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)  # type: ignore[misc]
        except ValidationError as exc:
            raise InvalidParameterError(_one_line(cls.section, exc)) from None


class Params(OneLineErrors, BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def as_plain(value: Any) -> Any:
    """A parameter section as plain data (dicts, lists, strings, numbers): Kedro hands a node or
    hook a validated model when a node type-hints the section, the value as written otherwise."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def check_template(template: str, required: set[str], allowed: set[str]) -> str:
    try:
        found = _placeholders(template)
    except ValueError as exc:
        raise ValueError(f"is not a format string ({exc})") from None
    if missing := required - found:
        raise ValueError(f"lacks the placeholder(s) {{{', '.join(sorted(missing))}}}")
    if unknown := found - allowed:
        raise ValueError(f"has unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return template


WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


def looks_like_path(value: str) -> bool:
    """A weights reference is a local file when it has a path separator or a weights suffix."""
    return "/" in value or "\\" in value or value.startswith(("~", ".")) or Path(value).suffix in WEIGHT_SUFFIXES
