"""A benchmark's images per domain, each with the index of its class in the run's ``classes``.

``layout: folders`` (the default) reads ``<root>/<domain>/<class>/<image files>``; the names
of :data:`clip_dfkd.benchmark_layouts.LAYOUTS` read a published benchmark as downloaded.
Images may sit in sub-folders of a class folder (they count for that class). Hidden files and
folders are ignored; any other file that is not an image, or that a list names but the disk
lacks, and any entry of the root that is neither a domain folder nor an official list, is
listed as skipped with the reason, never dropped silently. A domain folder without class
folders, or a class folder that is no class of the run, stops the run before any work.

A benchmark's class becomes a run class through ``class_aliases`` (benchmark folder or class
word → run class) first, then by name, ignoring case and ``_``/``-`` versus spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clip_dfkd.benchmark_layouts import (
    LAYOUTS,
    BenchmarkError,
    ListedImages,
    PublishedLayout,
    read_class_folders,
    visible,
)
from clip_dfkd.params import BenchmarkParams

FOLDERS_LAYOUT = "<root>/<domain>/<class>/<image files>"
NOT_A_DOMAIN_FOLDER = "at the benchmark's root, not a domain folder"


@dataclass
class DomainImages:
    benchmark: str
    domain: str
    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Files of the domain that are not evaluated, with the reason."""


def canonical_class_name(name: str) -> str:
    """Case, ``_``, ``-`` and repeated spaces do not tell class names apart
    (DomainNet writes ``hot_air_balloon``, OfficeHome ``Alarm_Clock``)."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


class _ClassMatcher:
    """Maps a benchmark's class words to indices of the run's classes, and remembers the words
    that match none, with their domains, to name them all in one error."""

    def __init__(self, key: str, published: PublishedLayout | None, aliases: dict[str, str], classes: list[str]):
        self.key, self.published, self.classes = key, published, classes
        self.lookup = {canonical_class_name(name): index for index, name in enumerate(classes)}
        if bad := {word: target for word, target in aliases.items() if canonical_class_name(target) not in self.lookup}:
            raise BenchmarkError(f"{key}.class_aliases={bad!r}: not classes of this run; allowed targets: {classes}")
        self.aliases = {word: self.lookup[canonical_class_name(target)] for word, target in aliases.items()}
        self.unmatched: dict[str, list[str]] = {}
        """Class word → the domains where it matched no class of the run."""

    def index(self, word: str, domain: str) -> int | None:
        published_name = self.published.class_of_folder(word) if self.published else None
        for candidate in (word, published_name):
            if candidate is not None and candidate in self.aliases:
                return self.aliases[candidate]
        for candidate in (published_name, word):
            if candidate is not None and (index := self.lookup.get(canonical_class_name(candidate))) is not None:
                return index
        self.unmatched.setdefault(word, []).append(domain)
        return None

    def unmatched_error(self) -> BenchmarkError | None:
        if not self.unmatched:
            return None
        shown = []
        for word, domains in self.unmatched.items():
            published_name = self.published.class_of_folder(word) if self.published else None
            renamed = f" = {published_name!r}" if published_name and published_name != word else ""
            shown.append(f"{word!r}{renamed} (in {', '.join(domains)})")
        folders, are = ("class folders", "are") if len(shown) > 1 else ("class folder", "is")
        return BenchmarkError(
            f"{self.key}: {folders} {', '.join(shown)} {are} not in classes; allowed: {self.classes} "
            f"(case, '_' and '-' are ignored; {self.key}.class_aliases maps other names)"
        )


def scan_benchmark(name: str, params: BenchmarkParams, classes: list[str]) -> list[DomainImages]:
    """List every image of every chosen domain with its class index, and the domain's other
    files as skipped; reads directory entries and list files, no image."""
    key = f"ood_evaluation.benchmarks.{name}"
    published = LAYOUTS.get(params.layout)
    root = Path(params.root).expanduser()
    expected = (
        f"expected {published.title} as {published.layout}; {published.title} is published at {published.published_at}"
        if published
        else f"expected the layout {FOLDERS_LAYOUT}"
    )
    if not root.is_dir():
        raise BenchmarkError(f"{key}.root={params.root!r}: no such folder; {expected}")
    domain_dirs = _domain_dirs(key, root, params, published, expected)
    matcher = _ClassMatcher(key, published, params.class_aliases, classes)
    result, without_class_folders = [], []
    for domain, domain_dir in domain_dirs.items():
        listed: ListedImages = (
            published.read(published, root, domain_dir, domain, params.split)
            if published
            else read_class_folders(domain_dir)
        )
        if listed.class_dirs == []:
            without_class_folders.append(domain)
        images = DomainImages(name, domain, paths=listed.paths, skipped=listed.skipped)
        known: dict[str, int | None] = {}
        for word in listed.benchmark_classes:
            if word not in known:
                known[word] = matcher.index(word, domain)
            images.labels.append(known[word])
        result.append(images)
    if without_class_folders:
        raise BenchmarkError(
            f"{key}.root={params.root!r}: the domain folders {without_class_folders} hold no class folder; {expected}"
        )
    if error := matcher.unmatched_error():
        raise error
    return result


def skipped_at_root(name: str, params: BenchmarkParams) -> list[tuple[Path, str]]:
    """The entries of a benchmark's root that are neither a domain folder (chosen or not) nor
    where a published benchmark keeps its official lists (``README.txt``, ``download.sh``, a
    folder of another dataset), with the reason; hidden ones are ignored."""
    published = LAYOUTS.get(params.layout)
    root = Path(params.root).expanduser()
    if published is None:
        return [(path, NOT_A_DOMAIN_FOLDER) for path in sorted(root.iterdir()) if visible(path) and not path.is_dir()]
    reason = f"{NOT_A_DOMAIN_FOLDER} or list file of {published.title}"
    return [
        (path, reason)
        for path in sorted(root.iterdir())
        if visible(path)
        and not (path.is_dir() and published.is_domain_folder(path.name))
        and not published.holds_lists(path.name)
    ]


def _domain_dirs(
    key: str, root: Path, params: BenchmarkParams, published: PublishedLayout | None, expected: str
) -> dict[str, Path]:
    if published is None:
        available = sorted(p.name for p in root.iterdir() if p.is_dir() and visible(p))
        domains = params.domains if params.domains is not None else available
        if not domains:
            raise BenchmarkError(f"{key}.root={params.root!r}: has no domain folders; {expected}")
        if unknown := [d for d in domains if d not in available]:
            raise BenchmarkError(f"{key}.domains={unknown!r}: not folders of {root}; allowed: {available}")
        return {domain: root / domain for domain in domains}
    allowed = list(published.domains)
    domains = params.domains if params.domains is not None else list(published.default_domains or allowed)
    if unknown := [d for d in domains if d not in published.domains]:
        raise BenchmarkError(f"{key}.domains={unknown!r}: not domains of {published.title}; allowed: {allowed}")
    found = {domain: published.domain_dir(root, domain) for domain in domains}
    if missing := [d for d, path in found.items() if path is None]:
        looked = [str(root / folder) for d in missing for folder in published.domains[d]]
        raise BenchmarkError(
            f"{key}.root={params.root!r}: domains {missing} not found (looked for {looked}, in any case); {expected}"
        )
    return found
