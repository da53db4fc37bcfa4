"""Does knowledge transfer in the demo's world? The whole demo, per seed, for every prompt
method with the inversion backend, and for two contrasts with the same image budget: the
random tiny diffusion generator's images, and teacher-labelled noise (the inversion's
un-optimised starting pixels). Prints student top-1 per benchmark domain (mean and range over
seeds), the held-out domains' mean and its agreement with the teacher, beside the teacher's
zero-shot top-1, and the wall time of each run. The student's teacher targets and the
few-shot fine-tuning settings are variants too (docs/consistent_teaching.md,
docs/few_shot.md); a few-shot run reports the domains that gave no shot.

Two more students bound what synthesis can give on the held-out domains (the benchmark
domains the teacher was not trained on): one trained on teacher-labelled drawings of those
domains (the oracle), one on drawings of the teacher's training styles, each with the same
budget. Measured with the neutral vanilla baseline, the summary gives the oracle gap and the
share of it each run closes (docs/held_out_world.md).

    python benchmarks/demo_transfer.py --seeds 0 1 2
    python benchmarks/demo_transfer.py --seeds 1 --runs "inversion, vanilla"
    python benchmarks/demo_transfer.py --world held_out_styles --seeds 4 --runs \
        "drawings of the held-out domains (oracle)" "drawings of the teacher's training styles" \
        "inversion, vanilla (neutral)" "inversion, contrastive"

A seed sets the world's drawings, the teacher's training, the prompts and the student's
training at once (``demo_assets.seed``, ``prompt_generation.seed``,
``student_distillation.training.seed``). ``--world NAME`` applies
``benchmarks/worlds/NAME.yml`` on top of the demo's configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from demo_projects import REPO_ROOT, demo_asset_params, make_project_copy, merge_params

from clip_dfkd.demo import DemoAssetsParams, held_out_domains
from clip_dfkd.demo.world import draw

WORLDS = Path(__file__).parent / "worlds"

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

# Function matching (Beyer et al. 2022): the teacher online on the student's own views, mixed
# by mixup, and a longer ("patient") schedule; on the world's vanilla images.
TEACHING_CHANGES: dict[str, dict] = {
    "online, mixup 0.2": {"teacher_targets": "online", "mixup": 0.2},
    "online, mixup 1.0": {"teacher_targets": "online", "mixup": 1.0},
    "online, 120 epochs": {"teacher_targets": "online", "training": {"epochs": 120}},
    "online, mixup 1.0, 120 epochs": {"teacher_targets": "online", "mixup": 1.0, "training": {"epochs": 120}},
    "stored_views, 120 epochs": {"training": {"epochs": 120}},
    "online": {"teacher_targets": "online"},
    "online, 240 epochs": {"teacher_targets": "online", "training": {"epochs": 240}},
    "online, mixup 1.0, 240 epochs": {"teacher_targets": "online", "mixup": 1.0, "training": {"epochs": 240}},
    "online, mixup 0.5, 120 epochs": {"teacher_targets": "online", "mixup": 0.5, "training": {"epochs": 120}},
    "online, mixup 1.0, 160 epochs": {"teacher_targets": "online", "mixup": 1.0, "training": {"epochs": 160}},
}
# The same teaching on fewer images (13 per class and style, 156 in all, instead of 240): less
# inversion and less training, for the demo's time budget.
FEWER_IMAGES = 13

# Inversion budgets for the demo's vanilla prompts (the demo's own: 60 iterations of 4 cut-outs,
# chosen among these on tuning seeds 0-3; docs/demo.md, "Inversion budget").
INVERSION_CHANGES: dict[str, dict] = {
    "100 iterations, 8 cut-outs (before)": {"iterations": 100, "cutouts": 8},
    "100 iterations, 4 cut-outs": {"iterations": 100, "cutouts": 4},
    "50 iterations, 8 cut-outs": {"iterations": 50, "cutouts": 8},
}


@dataclass(frozen=True)
class World:
    """The demo's world (``demo``), or one of ``benchmarks/worlds/<name>.yml``: runtime
    parameters on top of conf/demo that redraw the world and re-word the prompts."""

    name: str
    overrides: dict

    @classmethod
    def load(cls, name: str) -> World:
        return cls(name, {} if name == "demo" else yaml.safe_load((WORLDS / f"{name}.yml").read_text()))

    @functools.cached_property
    def assets(self) -> DemoAssetsParams:
        raw = merge_params(demo_asset_params().model_dump(mode="json"), self.overrides.get("demo_assets", {}))
        return DemoAssetsParams.model_validate(raw)

    @functools.cached_property
    def prompts(self) -> dict:
        demo = yaml.safe_load((REPO_ROOT / "conf/demo/parameters.yml").read_text())["prompt_generation"]
        return merge_params(demo, self.overrides.get("prompt_generation", {}))

    def variants(self) -> dict[str, dict]:
        """Every run but the drawn ones: runtime parameters on top of the world's."""
        teacher_styles = self.assets.teacher_training.styles
        # The pseudo-word methods' real words and Mix's dictionary: the words the teacher's
        # styles are made of ("night", "comic"), which are its styles themselves in the demo.
        words = list(dict.fromkeys(word for style in teacher_styles for word in style.split()))
        per_class = self.prompts["num_styles"] * self.prompts["images_per_class_and_style"]
        prompts = {
            # the world's own vanilla (its config's styles), and two with the same budget
            "vanilla": {"method": "vanilla", "images_per_class_and_style": per_class // len(self.prompts["styles"])},
            "vanilla (neutral)": {"method": "vanilla", "styles": ["picture"], "images_per_class_and_style": per_class},
            "vanilla (the teacher's styles)": {
                "method": "vanilla",
                "styles": teacher_styles,
                "images_per_class_and_style": per_class // len(teacher_styles),
            },
            **{method: {"method": method, "styles": words} for method in ("mix", "random", "contrastive")},
            # without the norm bound on its pseudo-words (docs/prompt_diversification.md)
            "contrastive, unbounded": {
                "method": "contrastive",
                "styles": words,
                "contrastive": {"max_norm_ratio": None},
            },
        }
        source = next(d for d in self.assets.benchmark_domains if d in teacher_styles)
        inversion = {"image_synthesis": {"backend": "inversion"}}
        # The runs below change the student or its targets, on the world's vanilla images.
        vanilla = {"prompt_generation": prompts["vanilla"]} | inversion
        return {
            **{f"inversion, {name}": {"prompt_generation": change} | inversion for name, change in prompts.items()},
            # Where the student's targets come from (the images are the vanilla inversion's).
            **{
                f"inversion, vanilla, teacher targets: {targets}": {
                    "student_distillation": {"teacher_targets": targets}
                }
                | vanilla
                for targets in ("centre", "stored_views", "online")
            },
            # Few-shot fine-tuning of the stored-views student on 5 drawings per class of the
            # first seen domain (photos in the demo), scored on the other domains: the
            # defaults, and the changes that chose them (docs/few_shot.md).
            **{
                f"inversion, vanilla, few-shot k=5 photos{name}": {
                    "ood_evaluation": {"few_shot": {"k": 5, "source_domains": {"demo_shapes": [source]}} | change}
                }
                | vanilla
                for name, change in FEW_SHOT_CHANGES.items()
            },
            **{
                f"inversion, vanilla, teaching: {name}": {"student_distillation": change} | vanilla
                for name, change in TEACHING_CHANGES.items()
            },
            "inversion, vanilla, 156 images, teaching: online, mixup 1.0, 240 epochs": {
                "student_distillation": TEACHING_CHANGES["online, mixup 1.0, 240 epochs"],
                "prompt_generation": {**prompts["vanilla"], "images_per_class_and_style": FEWER_IMAGES},
            }
            | inversion,
            **{
                f"inversion, vanilla, student {name}": {"student_distillation": {"student": change}} | vanilla
                for name, change in STUDENT_CHANGES.items()
            },
            **{
                f"inversion, vanilla, {name}": {
                    "prompt_generation": prompts["vanilla"],
                    "image_synthesis": {"backend": "inversion", "inversion": change},
                }
                for name, change in INVERSION_CHANGES.items()
            },
            "diffusion (random generator), vanilla": {"image_synthesis": {"backend": "diffusion"}},
            "teacher-labelled noise": {
                "image_synthesis": {
                    "backend": "inversion",
                    "inversion": {"parameterization": "pixels", "grid_size": None, "iterations": 1, "tv_weight": 0.0},
                }
            },
        }

    def drawn_variants(self) -> dict[str, list[str]]:
        """Students trained on teacher-labelled drawings in place of synthetic images, with the
        same budget (the random generator's manifest, every image drawn over): the oracle gap
        is the first's held-out top-1 above the second's."""
        return {
            "drawings of the held-out domains (oracle)": held_out_domains(self.assets),
            "drawings of the teacher's training styles": self.assets.teacher_training.styles,
        }


def run_pipelines(project: Path, seed: int, world: World, overrides: dict, pipelines: list[str] | None = None) -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    seeds = {
        "demo_assets": {"seed": seed},
        "prompt_generation": {"seed": seed},
        "student_distillation": {"training": {"seed": seed}},
    }
    bootstrap_project(project)
    with (
        contextlib.chdir(project),
        KedroSession.create(
            project_path=project,
            env="demo",
            runtime_params=merge_params(merge_params(seeds, world.overrides), overrides),
        ) as session,
    ):
        session.run(pipeline_names=pipelines)


def draw_over_synthetic_images(project: Path, seed: int, domains: list[str], image_size: int) -> None:
    """Replace every synthetic image by a fresh drawing of its class, the domains in turn
    within each class."""
    manifest = pd.read_parquet(project / "data/03_primary/synthesis_manifest.parquet")
    folder = project / "data/03_primary/synthetic_images"
    for _, rows in manifest.groupby("class_name"):
        for n, row in enumerate(rows.itertuples()):
            drawing_seed = random.Random(f"drawn/{seed}/{row.image_id}").randrange(2**31)
            draw(row.class_name, domains[n % len(domains)], drawing_seed, image_size).save(
                folder / f"{row.image_id}.png"
            )


def run_variant(project: Path, seed: int, world: World, name: str) -> tuple[pd.DataFrame, float]:
    started = time.perf_counter()
    drawn = world.drawn_variants()
    if name in drawn:
        # the neutral vanilla's manifest: the inversion runs' budget, rendered in seconds
        budget = world.variants()["inversion, vanilla (neutral)"] | {"image_synthesis": {"backend": "diffusion"}}
        run_pipelines(project, seed, world, budget, ["prompt_generation", "image_synthesis"])
        draw_over_synthetic_images(project, seed, drawn[name], world.assets.image_size)
        run_pipelines(project, seed, world, budget, ["teacher_labeling", "student_distillation", "ood_evaluation"])
    else:
        run_pipelines(project, seed, world, world.variants()[name])
    results = pd.read_parquet(project / "data/07_model_output/ood_domain_results.parquet")
    # A few-shot run reports its fine-tuned student, on the domains that gave no shot.
    few_shot = results["setting"] != "data-free"
    return results[few_shot] if few_shot.any() else results, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world", default="demo", choices=["demo", *(p.stem for p in sorted(WORLDS.glob("*.yml")))])
    parser.add_argument("--csv", type=Path, help="also write every measured row here, as it is measured")
    demo = World.load("demo")
    runs = [*demo.variants(), *demo.drawn_variants()]
    parser.add_argument("--runs", nargs="+", choices=runs, default=runs, metavar="RUN")
    args = parser.parse_args()
    world = World.load(args.world)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            # One project per seed: its demo assets (teacher, benchmark) belong to that seed.
            project = make_project_copy(Path(scratch) / f"seed{seed}")
            for name in args.runs:
                results, seconds = run_variant(project, seed, world, name)
                print(f"seed {seed}, {name}: {seconds:.0f} s", flush=True)
                for row in results.itertuples():
                    rows += [
                        {"seed": seed, "run": name, "domain": row.domain, "top1": row.student_top1},
                        {"seed": seed, "run": f"{name}: agreement", "domain": row.domain, "top1": row.agreement},
                        {"seed": seed, "run": "teacher (zero-shot)", "domain": row.domain, "top1": row.teacher_top1},
                    ]
                if args.csv:
                    pd.DataFrame(rows).to_csv(args.csv, index=False)
    print(summarise(pd.DataFrame(rows), held_out_domains(world.assets)))


ORACLE = "drawings of the held-out domains (oracle)"
NO_COVERAGE = "drawings of the teacher's training styles"
BASELINE = "inversion, vanilla (neutral)"


def summarise(rows: pd.DataFrame, held_out: list[str]) -> str:
    """Markdown: one row per run (a run's agreement with the teacher on its own row), one
    column per domain, the held-out domains' mean and every domain's, each cell the mean
    (min–max) over seeds. Then, where the drawn students were measured, the oracle gap on
    held-out domains and the share of it each run closes above the neutral vanilla baseline."""
    rows = rows.drop_duplicates(["seed", "run", "domain"])
    means = {
        name: rows[rows["domain"].isin(domains)].groupby(["seed", "run"], sort=False, as_index=False)["top1"].mean()
        for name, domains in (("held-out", held_out), ("average", rows["domain"].unique()))
    }
    table = pd.concat([rows, *(m.assign(domain=name) for name, m in means.items())], ignore_index=True)
    summary = table.groupby(["run", "domain"], sort=False)["top1"].agg(["mean", "min", "max"])
    cells = summary.apply(lambda r: f"{r['mean']:.0%} ({r['min']:.0%}–{r['max']:.0%})", axis=1).unstack("domain")
    order = list(dict.fromkeys(table["run"]))
    seeds = sorted(rows["seed"].unique().tolist())
    text = (
        f"\nStudent top-1 (and agreement with the teacher) per domain, mean (min–max) over seeds {seeds}; "
        "chance is 25 %\n\n" + cells.loc[order].to_markdown()
    )
    held = means["held-out"].pivot(index="seed", columns="run", values="top1")
    if {ORACLE, NO_COVERAGE, BASELINE} <= set(held.columns):
        gap = held[ORACLE] - held[NO_COVERAGE]
        closed = (
            held.drop(columns=[ORACLE, NO_COVERAGE, BASELINE, "teacher (zero-shot)"], errors="ignore")
            .sub(held[BASELINE], axis=0)
            .div(held[ORACLE] - held[BASELINE], axis=0)
        )
        lines = [
            f"| {run} | {c.mean():.2f} ({c.min():.2f}–{c.max():.2f}) |"
            for run, c in closed.items()
            if not run.endswith("agreement")
        ]
        text += (
            f"\n\nOracle gap on held-out domains ({', '.join(held_out)}): {100 * gap.mean():.1f} "
            f"({100 * gap.min():.1f} to {100 * gap.max():.1f}) points.\n\n"
            f"| run | share of the oracle gap closed above {BASELINE} |\n|---|---|\n" + "\n".join(lines)
        )
    return text


if __name__ == "__main__":
    main()
