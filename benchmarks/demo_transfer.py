"""Does knowledge transfer in the demo's world? The whole demo, per seed, for every prompt
method with the inversion backend, and for two contrasts with the same image budget: the
random tiny diffusion generator's images, and teacher-labelled noise (the inversion's
un-optimised starting pixels). Prints student top-1 per benchmark domain (mean and range over
seeds) and its agreement with the teacher, beside the teacher's zero-shot top-1, and the wall
time of each run. The student's teacher targets and the few-shot fine-tuning settings are
variants too (docs/consistent_teaching.md, docs/few_shot.md); a few-shot run reports the
domains that gave no shot.

    python benchmarks/demo_transfer.py --seeds 0 1 2
    python benchmarks/demo_transfer.py --seeds 1 --runs "inversion, vanilla"

A seed sets the world's drawings, the teacher's training, the prompts and the student's
training at once (``demo_assets.seed``, ``prompt_generation.seed``,
``student_distillation.training.seed``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
from _demo import make_project_copy, merge_params

FEW_SHOT_CHANGES: dict[str, dict] = {
    "": {},  # the defaults: the classifier only, learning rate 1e-4
    ", learning rate 1e-3": {"training": {"learning_rate": 1e-3}},
    ", learning rate 1e-2": {"training": {"learning_rate": 1e-2}},
    ", all layers": {"layers": "all"},
    ", all layers, interpolation 0.5": {"layers": "all", "interpolation": 0.5},
    ", all layers, interpolation 0.25": {"layers": "all", "interpolation": 0.25},
    ", all layers, learning rate 1e-5": {"layers": "all", "training": {"learning_rate": 1e-5}},
    ", all layers, teacher targets only": {"layers": "all", "label_weight": 0.0},
    ", all layers, batch-norm statistics updated": {"layers": "all", "freeze_batch_norm": False},
}

# The demo's student is resnet10t narrowed to channels 12-96 (0.18 M parameters, below the
# teacher's image tower, 0.32 M: docs/demo_student.md); other widths beside it. Each names its
# widths in full: runtime parameters merge into the demo's, so an empty model_kwargs would keep
# the demo's channels.
STUDENT_CHANGES: dict[str, dict] = {
    "resnet10t, timm's widths (4.9 M)": {"model_kwargs": {"channels": [64, 128, 256, 512], "stem_width": 32}},
    "resnet10t, channels 8-16-48-96": {"model_kwargs": {"channels": [8, 16, 48, 96], "stem_width": 8}},
    "resnet10t, channels 8-64": {"model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}},
}

VARIANTS: dict[str, dict] = {
    **{
        f"inversion, {method}": {"prompt_generation": {"method": method}, "image_synthesis": {"backend": "inversion"}}
        for method in ("vanilla", "mix", "random", "contrastive")
    },
    # Where the student's targets come from (the images are the vanilla inversion's).
    **{
        f"inversion, vanilla, teacher targets: {targets}": {
            "image_synthesis": {"backend": "inversion"},
            "student_distillation": {"teacher_targets": targets},
        }
        for targets in ("centre", "stored_views", "online")
    },
    # Few-shot fine-tuning of the stored-views student on 5 photos per class (scored on the
    # other domains): the defaults, and the changes that chose them (README, "Few-shot setting").
    **{
        f"inversion, vanilla, few-shot k=5 photos{name}": {
            "image_synthesis": {"backend": "inversion"},
            "ood_evaluation": {"few_shot": {"k": 5, "source_domains": {"demo_shapes": ["photo"]}} | change},
        }
        for name, change in FEW_SHOT_CHANGES.items()
    },
    **{
        f"inversion, vanilla, student {name}": {
            "image_synthesis": {"backend": "inversion"},
            "student_distillation": {"student": change},
        }
        for name, change in STUDENT_CHANGES.items()
    },
    "diffusion (random generator), vanilla": {"image_synthesis": {"backend": "diffusion"}},
    "teacher-labelled noise": {
        "image_synthesis": {
            "backend": "inversion",
            "inversion": {"parameterization": "pixels", "grid_size": None, "iterations": 1, "tv_weight": 0.0},
        }
    },
}


def run_variant(project: Path, seed: int, overrides: dict) -> tuple[pd.DataFrame, float]:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    seeds = {
        "demo_assets": {"seed": seed},
        "prompt_generation": {"seed": seed},
        "student_distillation": {"training": {"seed": seed}},
    }
    bootstrap_project(project)
    started = time.perf_counter()
    with (
        contextlib.chdir(project),
        KedroSession.create(project_path=project, env="demo", runtime_params=merge_params(seeds, overrides)) as session,
    ):
        session.run()
    results = pd.read_parquet(project / "data/07_model_output/ood_domain_results.parquet")
    # A few-shot run reports its fine-tuned student, on the domains that gave no shot.
    few_shot = results["setting"] != "data-free"
    return results[few_shot] if few_shot.any() else results, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--csv", type=Path, help="also write every measured row here, as it is measured")
    parser.add_argument("--runs", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="RUN")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            # One project per seed: its demo assets (teacher, benchmark) belong to that seed.
            project = make_project_copy(Path(scratch) / f"seed{seed}")
            for name in args.runs:
                results, seconds = run_variant(project, seed, VARIANTS[name])
                print(f"seed {seed}, {name}: {seconds:.0f} s", flush=True)
                for row in results.itertuples():
                    rows += [
                        {"seed": seed, "run": name, "domain": row.domain, "top1": row.student_top1},
                        {"seed": seed, "run": f"{name}: agreement", "domain": row.domain, "top1": row.agreement},
                        {"seed": seed, "run": "teacher (zero-shot)", "domain": row.domain, "top1": row.teacher_top1},
                    ]
                if args.csv:
                    pd.DataFrame(rows).to_csv(args.csv, index=False)
    print(summarise(pd.DataFrame(rows)))


def summarise(rows: pd.DataFrame) -> str:
    """Markdown: one row per run (a run's agreement with the teacher on its own row), one
    column per domain and their mean, each cell the mean (min–max) over seeds."""
    rows = rows.drop_duplicates(["seed", "run", "domain"])
    averages = rows.groupby(["seed", "run"], sort=False, as_index=False)["top1"].mean().assign(domain="average")
    table = pd.concat([rows, averages], ignore_index=True)
    summary = table.groupby(["run", "domain"], sort=False)["top1"].agg(["mean", "min", "max"])
    cells = summary.apply(lambda r: f"{r['mean']:.0%} ({r['min']:.0%}–{r['max']:.0%})", axis=1).unstack("domain")
    order = list(dict.fromkeys(table["run"]))
    seeds = sorted(rows["seed"].unique().tolist())
    return (
        f"\nStudent top-1 (and agreement with the teacher) per domain, mean (min–max) over seeds {seeds}; "
        "chance is 25 %\n\n" + cells.loc[order].to_markdown()
    )


if __name__ == "__main__":
    main()
