"""The demo's students against the demo teacher's image tower, side by side: parameters,
batch-1 latency and batch-32 throughput at 32 px, random weights (speed does not depend on
them). Towers of several depths are timed beside the configured one, students at several
widths beside the demo's; each model is timed in turn, round after round, and the median
round counts, so that a machine's drift touches every model alike.

    python benchmarks/demo_student_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# Students as (timm name, create_model kwargs); the demo's own first (conf/demo/parameters.yml).
STUDENTS: dict[str, tuple[str, dict]] = {
    "resnet10t, channels 12-96 (the demo's)": ("resnet10t", {"channels": (12, 24, 48, 96), "stem_width": 12}),
    "resnet10t, channels 8-16-48-96": ("resnet10t", {"channels": (8, 16, 48, 96), "stem_width": 8}),
    "resnet10t, channels 8-64": ("resnet10t", {"channels": (8, 16, 32, 64), "stem_width": 8}),
    "resnet10t, timm's widths": ("resnet10t", {}),
}
TOWER_DEPTHS = (2, 4, 6)  # the demo's teacher has 6 (clip-dfkd-tiny.json)


def towers() -> dict[str, torch.nn.Module]:
    import open_clip

    from clip_dfkd.models.model_configs import CONFIG_DIR, building_without_weights

    config = json.loads((CONFIG_DIR / "clip-dfkd-tiny.json").read_text())
    built = {}
    for depth in TOWER_DEPTHS:
        vision = {**config["vision_cfg"], "layers": depth}
        with building_without_weights():
            built[f"teacher image tower, {depth} layers"] = open_clip.CLIP(**{**config, "vision_cfg": vision}).visual
    return built


def students() -> dict[str, torch.nn.Module]:
    import timm

    return {name: timm.create_model(arch, num_classes=4, **kwargs) for name, (arch, kwargs) in STUDENTS.items()}


def timings(models: dict[str, torch.nn.Module], rounds: int, size: int = 32, batch: int = 32) -> dict[str, tuple]:
    one, many = torch.randn(1, 3, size, size), torch.randn(batch, 3, size, size)
    latency = {name: [] for name in models}
    throughput = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            for _ in range(20):
                model(one)
                model(many)
        for _ in range(rounds):
            for name, model in models.items():
                calls = []
                for _ in range(50):
                    started = time.perf_counter()
                    model(one)
                    calls.append(time.perf_counter() - started)
                latency[name].append(statistics.median(calls))
                started = time.perf_counter()
                for _ in range(10):
                    model(many)
                throughput[name].append(10 * batch / (time.perf_counter() - started))
    return {name: (statistics.median(latency[name]), statistics.median(throughput[name])) for name in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {**towers(), **students()}
    measured = timings(models, args.rounds)
    reference = f"teacher image tower, {TOWER_DEPTHS[-1]} layers"
    ref_latency, ref_throughput = measured[reference]
    print(f"{args.threads} torch thread(s), 32 px, median of {args.rounds} rounds; speed-up against the {reference}\n")
    print("| model | parameters | batch 1 latency | batch 32 throughput | speed-up (latency / throughput) |")
    print("|---|---:|---:|---:|---:|")
    for name, model in models.items():
        latency, throughput = measured[name]
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"| {name} | {parameters:.3f} M | {1000 * latency:.2f} ms | {throughput:,.0f} img/s | "
            f"{ref_latency / latency:.2f}× / {throughput / ref_throughput:.2f}× |"
        )


if __name__ == "__main__":
    main()
