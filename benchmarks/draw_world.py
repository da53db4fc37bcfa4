"""A picture of a demo world: one drawing per class (rows) and style (columns), the teacher's
training styles first, then a gap, then the held-out domains.

    python benchmarks/draw_world.py --world held_out_styles --out docs/images/held_out_world.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demo_transfer import WORLDS, World
from PIL import Image, ImageDraw

from clip_dfkd.demo import held_out_domains
from clip_dfkd.demo.world import draw

CELL, LABEL, GAP = 72, 18, 12


def world_picture(world: World) -> Image.Image:
    assets = world.assets
    seen, held_out = assets.teacher_training.styles, held_out_domains(assets)
    width = (len(seen) + len(held_out)) * CELL + GAP
    picture = Image.new("RGB", (width, 2 * LABEL + len(assets.benchmark_classes) * CELL), "white")
    pen = ImageDraw.Draw(picture)
    for column, style in enumerate([*seen, *held_out]):
        left = column * CELL + (GAP if style in held_out else 0)
        for line, word in enumerate(style.split(maxsplit=1) if " " in style else ["", style]):
            pen.text((left + 4, 2 + line * LABEL * 0.8), word, fill="black")
        for row, class_name in enumerate(assets.benchmark_classes):
            drawing = draw(class_name, style, 1000 + 7 * row + column, assets.image_size)
            picture.paste(drawing.resize((CELL - 4, CELL - 4), Image.NEAREST), (left + 2, 2 * LABEL + row * CELL + 2))
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="demo", choices=["demo", *(p.stem for p in sorted(WORLDS.glob("*.yml")))])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    world_picture(World.load(args.world)).save(args.out)


if __name__ == "__main__":
    main()
