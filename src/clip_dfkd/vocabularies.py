"""Named lists that a run can ask for by name, and the benchmarks' domain names.

Kedro splits ``--params`` on commas, so a list cannot be typed there; a name can:
``kedro run --params="classes=vlcs"``. Each published benchmark's class list is a named
list, in the benchmark's label order, written as prompts read them.
"""

from __future__ import annotations

from clip_dfkd.benchmark_layouts import LAYOUTS

CLASS_LISTS: dict[str, list[str]] = {name: list(layout.classes) for name, layout in LAYOUTS.items()}

# The domains of the evaluation benchmarks. A data-free method must not prompt for them:
# "a sketch of a dog" when PACS tests on sketches leaks the test domain into training.
BENCHMARK_DOMAINS: dict[str, list[str]] = {name: list(layout.domains) for name, layout in LAYOUTS.items()}

_NEUTRAL_STYLES = [
    "pencil drawing",
    "watercolor",
    "charcoal drawing",
    "3D rendering",
    "mosaic",
    "origami",
    "embroidery",
    "graffiti",
    "stained glass",
    "woodcut print",
    "low poly model",
    "clay figure",
]

STYLE_LISTS: dict[str, list[str]] = {
    # The default: media and techniques that name no benchmark's domain.
    "neutral": _NEUTRAL_STYLES,
    # An explicit choice: adds PACS's and DomainNet's domain words; evaluating on those
    # benchmarks then measures seen styles, not transfer to unseen ones.
    "neutral_and_domain_words": [*_NEUTRAL_STYLES, "photo", "sketch", "cartoon", "painting"],
}


def resolve_named_list(value: object, lists: dict[str, list[str]]) -> object:
    """``value`` itself, or the list that the name ``value`` stands for.

    Raises:
        ValueError: ``value`` is a string that names no list.
    """
    if not isinstance(value, str):
        return value
    if value not in lists:
        raise ValueError(f"names no known list; allowed: a list of names or one of {sorted(lists)}")
    return list(lists[value])
