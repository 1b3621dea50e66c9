"""Image + caption data: where the records come from, how an image becomes a training tensor.

Two layouts, as the field uses them:

- a JSON array or JSONL file of ``{"image": "path.png", "text": "caption"}`` records (``caption`` is
  accepted for ``text``); a relative image path is relative to the data file's folder;
- a folder of images, each with a same-named ``.txt`` caption beside it (kohya's and ai-toolkit's layout).

A problem is named where it is: ``file:line`` for a record, the image's path for a folder. Images are
resized so their short side is the training resolution, then cropped to a square (centre or random) and
optionally flipped left-right; the crop's position and the original size are kept (SDXL conditions on them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorakit.data.formats import iter_records
from lorakit.errors import LorakitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageRecord:
    image: Path
    caption: str
    where: str  # "data.jsonl:12" or the image's path: how errors name this record


def is_image_data(path: str | Path) -> bool:
    """A folder of images, or a JSON/JSONL file whose first record has an ``image`` field."""
    p = Path(path)
    if p.is_dir():
        return True
    try:
        for _, value, problem in iter_records(p):
            return problem is None and "image" in value
    except LorakitError:
        return False
    return False


def scan_records(path: str | Path, trigger_word: str = "") -> tuple[list[ImageRecord], list[str]]:
    """Every record of ``path`` whose fields are sound, and every problem as ``where: what`` (image files
    are not opened here; see ``load_image``)."""
    p = Path(path)
    if p.is_dir():
        return _scan_folder(p, trigger_word)
    if not p.is_file():
        raise LorakitError(f"--data {path}: no such file or folder")
    records, problems = [], []
    for line, value, problem in iter_records(p):
        where = f"{p}:{line}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        image, text = value.get("image"), value.get("text", value.get("caption"))
        if not isinstance(image, str) or not image:
            problems.append(f"{where}: no \"image\" path (records are {{\"image\": \"path.png\", \"text\": \"caption\"}})")
            continue
        if text is None:
            problems.append(f"{where}: no \"text\" caption for {image}")
            continue
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: the caption of {image} is empty or not a string")
            continue
        file = Path(image) if Path(image).is_absolute() else p.parent / image
        if not file.is_file():
            problems.append(f"{where}: image {file} not found (a relative path is relative to {p.parent})")
            continue
        records.append(ImageRecord(file, with_trigger(text, trigger_word), where))
    if not records and not problems:
        problems.append(f"{p}: no records (expected a JSON array or JSONL of {{\"image\", \"text\"}} objects)")
    return records, problems


def _scan_folder(folder: Path, trigger_word: str) -> tuple[list[ImageRecord], list[str]]:
    records, problems = [], []
    images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            problems.append(f"{image}: no caption file {caption.name} beside it")
            continue
        text = caption.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            problems.append(f"{caption}: empty caption")
            continue
        records.append(ImageRecord(image, with_trigger(text, trigger_word), str(image)))
    if not images:
        problems.append(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return records, problems


def read_records(path: str | Path, trigger_word: str = "") -> list[ImageRecord]:
    """The records of ``path``; LorakitError at the first problem (``lorakit data check`` lists them all)."""
    records, problems = scan_records(path, trigger_word)
    if problems:
        more = f" (and {len(problems) - 1} more; lorakit data check {path} lists them)" if len(problems) > 1 else ""
        raise LorakitError(problems[0] + more)
    return records


def with_trigger(caption: str, trigger_word: str) -> str:
    caption = caption.strip()
    return f"{trigger_word}, {caption}" if trigger_word else caption


def load_image(record: ImageRecord):
    """The record's image as RGB, fully decoded (a truncated file fails here, not mid-training)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(record.image) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise LorakitError(f"{record.where}: cannot read image {record.image} ({e}); replace or remove it") from None


@dataclass(frozen=True)
class Prepared:
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in resized pixels


def prepare(image, resolution: int, crop: str, flip: bool) -> Prepared:
    """Resize the short side to ``resolution`` (bicubic, as diffusers' scripts), crop a square (centre, or
    at a position drawn from torch's global generator), flip left-right if ``flip``."""
    from PIL import Image

    w, h = image.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    if crop == "random":
        top = int(torch.randint(0, nh - resolution + 1, (1,)))
        left = int(torch.randint(0, nw - resolution + 1, (1,)))
    else:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0  # (3, R, R)
    if flip:
        x = x.flip(-1)
    return Prepared(x, (h, w), (top, left))
