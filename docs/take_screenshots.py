"""Take the screenshots (README.md, docs/tracking.md) of kedro-viz and the MLflow UI after the offline demo.

Runs the demo twice in a fresh copy of the project (vanilla prompts, then Mix-Prompt, so the
runs table has two runs to tell apart), starts `mlflow ui` and `kedro viz run --env=demo` on
free local ports, and photographs them with headless Chromium driven by Playwright:

    apt-get install chromium                  # Debian's package; Playwright downloads nothing
    pip install -e ".[screenshots]"
    python docs/take_screenshots.py           # writes docs/images/*.png

`--project DIR` photographs a demo project that has already run instead. Not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from _demo import kedro_run, make_project_copy  # noqa: E402  (the benchmarks' demo helpers)

VIEWPORT = {"width": 1600, "height": 1000}
# The MLflow UI's own switches, as it keeps them in localStorage: open experiments on their
# runs ("Model training", not the GenAI overview) and keep the assistant panel closed.
MLFLOW_UI_STATE = {
    "mlflow.workflowType_v1": json.dumps("machine_learning"),
    "mlflow.assistant.panelOpen_v1": json.dumps(False),
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": json.dumps(True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs/images")
    parser.add_argument("--project", type=Path, help="a demo project that has already run")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        project = args.project or _run_demo(Path(scratch) / "project")
        with (
            _server(
                ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}"], project
            ) as mlflow_url,
            _server(["kedro", "viz", "run", "--env=demo", "--no-browser"], project) as viz_url,
        ):
            _photograph(project, mlflow_url, viz_url, args.out, args.chromium)


def _run_demo(project: Path) -> Path:
    make_project_copy(project)
    for params in ([], ["--params=prompt_generation.method=mix"]):
        seconds = kedro_run(project, *params)
        print(f"kedro run --env=demo {' '.join(params)}: {seconds:.0f} s", flush=True)
    return project


@contextlib.contextmanager
def _server(command: list[str], project: Path) -> Iterator[str]:
    """``command`` on a free local port, from ``project``; yields its URL once it answers."""
    port = _free_port()
    log = open(project / f"{command[0]}-{port}.log", "w")  # noqa: SIM115  (closed below)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)], cwd=project, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    last = Path(log.name).read_text().strip().splitlines()[-1:]
                    raise SystemExit(f"{' '.join(command)} did not start: {last}; see {log.name}") from None
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _free_port(first: int = 8100) -> int:
    """A free local port from ``first`` up (kedro-viz refuses the ephemeral range above 49151)."""
    for port in range(first, 49151):
        with socket.socket() as probe:
            with contextlib.suppress(OSError):
                probe.bind(("127.0.0.1", port))
                return port
    raise SystemExit(f"no free local port from {first}")


def _photograph(project: Path, mlflow_url: str, viz_url: str, out: Path, chromium: str) -> None:
    import mlflow
    from playwright.sync_api import sync_playwright

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("clip-dfkd-demo")
    champion = client.get_model_version_by_alias("clip-dfkd-demo-student", "champion")
    run = champion.run_id
    runs = f"{mlflow_url}/#/experiments/{experiment.experiment_id}/runs"
    viz_nodes = {node["name"]: node["id"] for node in json.load(urllib.request.urlopen(f"{viz_url}/api/main"))["nodes"]}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.add_init_script(
            "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in MLFLOW_UI_STATE.items())
        )

        def shoot(name: str, url: str, ready: str, then: Callable[[], None] | None = None, width: int = 1600) -> None:
            """Open ``url``, wait for the selector ``ready``, do ``then``, save ``<name>.png``."""
            page.set_viewport_size({**VIEWPORT, "width": width})
            page.goto("about:blank")  # a new page load: the UIs ignore a change of URL fragment alone
            page.goto(url)
            try:
                page.locator(ready).filter(visible=True).first.wait_for(timeout=60_000)
            except Exception:
                page.screenshot(path=str(out / f"{name}.failed.png"))  # what the page showed instead
                raise
            if then:
                then()
            page.wait_for_timeout(2000)  # charts and previews draw after their data arrives
            page.screenshot(path=str(out / f"{name}.png"))
            print(out / f"{name}.png", flush=True)

        def show_scores_beside_names() -> None:
            page.get_by_role("button", name="Columns").click()
            for column in ("Dataset", *(f"ood/demo_shapes/average/{m}" for m in ("student_top1", "teacher_top1"))):
                page.get_by_placeholder("Search columns").fill(column.rsplit("/", 1)[-1])
                page.get_by_test_id("column-selector-tree").get_by_text(column, exact=True).click()
            page.keyboard.press("Escape")
            page.wait_for_timeout(1000)
            for header in ("Run Name", "ood/demo_shapes/average/student_top1", "ood/demo_shapes/average/teacher_top1"):
                handle = page.locator(".ag-header-cell", has_text=header).locator(".ag-header-cell-resize").first
                handle.hover()  # the grid takes a drag only from a handle under the pointer
                box = handle.bounding_box()
                page.mouse.down()
                page.mouse.move(box["x"] + 160, box["y"] + box["height"] / 2, steps=5)
                page.mouse.up()

        shoot("mlflow-runs", f"{runs}?workflowType=machine_learning", "text=vanilla prompts", show_scores_beside_names)
        shoot(
            "mlflow-run",
            f"{runs}/{run}?workflowType=machine_learning",
            "text=Show more",
            lambda: page.get_by_text("Show more").first.click(),
        )
        shoot(
            "mlflow-run-metrics",
            f"{runs}/{run}/model-metrics",
            "text=images/diversity",
            lambda: page.get_by_placeholder("Search metric charts").fill("ood/"),
        )
        artifacts = f"{runs}/{run}/artifacts/ood_evaluation"
        shoot("mlflow-evaluation-chart", f"{artifacts}/ood_accuracy.png", "img[src^='blob:']")
        shoot("mlflow-evaluation-table", f"{artifacts}/ood_evaluation_table.json", "text=student_top1", width=2000)
        shoot(
            "mlflow-model-version",
            f"{mlflow_url}/#/models/clip-dfkd-demo-student/versions/{champion.version}",
            "text=Out-of-distribution evaluation",
        )

        def dismiss_kedro_viz_notices() -> None:
            # The first-visit feature tour, and the update reminder kedro-viz shows when it
            # cannot reach PyPI ("Kedro-Viz None is here!").
            for notice in (page.locator(".feature-hints__close"), page.get_by_role("button", name="Dismiss")):
                with contextlib.suppress(Exception):
                    notice.first.click(timeout=5_000)

        def expand_preview() -> None:
            dismiss_kedro_viz_notices()
            page.get_by_text("Expand preview").click()

        def selected(dataset: str) -> str:
            return f"{viz_url}/?pid=__default__&sid={viz_nodes[dataset]}&sn={dataset}"

        shoot("kedro-viz-stages", f"{viz_url}/?pid=__default__", ".pipeline-node", dismiss_kedro_viz_notices)
        panel = "text=Expand preview"  # a selected dataset's side panel, with its preview
        shoot("kedro-viz-synthetic_images", selected("synthetic_images"), panel, dismiss_kedro_viz_notices)
        shoot("kedro-viz-ood_evaluation_report", selected("ood_evaluation_report"), panel, expand_preview)
        browser.close()


if __name__ == "__main__":
    main()
