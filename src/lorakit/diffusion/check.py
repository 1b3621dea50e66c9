"""`lorakit data check` on image data: every bad record, then what would hurt a LoRA's training.

Errors (exit 1): a record without an image path or caption, an image file that is missing, unreadable or
truncated (fully decoded here, as training will), an empty caption.
Warnings, each naming the record: images smaller than the training resolution (upscaled: blurry), duplicate
images (perceptual hash, ``imagehash.phash``: 64-bit DCT hash, Hamming distance ≤ ``DUPLICATE_BITS``;
0 is an exact or resaved copy), captions longer than the pipeline tokenizer's limit (cut off: the end of
the caption is never seen).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.diffusion.data import load_image, scan_records
from lorakit.errors import LorakitError

DUPLICATE_BITS = 4  # of 64: resized, recompressed or lightly edited copies of one picture
_LISTED = 20  # warnings of one kind listed by name


@dataclass
class ImageCheckReport:
    path: str
    records: int = 0
    errors: list[str] = field(default_factory=list)
    resolution: int = 0
    small: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    long_captions: list[str] = field(default_factory=list)
    token_limit: int = 0
    caption_tokens: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_images(path: str | Path, resolution: int, tokenizers: list[Any], trigger_word: str = "") -> ImageCheckReport:
    """Check every record of ``path`` (JSON/JSONL or a folder); see the module docstring."""
    import imagehash

    records, errors = scan_records(path, trigger_word)
    report = ImageCheckReport(path=str(path), errors=list(errors), resolution=resolution)
    hashes: list[tuple[np.ndarray, str]] = []
    sides = []
    for record in records:
        try:
            image = load_image(record)
        except LorakitError as e:
            report.errors.append(str(e))
            continue
        report.records += 1
        w, h = image.size
        sides.append(min(w, h))
        if min(w, h) < resolution:
            report.small.append(f"{record.where}: {record.image.name} is {w}×{h}, smaller than --resolution "
                                f"{resolution}: upscaled, it trains blur")
        bits = imagehash.phash(image).hash.flatten()  # (64,) bool
        if hashes:
            distances = (np.stack([b for b, _ in hashes]) != bits).sum(1)  # Hamming distance to each earlier image
            j = int(distances.argmin())
            if distances[j] <= DUPLICATE_BITS:
                kind = "duplicate" if distances[j] == 0 else f"near duplicate ({int(distances[j])} of 64 hash bits differ)"
                report.duplicates.append(f"{record.where}: {record.image.name} is a {kind} of {hashes[j][1]}")
        hashes.append((bits, record.where))
    if sides:
        s = sorted(sides)
        report.sizes = {"min": s[0], "p50": s[len(s) // 2], "max": s[-1]}
    counts = []
    for tok in tokenizers:
        limit = int(tok.model_max_length)
        report.token_limit = limit if not report.token_limit else min(report.token_limit, limit)
        for record in records:
            n = len(tok(record.caption, truncation=False).input_ids)  # with the start and end tokens
            counts.append(n)
            if n > limit:
                report.long_captions.append(f"{record.where}: caption has {n} tokens; the text encoder keeps "
                                            f"{limit}, the rest is cut off")
    if counts:
        report.caption_tokens = {"p50": sorted(counts)[len(counts) // 2], "max": max(counts)}
    return report


def format_report(r: ImageCheckReport) -> str:
    out = list(r.errors)
    if r.errors:
        out.append(f"{len(r.errors)} problem{'s' * (len(r.errors) > 1)}: fix before training")
    out.append(f"{r.path}: {r.records} readable images with captions; short side " +
               ("  ".join(f"{k} {v}" for k, v in r.sizes.items()) or "-"))
    for kind, items in (("smaller than the resolution", r.small), ("duplicate images", r.duplicates),
                        ("captions over the tokenizer's limit", r.long_captions)):
        out.append(f"{kind}: {len(items)}")
        out += [f"  warning: {w}" for w in items[:_LISTED]]
        if len(items) > _LISTED:
            out.append(f"  ... and {len(items) - _LISTED} more (--json lists all)")
    if r.caption_tokens:
        out.append(f"caption tokens: p50 {r.caption_tokens['p50']}  max {r.caption_tokens['max']} "
                   f"(limit {r.token_limit})")
    return "\n".join(out)


def image_check_command(args: argparse.Namespace) -> int:
    """``lorakit data check DATA --model PIPE``: 1 when any record is bad (all listed), else 0."""
    from lorakit.diffusion.pipeline import resolve_pipeline_path

    pipe = resolve_pipeline_path(args.model)
    tokenizers = _tokenizers(pipe)
    resolution = int(args.resolution) if getattr(args, "resolution", None) else _native_resolution(pipe)
    report = check_images(args.file, resolution, tokenizers, getattr(args, "trigger_word", None) or "")
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


def _tokenizers(pipe: str) -> list[Any]:
    """The pipeline's CLIP tokenizers (tokenizer, tokenizer_2; T5's limit is the pipeline's own setting)."""
    from transformers import AutoTokenizer

    out = []
    for name in ("tokenizer", "tokenizer_2"):
        folder = Path(pipe) / name
        if folder.is_dir():
            try:
                out.append(AutoTokenizer.from_pretrained(str(folder)))
            except (OSError, ValueError) as e:
                raise LorakitError(f"{folder}: cannot load the tokenizer ({e})") from None
    return out


def _native_resolution(pipe: str) -> int:
    """sample_size × the VAE's factor, from the config files alone (no weights loaded)."""
    folder = Path(pipe)
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        den = next(folder / d / "config.json" for d in ("unet", "transformer") if (folder / d / "config.json").is_file())
        sample = json.loads(den.read_text()).get("sample_size") or 128  # Flux's transformer: 128 latents
    except (OSError, StopIteration, json.JSONDecodeError) as e:
        raise LorakitError(f"{folder}: cannot read the pipeline's configs ({e}); pass --resolution") from None
    return int(sample) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
