"""The README and the bundled model card say what the 4.2M-parameter base can and cannot learn, and point to
--model for real work; the card's generator says the same, so a rebuild keeps it (issue 8, item 10)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).parents[2]


def paragraph(text: str, start: str) -> str:
    return " ".join(text[text.index(start):].split("\n\n")[0].split())


def test_readme_and_model_card_call_the_bundled_model_a_demonstration_and_point_to_model():
    readme = ROOT.joinpath("README.md").read_text()
    note = paragraph(readme, "The bundled base model")
    assert "demonstration model for its own example task" in note and "--model" in note
    card = ROOT.joinpath("examples", "base-model", "README.md").read_text()
    intro = paragraph(card, "**A demonstration model for its own task.**")
    assert "For real work, fine-tune your own base with `--model`" in intro
    assert "A knowledge task (country -> capital) stayed near zero" in " ".join(card.split())


def test_the_card_generator_writes_the_same_words():
    spec = importlib.util.spec_from_file_location("build_base_model", ROOT / "examples" / "build_base_model.py")
    source = spec.loader.get_source("build_base_model")
    card = ROOT.joinpath("examples", "base-model", "README.md").read_text()
    for start in ("**A demonstration model for its own task.**", "Trained on about a million tokens"):
        assert paragraph(card, start) == paragraph(source, start)


def test_the_bundled_image_pipeline_is_small_and_its_card_is_what_the_build_writes():
    """examples/image-model (issue 13): at most 30 MB, and README.md is the build script's model card of the
    figures in its build_info.json (a rebuild rewrites both)."""
    folder = ROOT / "examples" / "image-model"
    assert (folder / "model_index.json").is_file(), "build it: python examples/build_image_model.py"
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 30_000_000
    spec = importlib.util.spec_from_file_location("build_image_model", ROOT / "examples" / "build_image_model.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    info = json.loads((folder / "build_info.json").read_text())
    assert (folder / "README.md").read_text() == build.model_card(info)
    assert "**A demonstration model for its own task.**" in (folder / "README.md").read_text()
