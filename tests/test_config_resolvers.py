from __future__ import annotations

from clip_dfkd.config_resolvers import tracking_uri


def test_tracking_uri_defaults_to_an_absolute_sqlite_file_at_the_project_root(fresh_project, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(fresh_project / "conf")  # from a subfolder, the project root is still found

    assert tracking_uri() == f"sqlite:///{fresh_project.resolve() / 'mlflow.db'}"


def test_mlflow_tracking_uri_in_the_environment_wins(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri() == "http://mlflow.internal:5000"
