"""Domain-shift benchmarks laid out as ``<root>/<domain>/<class>/<image files>``.

Images may sit in sub-folders of a class folder (they count for that class). Hidden files
and folders (names starting with '.', such as ``.DS_Store`` or ``.ipynb_checkpoints``) are
ignored; any other file that is not an image is listed as skipped, never dropped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from clip_dfkd.errors import UserError
from clip_dfkd.params import BenchmarkParams

LAYOUT = "<root>/<domain>/<class>/<image files>"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NOT_AN_IMAGE = "not an image file"
OUTSIDE_CLASS_FOLDERS = "not inside a class folder"


class BenchmarkError(UserError, ValueError):
    """A benchmark folder that does not match the expected layout or class list."""


@dataclass
class DomainImages:
    benchmark: str
    domain: str
    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Files of the domain that are not evaluated, with the reason."""


def class_index_of_folder(folder: str, classes: list[str]) -> int | None:
    """Match a class folder to a class name, ignoring case and ``_``/``-`` versus spaces
    (DomainNet writes ``hot_air_balloon``, OfficeHome ``Alarm_Clock``)."""

    def canonical(name: str) -> str:
        return " ".join(name.replace("_", " ").replace("-", " ").lower().split())

    lookup = {canonical(name): index for index, name in enumerate(classes)}
    return lookup.get(canonical(folder))


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _visible_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` at any depth, sorted, without hidden files and folders.

    Symbolic links to folders are followed (benchmarks are often assembled from links), each
    real folder once, so a link back to a parent cannot make the walk endless.
    """
    found, walked = [], set()
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in walked:
            subdirectories.clear()
            continue
        walked.add(real)
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        found += [Path(directory, f) for f in files if not f.startswith(".")]
    return sorted(found)


def scan_benchmark(name: str, params: BenchmarkParams, classes: list[str]) -> list[DomainImages]:
    """List every image of every domain with its class index, and the domain's other files
    as skipped; only reads directory entries."""
    key = f"ood_evaluation.benchmarks.{name}"
    root = Path(params.root).expanduser()
    if not root.is_dir():
        raise BenchmarkError(f"{key}.root={params.root!r}: no such folder; expected the layout {LAYOUT}")
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    domains = params.domains if params.domains is not None else available
    if not domains:
        raise BenchmarkError(f"{key}.root={params.root!r}: has no domain folders; expected the layout {LAYOUT}")
    if unknown := [d for d in domains if d not in available]:
        raise BenchmarkError(f"{key}.domains={unknown!r}: not folders of {root}; allowed: {available}")
    result = []
    for domain in domains:
        images = DomainImages(name, domain)
        entries = sorted(p for p in (root / domain).iterdir() if _visible(p))
        images.skipped += [(p, OUTSIDE_CLASS_FOLDERS) for p in entries if not p.is_dir()]
        for class_dir in (p for p in entries if p.is_dir()):
            index = class_index_of_folder(class_dir.name, classes)
            if index is None:
                raise BenchmarkError(
                    f"{key}: class folder {domain}/{class_dir.name!r} is not in classes; "
                    f"allowed: {classes} (case, '_' and '-' are ignored)"
                )
            for path in _visible_files(class_dir):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    images.paths.append(path)
                    images.labels.append(index)
                else:
                    images.skipped.append((path, NOT_AN_IMAGE))
        result.append(images)
    return result
