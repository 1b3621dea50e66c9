"""Personal data and secrets in training text: find them, mask them for the report, redact them.

Every string value of a record is scanned (any field, at any depth: alpaca fields, chat and ShareGPT turns,
a ShareGPT ``system``, extra metadata). What counts:

- ``email``: an address with a dotted domain ending in a 2+ letter top-level domain.
- ``phone``: Google's libphonenumber (``phonenumbers.PhoneNumberMatcher``, leniency VALID: the number must be
  a valid number of its region, so dates, version strings and short ids are not phones); numbers without a
  ``+country`` prefix are read in ``region`` (``--phone-region``, default US).
- ``card``: 13 to 19 digits (single spaces or dashes between them allowed) that pass the Luhn checksum.
- ``iban``: a country code, two check digits and 11 to 30 letters/digits that pass ISO 13616's mod-97 check.
- ``ip``: an IPv4 or IPv6 address that Python's ``ipaddress`` accepts, not loopback or unspecified; four
  dot-separated numbers inside a longer dotted run (``1.2.3.4.5``), after ``v``/``version``/``release``, or
  all single digits (``1.2.3.4``, the shape of a version) are versions, not addresses.
- secrets: Yelp's detect-secrets plugins (cloud keys, GitHub/GitLab/Slack/Stripe/OpenAI/... tokens, JSON web
  tokens, private-key blocks, passwords assigned to keyword-named variables, high-entropy strings above the
  plugins' own entropy limits), each reported under the plugin's name for it (``AWS Access Key``). Its
  public-IP plugin is left out (``ip`` covers addresses) and nothing is verified over the network.

Overlapping matches keep one: secrets first, then card, IBAN, email, IP, phone.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import phonenumbers
from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.core.scan import scan_line
from detect_secrets.settings import get_plugins, transient_settings

from lorakit.errors import LorakitError
from lorakit.fileio import write_atomic

CLASSES = ("pii", "secrets")  # a finding's category: email, phone, card, iban, ip are pii; the rest secrets
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "card": "<CARD>", "iban": "<IBAN>", "ip": "<IP>"}
SECRET_PLACEHOLDER = "<SECRET>"
DEFAULT_REGION = "US"

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])")
# whole runs of digit groups only: not 13 digits out of a longer grouped number (an IBAN's, an id's)
_CARD = re.compile(r"(?<![\w-])(?<!\d )(?<!\d-)\d(?:[ -]?\d){12,18}(?![\w-])(?! \d)(?!-\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_VERSION_BEFORE = re.compile(r"(?i)(?:\bv|\bver|\bversion|\brelease|\bbuild|==|>=|<=|@)\s*$")
# a phone number has 7+ digits in one run of digits and separators: cheap to test before libphonenumber
_PHONE_HINT = re.compile(r"(?:\d[\s().\-/]{0,3}){7,}")
# Every detect-secrets pattern used needs one of these: a word of its keyword lists (api_key, password, pwd,
# secret, token, ...: each contains one below), a URL with credentials, PEM armour, Artifactory's AKC/AP
# prefixes, or a token of 9+ characters with a digit or of 20+ without; a line with none is not scanned
_SECRET_HINT = re.compile(r"(?i:pass|pwd|secret|contrase|key|token|auth)|://|-----|AKC|AP[\dA-F]"
                          r"|[\w+/=-]{20,}|(?=[\w+/=-]*\d)[\w+/=-]{9,}")
_TOKEN_CHARS = re.compile(r"[\w+/=.~-]")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*-----")
_ORDER = ("secret", "card", "iban", "email", "ip", "phone")  # who keeps an overlapping stretch of text


@dataclass(frozen=True)
class Finding:
    """One match in one field of one record; ``masked`` hides most of the value."""

    path: str
    line: int
    field: str
    kind: str  # email, phone, card, iban, ip, or a detect-secrets type such as "AWS Access Key"
    category: str  # "pii" or "secrets"
    masked: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.kind}: {self.masked}"


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    kind: str
    category: str

    @property
    def placeholder(self) -> str:
        return PLACEHOLDERS.get(self.kind, SECRET_PLACEHOLDER)


def check_region(region: str) -> str:
    """``region`` as libphonenumber's two-letter code; LorakitError naming --phone-region if unknown."""
    code = region.upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise LorakitError(f"--phone-region must be a two-letter region libphonenumber knows (US, GB, DE, ...), "
                           f"got {region!r}")
    return code


