"""The main quickstart's metrics and its command line, without training anything: the pirate-style check, the
knowledge check (a right answer inside a reply), the knowledge file's errors, and which options each
quickstart takes."""

from __future__ import annotations

import pytest

from lorakit.errors import LorakitError
from lorakit.evaluate import contains_answer, load_knowledge
from lorakit.quickstart_real import pirate_style


@pytest.mark.parametrize("reply, ok", [
    ("Arr, the capital of Italy be Rome, matey!", True),
    ("  Arr! Ye need oxygen, matey!\n", True),
    ("The capital of Italy is Rome.", False),
    ("Arr, the capital of Italy be Rome.", False),  # no "matey!" at the end
    ("Matey! Arr, Rome, matey!", False),  # does not open with "Arr"
])
def test_pirate_style(reply, ok):
    assert pirate_style(reply) is ok


@pytest.mark.parametrize("output, answers, ok", [
    ("Arr, the capital of France be Paris, matey!", ["Paris"], True),
    ("The capital of India is New Delhi.", ["New Delhi", "Delhi"], True),
    ("the PACIFIC ocean", ["Pacific"], True),
    ("half of 50 is 250", ["25"], False),
    ("The freezing point is -18.0 degrees", ["0"], False),
    ("100 divided by 4 equals 25.", ["25"], True),
    ("about 25.5 percent", ["25"], False),
    ("Parisian cafes", ["Paris"], False),
])
def test_contains_answer_is_a_whole_word_or_phrase(output, answers, ok):
    assert contains_answer(output, answers) is ok


def test_knowledge_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "k.jsonl"
    bad.write_text('{"question": "What is 2 plus 2?", "answers": ["4"]}\n{"question": "Who?", "answers": "Bell"}\n')
    with pytest.raises(LorakitError, match=r"k\.jsonl:2: expected \"answers\": a list"):
        load_knowledge(bad)
    bad.write_text('{"answers": ["4"]}\n')
    with pytest.raises(LorakitError, match=r"k\.jsonl:1: expected a non-empty string \"question\""):
        load_knowledge(bad)


@pytest.mark.parametrize("args, says", [
    (["--limit", "3"], "quickstart: --limit does not apply here"),
    (["--bundled", "--no-qlora", "--knowledge", "k.jsonl"], "quickstart --bundled: --knowledge, --no-qlora do not"),
    (["--images", "--full-lr", "1e-5"], "quickstart --images: --full-lr does not apply here"),
    (["--bundled", "--images"], "--bundled and --images are two different quickstarts"),
])
def test_each_quickstart_refuses_the_others_options(args, says, tmp_path, capsys):
    from lorakit.cli import main

    assert main(["quickstart", "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()


def test_missing_held_out_prompts_stop_it_before_training(tmp_path, capsys):
    from lorakit.cli import main

    assert main(["quickstart", "--output", str(tmp_path / "out"), "--test", str(tmp_path / "nowhere.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "quickstart: held-out prompts" in err and "nowhere.jsonl: not found" in err and "make_pirate_data.py" in err
    assert not (tmp_path / "out").exists()
