"""OmegaConf resolvers available in ``conf/``."""

from __future__ import annotations

import os
from pathlib import Path

from kedro.utils import find_kedro_project


def tracking_uri(database: str = "mlflow.db") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI at the project root.

    MLflow 3.13+ refuses a ``./mlruns`` file store, and a relative SQLite path would follow
    whichever folder a command happens to run in.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    root = find_kedro_project(Path.cwd()) or Path.cwd()
    return f"sqlite:///{(root / database).resolve()}"


def artifact_location(tracking: str, folder: str = "mlartifacts") -> str | None:
    """Where a new experiment keeps its artifacts: ``folder`` in the project when tracking in
    a local store; with a tracking server, None: the server's own artifact store, which
    everyone who uses the server can read (a folder on one client machine would not be)."""
    return None if tracking.startswith(("http://", "https://", "databricks")) else folder
