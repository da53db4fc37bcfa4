"""Run the offline demo once per prompt method and print the diversity figures it logged:
mean pairwise cosine distance of the style prompts' text features and of the teacher's
embeddings of the images (higher is more diverse), and Contrastive-Prompt's training curve ends.

    python benchmarks/prompt_diversity.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from demo_projects import kedro_run, make_project_copy

METHODS = ["vanilla", "mix", "random", "contrastive"]


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        project = make_project_copy(Path(scratch) / "project")
        for method in METHODS:
            seconds = kedro_run(project, f"--params=prompt_generation.method={method}")
            client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
            experiment = client.get_experiment_by_name("clip-dfkd-demo")
            run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
            metrics = run.data.metrics
            line = (
                f"{method:<12} prompts/diversity/average {metrics['prompts/diversity/average']:.3f}   "
                f"images/diversity/average {metrics['images/diversity/average']:.3f}   ({seconds:.0f} s)"
            )
            if method == "contrastive":
                history = {
                    name: client.get_metric_history(run.info.run_id, f"prompts/contrastive/{name}")
                    for name in ("style_loss", "content_accuracy")
                }
                line += "".join(
                    f"   {name} {points[0].value:.3f} → {points[-1].value:.3f}" for name, points in history.items()
                )
            print(line)


if __name__ == "__main__":
    main()
