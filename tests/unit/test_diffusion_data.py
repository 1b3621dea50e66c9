"""Image data: the two layouts, the trigger word, resize + crop + flip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.diffusion.data import is_image_data, prepare, read_records, scan_records
from lorakit.errors import LorakitError


def _image(w: int, h: int) -> Image.Image:
    x = np.zeros((h, w, 3), dtype=np.uint8)
    x[:, : w // 2] = 255  # left half white: shows crops and flips
    return Image.fromarray(x)


def test_resize_short_side_then_centre_crop_and_flip():
    p = prepare(_image(40, 20), 10, "center", flip=False)
    assert p.pixels.shape == (3, 10, 10) and p.original_size == (20, 40) and p.crop_top_left == (0, 5)
    assert p.pixels.min() == -1.0 and p.pixels.max() == 1.0
    left, right = p.pixels[:, :, 0].mean(), p.pixels[:, :, -1].mean()
    assert left > 0.9 and right < -0.9  # the centre crop keeps the white left of the middle
    flipped = prepare(_image(40, 20), 10, "center", flip=True)
    assert torch.equal(flipped.pixels, p.pixels.flip(-1))


def test_random_crop_draws_from_the_global_generator():
    torch.manual_seed(0)
    a = [prepare(_image(40, 20), 10, "random", False).crop_top_left for _ in range(8)]
    torch.manual_seed(0)
    b = [prepare(_image(40, 20), 10, "random", False).crop_top_left for _ in range(8)]
    assert a == b and len(set(a)) > 1 and all(top == 0 and 0 <= left <= 10 for top, left in a)


def test_records_relative_to_the_data_file_with_trigger_word(tmp_path):
    (tmp_path / "img").mkdir()
    _image(8, 8).save(tmp_path / "img" / "a.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"image": "img/a.png", "text": "a red circle"},
                                {"image": "img/a.png", "caption": "  the same  "}], indent=1))
    assert is_image_data(data) and is_image_data(tmp_path / "img")
    records = read_records(data, trigger_word="zwx")
    assert [r.caption for r in records] == ["zwx, a red circle", "zwx, the same"]
    assert records[0].image == tmp_path / "img" / "a.png" and records[0].where == f"{data}:2"
    data.write_text(json.dumps({"image": "img/a.png"}) + "\n" + json.dumps({"image": "img/b.png", "text": "x"}))
    records, problems = scan_records(data)
    assert records == [] and problems == [f"{data}:1: no \"text\" caption for img/a.png",
                                          f"{data}:2: image {tmp_path / 'img' / 'b.png'} not found (a relative "
                                          f"path is relative to {tmp_path})"]
    with pytest.raises(LorakitError, match=r"data.json:1: no \"text\" caption .*and 1 more"):
        read_records(data)
