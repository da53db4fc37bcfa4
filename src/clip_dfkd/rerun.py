"""The ``kedro run`` commands that messages suggest, with the ``--env`` and the ``--params`` of
the run that prints them: copied, the command runs the same recipe (the demo's, offline),
not the base one."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any


def kedro_run_command(
    run_params: Mapping[str, Any] | None,
    *options: str,
    params: Mapping[str, Any] | None = None,
    without: tuple[str, ...] = (),
) -> str:
    """``kedro run``, the env of ``run_params`` (what Kedro hands ``before_pipeline_run``; None
    outside a run), ``options`` (e.g. ``--pipelines=image_synthesis``), and the runtime
    parameters the user passed, as dotted keys, but for the keys ``without`` and with
    ``params`` (dotted keys too) set on top."""
    run_params = run_params or {}
    words = ["kedro", "run"]
    if env := run_params.get("env"):
        words.append(f"--env={shlex.quote(env)}")
    words += [shlex.quote(option) for option in options]
    passed = dotted(run_params.get("runtime_params") or {})
    if values := {key: value for key, value in passed.items() if key not in without} | dict(params or {}):
        pairs = ",".join(f"{key}={_cli_value(value)}" for key, value in values.items())
        words.append(f"--params={shlex.quote(pairs)}")
    return " ".join(words)


def dotted(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as ``--params`` takes them: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat |= dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _cli_value(value: Any) -> str:
    """``value`` as ``--params`` reads it back (YAML): null, true and false, not Python's words.
    A list (a run started from Python) is written as YAML too, though ``--params`` would split
    it at its commas."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return f"[{', '.join(_cli_value(item) for item in value)}]"
    return str(value)