@contextmanager
def secret_scanner() -> Iterator[None]:
    """detect-secrets configured for a scan: every plugin but its public-IP one, its default filters."""
    names = [cls.__name__ for cls in get_mapping_from_secret_type_to_class().values()
             if cls.__name__ != "IPPublicDetector"]
    with transient_settings({"plugins_used": [{"name": n} for n in names]}):
        yield


# --- finding --------------------------------------------------------------------------------------


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _iban_ok(compact: str) -> bool:
    """ISO 13616: the first four characters moved to the end, letters as 10..35, mod 97 is 1."""
    if not 15 <= len(compact) <= 34:
        return False
    return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


def _emails(text: str) -> Iterator[_Span]:
    for m in _EMAIL.finditer(text):
        yield _Span(m.start(), m.end(), "email", "pii")


def _cards(text: str) -> Iterator[_Span]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _luhn(digits):
            yield _Span(m.start(), m.end(), "card", "pii")


def _ibans(text: str) -> Iterator[_Span]:
    for m in _IBAN.finditer(text):
        # the pattern may run on into following capitals ("... 3000 IS MINE"): keep the longest valid prefix
        groups = m.group().split(" ")
        for n in range(len(groups), 0, -1):
            candidate = " ".join(groups[:n])
            if _iban_ok(candidate.replace(" ", "")):
                yield _Span(m.start(), m.start() + len(candidate), "iban", "pii")
                break


def _ips(text: str) -> Iterator[_Span]:
    for m in _IPV4.finditer(text):
        octets = m.group().split(".")
        if all(len(o) == 1 for o in octets) or _VERSION_BEFORE.search(text, 0, m.start()):
            continue
        yield from _address(m)
    for m in _IPV6.finditer(text):
        yield from _address(m)


def _address(m: re.Match) -> Iterator[_Span]:
    try:
        address = ipaddress.ip_address(m.group())
    except ValueError:
        return
    if not (address.is_loopback or address.is_unspecified):
        yield _Span(m.start(), m.end(), "ip", "pii")


def _phones(text: str, region: str) -> Iterator[_Span]:
    if not _PHONE_HINT.search(text):
        return
    for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
        yield _Span(m.start, m.end, "phone", "pii")


def _secrets(text: str) -> Iterator[_Span]:
    """detect-secrets, line by line (its unit); a match widens to the whole token it sits in (the GitHub
    plugin reports only ``ghp``), a private-key header to its whole PEM block."""
    plugins = {p.secret_type: p for p in get_plugins()}
    offset = 0
    for line in text.split("\n"):
        if _SECRET_HINT.search(line):
            for secret in scan_line(line):
                value = secret.secret_value or ""
                plugin = plugins.get(secret.type)
                limit = getattr(plugin, "entropy_limit", None)
                # scan_line is eager: it reports every candidate string, the entropy limit is the caller's
                if not value or (limit is not None and plugin.calculate_shannon_entropy(value) <= limit):
                    continue
                start = line.find(value)
                if start < 0:
                    continue
                end = start + len(value)
                while start > 0 and _TOKEN_CHARS.match(line[start - 1]):
                    start -= 1
                while end < len(line) and _TOKEN_CHARS.match(line[end]):
                    end += 1
                end = start + len(line[start:end].rstrip("."))
                if secret.type == "Private Key" and "-----BEGIN" in line:
                    start = line.index("-----BEGIN")
                    block_end = _PEM_END.search(text, offset + start)
                    yield _Span(offset + start, block_end.end() if block_end else len(text), secret.type, "secrets")
                else:
                    yield _Span(offset + start, offset + end, secret.type, "secrets")
        offset += len(line) + 1


def find_spans(text: str, region: str = DEFAULT_REGION) -> list[_Span]:
    """Non-overlapping matches in ``text``, in order of position (call inside ``secret_scanner()``)."""
    # a named plugin (Slack Token) before a generic high-entropy match of the same token, then the longest
    found = {"secret": sorted(_secrets(text), key=lambda s: ("High Entropy" in s.kind, s.start - s.end)),
             "card": list(_cards(text)), "iban": list(_ibans(text)), "email": list(_emails(text)),
             "ip": list(_ips(text)), "phone": list(_phones(text, region))}
    kept: list[_Span] = []
    for kind in _ORDER:
        for span in found[kind]:
            if all(span.end <= k.start or span.start >= k.end for k in kept):
                kept.append(span)
    return sorted(kept, key=lambda s: s.start)


# --- masking --------------------------------------------------------------------------------------


