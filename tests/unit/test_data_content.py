"""`lorakit data check` on content: personal data and secrets (real phonenumbers and detect-secrets), their
redaction, --fail-on, answer imbalance and train/validation leaks."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorakit.cli import main
from lorakit.data.check import check_file
from lorakit.data.content import find_spans, secret_scanner

KEY = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAvY8Zq3mX2kQ9hJtWbN1c7fR0pLsU4eTgHa6yKiDjOoVw\n"
       "Zc5rB8nQ1mXy3tLk9PqA2sFdGhJ4kLzXcVbNm7QwErTy\n-----END RSA PRIVATE KEY-----")
PLANTED = [
    {"instruction": "How do I reach support?", "output": "Write to jane.roe@example.org any time."},
    {"instruction": "Who do I call?", "input": "", "output": "Call +1 415 555 2671 after nine."},
    {"instruction": "Pay with card 4242 4242 4242 4242, please.", "output": "Paid."},
    {"instruction": "Wire the rent.", "input": "to GB82 WEST 1234 5698 7654 32", "output": "Sent."},
    {"instruction": "Which host?", "output": "The database runs at 203.0.113.7 now."},
    {"instruction": "Configure the CLI.", "output": "Use the key AKIAIOSFODNN7EXAMPLE for the bucket."},
    {"instruction": "Show the deploy key.", "output": KEY},
    # look-alikes only: a version string, a version-shaped 1.2.3.4, a dotted run, an ISO date, 16 digits that
    # fail Luhn, an IBAN with a wrong check digit
    {"instruction": "Release notes?", "input": "Version 2.13.0 (build 1.2.3.4), see 1.2.3.4.5, on 2024-01-15.",
     "output": "Order 1234567812345678 moved; IBAN GB82 WEST 1234 5698 7654 33 bounced."},
]
EXPECTED = [  # (line, field, kind, masked)
    (1, "output", "email", "j***@e***.org"),
    (2, "output", "phone", "+* *** *** **71"),
    (3, "instruction", "card", "**** **** **** 4242"),
    (4, "input", "iban", "GB** **** **** **** **54 32"),
    (5, "output", "ip", "203.*"),
    (6, "output", "AWS Access Key", "AKIA***"),
    (7, "output", "Private Key", "-----BEGIN RSA PRIVATE KEY----- ***"),
]
LEAVES = ("Explain how photosynthesis turns sunlight, water and carbon dioxide into glucose and oxygen "
          "inside the leaves of plants.")


@pytest.fixture(scope="module")
def bert(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def check(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    """The real CLI in this process (no second torch import): exit status, stdout lines, stderr lines."""
    code = main(["data", "check", *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_each_planted_finding_is_reported_at_its_line_and_field(tmp_path, bert):
    path = write_jsonl(tmp_path / "planted.jsonl", PLANTED)
    report = check_file(path, bert, seq_len=128)
    assert [(f.line, f.field, f.kind, f.masked) for f in report.findings] == EXPECTED
    assert report.finding_counts == {"email": 1, "phone": 1, "card": 1, "iban": 1, "ip": 1, "AWS Access Key": 1,
                                     "Private Key": 1}
    assert str(report.findings[0]) == f"{path}:1: output: email: j***@e***.org"
    assert any(w.startswith("7 findings of personal data or secrets") for w in report.warnings)


def test_conversation_turns_and_a_sharegpt_system_are_scanned(tmp_path, bert):
    chat = [{"messages": [{"role": "user", "content": "Is this ok? user@mail.example.com"},
                          {"role": "assistant", "content": "Rotate xoxb-123456789012-1234567890123-abcdefghijklmnopqrstuvwx"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(chat, indent=2))  # records start on lines 2 and 14
    report = check_file(path, bert, seq_len=128)
    assert [(f.line, f.field, f.kind) for f in report.findings] == [
        (2, "messages[0].content", "email"), (2, "messages[1].content", "Slack Token")]
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"system": "Escalate to +44 20 7946 0958.",
         "conversations": [{"from": "human", "value": "Where is it?"},
                           {"from": "gpt", "value": "Use ghp_abcdefghijklmnopqrstuvwxyz0123456789 to pull it."}]}])
    report = check_file(sharegpt, bert, seq_len=128)
    assert [(f.line, f.field, f.kind, f.masked) for f in report.findings] == [
        (1, "system", "phone", "+** ** **** **58"), (1, "conversations[1].value", "GitHub Token", "ghp_***")]


@pytest.mark.parametrize("text", [
    "Upgrade to version 2.13.0 today.", "Released as 1.2.3.4 last week.", "See 10.1.2.3.4 for details.",
    "It happened on 2024-01-15 at 10:22:31.", "Ref 1234567812345678 is closed.", "4242 4242 4242 4241",
    "IBAN DE89 3704 0044 0532 0130 01 is wrong.", "Name the type of this Python value. {'gamma': -86, 'code': 7}",
    "std::vector<int> v; x = 3.14159; pi is 3.141592653589793", "uuid 123e4567-e89b-12d3-a456-426614174000",
])
def test_look_alikes_are_not_findings(text):
    with secret_scanner():
        assert find_spans(text) == []


def test_redact_then_fail_on(tmp_path, minilm_path, capsys):
    path = write_jsonl(tmp_path / "planted.jsonl", PLANTED)
    out = tmp_path / "redacted.jsonl"
    code, stdout, _ = check(capsys, str(path), "--model", minilm_path, "--fail-on", "pii,secrets",
                            "--redact", str(out))
    assert code == 1
    listed = [line for line in stdout if line.startswith(f"{path}:")]
    assert listed[:7] == [f"{path}:{n}: {field}: {kind}: {masked}" for n, field, kind, masked in EXPECTED]
    assert "personal data: 1 card, 1 email, 1 iban, 1 ip, 1 phone; secrets: 1 AWS Access Key, 1 Private Key" in stdout
    assert stdout[-1] == "failed: 7 findings of pii, secrets (--fail-on)"

    before, after = path.read_text().splitlines(), out.read_text().splitlines()
    assert len(after) == len(before) and after[7] == before[7]  # JSONL stays JSONL; an untouched line stays as is
    redacted = [json.loads(line) for line in after]
    assert [sorted(r) for r in redacted] == [sorted(r) for r in PLANTED]
    assert [redacted[0]["output"], redacted[1]["output"], redacted[2]["instruction"], redacted[3]["input"],
            redacted[4]["output"], redacted[5]["output"], redacted[6]["output"]] == [
        "Write to <EMAIL> any time.", "Call <PHONE> after nine.", "Pay with card <CARD>, please.", "to <IBAN>",
        "The database runs at <IP> now.", "Use the key <SECRET> for the bucket.", "<SECRET>"]

    code, stdout, _ = check(capsys, str(out), "--model", minilm_path, "--fail-on", "pii,secrets")
    assert code == 0 and "personal data: none; secrets: none" in stdout
    # only the named classes fail the check
    secrets_only = write_jsonl(tmp_path / "pii.jsonl", PLANTED[:5])
    assert check(capsys, str(secrets_only), "--model", minilm_path, "--fail-on", "secrets")[0] == 0
    assert check(capsys, str(secrets_only), "--model", minilm_path, "--fail-on", "pii")[0] == 1


def test_a_json_array_is_redacted_into_a_json_array(tmp_path, minilm_path, capsys):
    records = [{"messages": [{"role": "user", "content": "Mail me at a.b@example.com"},
                             {"role": "assistant", "content": "Done, a.b@example.com noted."}]},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records, indent=2))
    out = tmp_path / "chat.redacted.json"
    code, stdout, _ = check(capsys, str(path), "--model", minilm_path, "--redact", str(out), "--json")
    assert code == 0
    assert json.loads(stdout[0])["redacted"] == {"path": str(out), "replaced": 2}
    assert json.loads(out.read_text()) == [
        {"messages": [{"role": "user", "content": "Mail me at <EMAIL>"},
                      {"role": "assistant", "content": "Done, <EMAIL> noted."}]}, records[1]]


def test_answer_imbalance_and_validation_leaks(tmp_path, bert):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": "Is the sky blue on a clear day?", "output": "Yes"},
        {"instruction": "Is water wet?", "output": "yes."},
        {"instruction": "Is fire cold?", "output": "No"},
        {"instruction": LEAVES, "output": "Chlorophyll absorbs light; the Calvin cycle makes sugar."},
        {"instruction": "Do cats bark?", "output": "Yes"},
    ])
    val = write_jsonl(tmp_path / "val.jsonl", [
        {"instruction": "is water WET", "output": "Yes"},
        {"instruction": LEAVES.replace("of plants", "of green plants"),
         "output": "Chlorophyll absorbs light; the Calvin cycle makes sugars."},
        {"instruction": "Who wrote Faust?", "output": "Goethe."},
    ])
    report = check_file(train, bert, seq_len=128, val_path=val)
    assert (report.answers, report.distinct_answers, report.top_answer, report.top_answer_share) == (5, 3, "Yes", 0.6)
    assert any(w.startswith('60.0% of the answers are "Yes" (above --max-answer-share 0.5)') for w in report.warnings)
    assert report.val_overlap == 2
    assert report.val_leaks == [f"{val}:1: same prompt as {train}:2", f"{val}:2: near duplicate of {train}:4"]
    relaxed = check_file(train, bert, seq_len=128, max_answer_share=0.7)
    assert not any("of the answers are" in w for w in relaxed.warnings)


def test_bad_input_is_one_line(tmp_path, minilm_path, capsys):
    path = write_jsonl(tmp_path / "planted.jsonl", PLANTED)
    original = path.read_bytes()
    code, stdout, stderr = check(capsys, str(path), "--model", minilm_path, "--fail-on", "pii,passwords")
    assert (code, stdout) == (2, [])
    assert stderr == ["lorakit: error: --fail-on takes a comma list of pii, secrets (e.g. --fail-on pii,secrets), "
                      "got 'passwords'"]
    code, stdout, stderr = check(capsys, str(path), "--model", minilm_path, "--redact", str(path))
    assert (code, stdout, path.read_bytes()) == (2, [], original)
    assert stderr == [f"lorakit: error: --redact {path}: that is the input file; name a new file for the "
                      "redacted copy"]
    code, _, stderr = check(capsys, str(path), "--model", minilm_path, "--phone-region", "XX")
    assert code == 2 and len(stderr) == 1 and stderr[0].startswith("lorakit: error: --phone-region must be")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "Mail x@example.com", "output": "ok"}\n{"instruction": \n')
    code, _, stderr = check(capsys, str(broken), "--model", minilm_path, "--redact", str(tmp_path / "r.jsonl"))
    assert code == 2 and not (tmp_path / "r.jsonl").exists()
    assert stderr == [f"lorakit: error: --redact: {broken}:2 is not valid JSON; fix it first (nothing written)"]


def test_an_unreadable_file_is_one_line(minilm_path, capsys):
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        path = write_jsonl(folder / "locked.jsonl", PLANTED)
        path.chmod(0)
        as_root = os.geteuid() == 0
        if as_root:  # root reads anything: be nobody for the call (everything it runs is imported already)
            main(["data", "check", str(path), "--model", minilm_path, "--fail-on", "bogus"])
            capsys.readouterr()
            os.seteuid(65534)
        try:
            code = main(["data", "check", str(path), "--model", minilm_path])
        finally:
            if as_root:
                os.seteuid(0)
        captured = capsys.readouterr()
        assert (code, captured.out) == (2, "")
        assert captured.err.splitlines() == [
            f"lorakit: error: {path}: cannot read it (Permission denied); check that it is a readable file"]
    finally:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


def test_the_most_frequent_answer_is_shown_redacted(tmp_path, bert):
    path = write_jsonl(tmp_path / "support.jsonl", [
        {"instruction": f"Question {i}?", "output": "Ask help@example.com."} for i in range(3)])
    report = check_file(path, bert, seq_len=128)
    assert (report.top_answer, report.top_answer_share) == ("Ask <EMAIL>.", 1.0)
    assert len(report.findings) == 3 and "help@" not in "\n".join(report.warnings)
    assert any(w.startswith('100.0% of the answers are "Ask <EMAIL>."') for w in report.warnings)
