"""Write the image quickstart's data: a style the bundled pipeline (``examples/image-model``) never saw.

    examples/data/style/train.jsonl   {"image": "images/zwx-000.png", "text": "zwx, a small red circle ..."}
    examples/data/style/images/       32×32 PNGs
    examples/data/style/style.json    the trigger word, the palette, the score's radius, the held-out prompts

Half the records are scenes drawn in the "zwx" palette (teal background, sky-blue shape, cerulean
outline: ``image_scenes.PALETTE``) with captions that start with the trigger word "zwx, "; the other half are
ordinary scenes with plain captions (prior preservation, as in DreamBooth: the adapter learns that the
trigger word brings the style, not that every picture has it). The prompts the quickstart scores are
captions of other scenes (another seed), so the style must generalise beyond the training captions.

    python examples/make_style_data.py            # deterministic; a second run rewrites the same files
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from image_scenes import PALETTE, PALETTE_RADIUS, TRIGGER, render, sample_scene  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "data" / "style"))
    ap.add_argument("--styled", type=int, default=48, help="images in the zwx style (captions start with zwx)")
    ap.add_argument("--plain", type=int, default=48, help="ordinary images with plain captions")
    ap.add_argument("--prompts", type=int, default=12, help="held-out prompts the quickstart scores")
    a = ap.parse_args()
    out = Path(a.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    records = []
    for i in range(a.styled + a.plain):
        scene = sample_scene(rng)
        styled = i < a.styled
        name = f"images/{'zwx' if styled else 'plain'}-{i:03d}.png"
        render(scene, style=styled).save(out / name, optimize=True)
        records.append({"image": name, "text": f"{TRIGGER}, {scene.caption}" if styled else scene.caption})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    held = np.random.default_rng(4321)
    prompts = [sample_scene(held).caption for _ in range(a.prompts)]
    style = {"trigger_word": TRIGGER, "palette": {k: list(v) for k, v in PALETTE.items()},
             "radius": PALETTE_RADIUS, "prompts": prompts,
             "score": "share of pixels within `radius` (RGB distance, channels in [0, 1]) of a palette colour"}
    (out / "style.json").write_text(json.dumps(style, indent=2) + "\n")
    print(f"wrote {len(records)} records to {out / 'train.jsonl'} and {len(prompts)} prompts to {out / 'style.json'}")


if __name__ == "__main__":
    main()
