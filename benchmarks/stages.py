"""Each stage through the project's code against a bare loop of the library doing the same
work (same model, batch size, dtype, device and images), in one process: images/s, peak
memory and the ratio project/bare per stage (target: >= 0.9), then what distillation buys
(student vs teacher image tower: parameters, batch-1 latency, batch-32 throughput, and the
student under onnxruntime) and the diffusion UNet's model FLOPs utilisation. What each side
runs, and the JSON's keys: ``benchmarks/stage_benchmark.py``.

    python benchmarks/stages.py --preset cpu-tiny                 # the demo's tiny models, < 2 min on 2 cores
    python benchmarks/stages.py --preset gpu-full                 # SD-1.5-sized UNet/VAE at 512 px, ViT-B/32 and
                                                                  # ViT-L/14 at 224 px, resnet18 at 224 px
    python benchmarks/stages.py --preset gpu-full --device cpu    # the same architectures, reduced work (--reduced)
    python benchmarks/stages.py --preset cpu-tiny --repeats 3 --threads 1 --stages teacher_labeling evaluation

Random weights throughout (throughput does not depend on them), so nothing is downloaded.
The report goes to benchmarks/results/<preset>-<device>.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Progress bars (the project's and the libraries') would drown the table.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stage_benchmark import MIN_SECONDS, PRESETS, STAGES, run  # noqa: E402

from clip_dfkd.library_warnings import ignore_library_warnings  # noqa: E402
from clip_dfkd.params import RuntimeParams  # noqa: E402
from clip_dfkd.runtime import Runtime  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument(
        "--reduced",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gpu-full with less work (smaller images, fewer images and steps, same architectures); "
        "default: when the device is not CUDA",
    )
    parser.add_argument("--images", type=int, help="at most this many images (and batch size) per stage")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side, alternating; the fastest counts")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=MIN_SECONDS,
        help="more runs of a short stage (up to 5 x --repeats) until each side has run this long; default: %(default)s",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--stages",
        nargs="*",
        choices=STAGES,
        help="only these stages (default: all; --stages alone: only what distillation buys)",
    )
    parser.add_argument(
        "--output", type=Path, help="the JSON report (default: benchmarks/results/<preset>-<device>.json)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where models and images are written (default: a temporary folder)"
    )
    args = parser.parse_args(argv)

    ignore_library_warnings()
    device = Runtime.resolve(RuntimeParams(device=args.device)).device.type
    output = args.output or RESULTS / f"{args.preset}-{device}.json"
    run(
        preset=args.preset,
        device=args.device,
        precision=args.precision,
        reduce_size=args.reduced,
        images=args.images,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        threads=args.threads,
        stages=args.stages,
        output=output,
        workdir=args.workdir,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
