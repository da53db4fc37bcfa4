"""Domain-shift benchmarks laid out as ``<root>/<domain>/<class>/<image files>``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clip_dfkd.errors import UserError
from clip_dfkd.params import BenchmarkParams

LAYOUT = "<root>/<domain>/<class>/<image files>"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class BenchmarkError(UserError, ValueError):
    """A benchmark folder that does not match the expected layout or class list."""


@dataclass
class DomainImages:
    benchmark: str
    domain: str
    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def class_index_of_folder(folder: str, classes: list[str]) -> int | None:
    """Match a class folder to a class name, ignoring case and ``_``/``-`` versus spaces
    (DomainNet writes ``hot_air_balloon``, OfficeHome ``Alarm_Clock``)."""

    def canonical(name: str) -> str:
        return " ".join(name.replace("_", " ").replace("-", " ").lower().split())

    lookup = {canonical(name): index for index, name in enumerate(classes)}
    return lookup.get(canonical(folder))


def scan_benchmark(name: str, params: BenchmarkParams, classes: list[str]) -> list[DomainImages]:
    """List every image of every domain with its class index; only reads directory entries."""
    key = f"ood_evaluation.benchmarks.{name}"
    root = Path(params.root).expanduser()
    if not root.is_dir():
        raise BenchmarkError(f"{key}.root={params.root!r}: no such folder; expected the layout {LAYOUT}")
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    domains = params.domains if params.domains is not None else available
    if not domains:
        raise BenchmarkError(f"{key}.root={params.root!r}: has no domain folders; expected the layout {LAYOUT}")
    if unknown := [d for d in domains if d not in available]:
        raise BenchmarkError(f"{key}.domains={unknown!r}: not folders of {root}; allowed: {available}")
    result = []
    for domain in domains:
        images = DomainImages(name, domain)
        for class_dir in sorted(p for p in (root / domain).iterdir() if p.is_dir() and not p.name.startswith(".")):
            index = class_index_of_folder(class_dir.name, classes)
            if index is None:
                raise BenchmarkError(
                    f"{key}: class folder {domain}/{class_dir.name!r} is not in classes; "
                    f"allowed: {classes} (case, '_' and '-' are ignored)"
                )
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            images.paths += files
            images.labels += [index] * len(files)
        result.append(images)
    return result
