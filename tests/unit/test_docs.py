"""The README and the bundled model card say what the 4.2M-parameter base can and cannot learn, and point to
--model for real work; the card's generator says the same, so a rebuild keeps it (issue 8, item 10)."""

from __future__ import annotations

import importlib.util
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
