"""The metric names that docs/tracking.md documents (its "Metric names" table), as patterns that
the tests which run stages check every logged MLflow metric against."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

METRIC_NAMES_PAGE = Path(__file__).resolve().parents[1] / "docs" / "tracking.md"


@cache
def documented_metric_patterns() -> dict[str, re.Pattern[str]]:
    """The table's first-column names, each as a regular expression: ``<placeholder>`` is
    one path part, ``{a,b}`` one of the names listed."""
    table = METRIC_NAMES_PAGE.read_text().split("<!-- metric-names")[1].split("<!-- /metric-names -->")[0]
    patterns = {}
    for name in re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE):
        regex = re.escape(name)
        regex = re.sub(r"<[a-z_]+>", "[^/]+", regex)
        regex = re.sub(r"\\\{([^}]+)\\\}", lambda m: "(?:" + m[1].replace(",", "|") + ")", regex)
        patterns[name] = re.compile(regex)
    return patterns


def undocumented(metric_names: Iterable[str]) -> list[str]:
    """The names that no row of the "Metric names" table describes."""
    patterns = documented_metric_patterns().values()
    return sorted(name for name in metric_names if not any(p.fullmatch(name) for p in patterns))