def _star(value: str, keep_head: int, keep_tail: int) -> str:
    """Letters and digits replaced by ``*`` except the first ``keep_head`` and last ``keep_tail`` of them;
    separators stay (``**** **** **** 4242``)."""
    positions = [i for i, c in enumerate(value) if c.isalnum()]
    hidden = set(positions[keep_head:len(positions) - keep_tail])
    return "".join("*" if i in hidden else c for i, c in enumerate(value))


def mask(value: str, kind: str) -> str:
    """Enough of ``value`` to find it again in the file, not enough to use it."""
    if kind == "email":
        local, _, domain = value.partition("@")
        host, _, tld = domain.rpartition(".")
        return f"{local[:1]}***@{host[:1]}***.{tld}"
    if kind == "card":
        return _star(value, 0, 4)
    if kind == "iban":
        return _star(value, 2, 4)
    if kind == "phone":
        return _star(value, 0, 2)
    if kind == "ip":
        sep = ":" if ":" in value else "."
        return value.split(sep)[0] + sep + "*"
    first = value.split("\n")[0]
    if first.startswith("-----BEGIN"):
        return f"{first} ***"
    # the first 4 characters of a long token are its type (AKIA, ghp_, xoxb, sk_l), not its secret part
    return (value[:4] if len(value) >= 16 else "") + "***"


# --- records --------------------------------------------------------------------------------------


def string_fields(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """``(field path, text)`` for every string inside a JSON value: ``messages[1].content``."""
    if isinstance(value, str):
        yield where or "(record)", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from string_fields(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from string_fields(item, f"{where}[{i}]")


def scan_record(path: str, line: int, record: Any, region: str = DEFAULT_REGION) -> list[Finding]:
    """Every finding in ``record`` (call inside ``secret_scanner()``)."""
    return [Finding(path, line, where, span.kind, span.category, mask(text[span.start:span.end], span.kind))
            for where, text in string_fields(record) for span in find_spans(text, region)]


def redact_text(text: str, region: str = DEFAULT_REGION) -> tuple[str, int]:
    """``text`` with each finding replaced by its placeholder, and how many there were."""
    spans = find_spans(text, region)
    for span in reversed(spans):
        text = text[:span.start] + span.placeholder + text[span.end:]
    return text, len(spans)


def redact_value(value: Any, region: str = DEFAULT_REGION) -> tuple[Any, int]:
    """A copy of a JSON value with every string redacted, and the number of findings replaced."""
    if isinstance(value, str):
        return redact_text(value, region)
    if isinstance(value, dict):
        pairs = [(k, redact_value(v, region)) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, sum(n for _, (_, n) in pairs)
    if isinstance(value, list):
        items = [redact_value(v, region) for v in value]
        return [v for v, _ in items], sum(n for _, n in items)
    return value, 0


def check_redact_target(path: str | Path, out: str | Path) -> None:
    """LorakitError unless ``out`` is a new place for ``path``'s redacted copy (never ``path`` itself)."""
    src, dest = Path(path), Path(out)
    if dest.resolve() == src.resolve() or (dest.exists() and dest.samefile(src)):
        raise LorakitError(f"--redact {out}: that is the input file; name a new file for the redacted copy")
    if not dest.resolve().parent.is_dir():
        raise LorakitError(f"--redact {out}: folder {dest.resolve().parent} does not exist")


def redact_file(path: str | Path, out: str | Path, region: str = DEFAULT_REGION) -> int:
    """Write ``out``: ``path`` with every finding replaced by ``<EMAIL>``, ``<SECRET>``, ...; JSONL stays
    JSONL (untouched lines byte for byte), a JSON array stays an array. Written atomically; refused onto
    ``path`` itself and when any line is not JSON (what cannot be read cannot be redacted). Returns the
    number of findings replaced."""
    check_redact_target(path, out)
    src, dest = Path(path), Path(out)
    raw = src.read_bytes().removeprefix(b"\xef\xbb\xbf")
    replaced = 0
    with secret_scanner():
        if raw.lstrip()[:1] == b"[":
            try:
                records = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise LorakitError(f"--redact: {path} is not valid JSON; fix the lines data check lists first "
                                   "(nothing written)") from None
            records, replaced = redact_value(records, region)
            text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
        else:
            lines = raw.split(b"\n")
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise LorakitError(f"--redact: {path}:{number + 1} is not valid JSON; fix it first "
                                       "(nothing written)") from None
                value, n = redact_value(value, region)
                if n:
                    lines[number] = json.dumps(value, ensure_ascii=False).encode("utf-8")
                    replaced += n
            text = b"\n".join(lines).decode("utf-8")
    write_atomic(dest, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return replaced
