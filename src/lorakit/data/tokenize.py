"""Records -> token ids and labels: prompt masking, truncation, packing, a tokenized-data cache,
length-grouped batches and the collate function.

Labels follow the Hugging Face convention: the model shifts them by one internally, and -100
marks a position that adds nothing to the loss (prompt tokens, padding).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import random
import tempfile
import weakref
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorakit.config import DataConfig
from lorakit.data.formats import (
    FORMATS,
    detect_file_format,
    eos_text,
    read_records,
    to_segments,
    validate_record,
)
from lorakit.errors import LorakitError
from lorakit.gguf import converted_folder, find_gguf
from lorakit.hub import missing_model_message

IGNORE_INDEX = -100
CACHE_VERSION = "1"  # bump when tokenization changes, so old caches are not reused

log = logging.getLogger(__name__)


def load_tokenizer(name_or_path: str, flag: str = "--model") -> Any:
    """AutoTokenizer from a local folder, a hub id, or a GGUF file (or a folder holding one: its tokenizer and
    chat template, from the file's cached conversion); only the tokenizer, never the weights."""
    from transformers import AutoTokenizer

    gguf = find_gguf(name_or_path, flag)
    if gguf is not None:
        name_or_path = str(converted_folder(gguf, weights=False, flag=flag))
    local = Path(name_or_path).expanduser()
    missing = missing_model_message(name_or_path, flag)  # a mistyped local path is not sent to the hub
    if missing:
        raise LorakitError(missing)
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else name_or_path)
    except Exception as e:  # transformers raises OSError, ValueError, hub errors...: all mean "not usable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LorakitError(f"{flag} {name_or_path!r}: cannot load a tokenizer ({first})") from None


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: pad, else eos, else 0 (padded positions are masked out anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


_prefix_cache: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()


def prefix_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text by itself (bos, or BERT's [CLS]); often none.

    Remembered per tokenizer: probing costs two encodes, as much as a short record."""
    if tokenizer in _prefix_cache:
        return _prefix_cache[tokenizer]
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    prefix = next((list(full[:i]) for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), [])
    _prefix_cache[tokenizer] = prefix
    return prefix


def _encode(examples: list[list[tuple[str, bool]]], tokenizer: Any) -> list[tuple[list[int], list[bool]]]:
    """Per example: token ids of its joined segments and, per token, whether it is response.

    A fast tokenizer encodes each whole text at once (so tokens merge across segment borders as
    they would at inference; a batch of texts runs in parallel) and a token counts as response when
    its first character does. A slow tokenizer encodes segment by segment.
    """
    if not getattr(tokenizer, "is_fast", False):
        out = []
        for segments in examples:
            ids: list[int] = []
            is_response: list[bool] = []
            for text, resp in segments:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                is_response += [resp] * len(piece)
            out.append((ids, is_response))
        return out
    texts, bounds = [], []
    for segments in examples:
        starts, flags, pos = [], [], 0
        for text, resp in segments:
            starts.append(pos)
            flags.append(resp)
            pos += len(text)
        texts.append("".join(text for text, _ in segments))
        bounds.append((starts, flags))
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, (starts, flags) in zip(enc["input_ids"], enc["offset_mapping"], bounds, strict=True):
        is_response = [flags[bisect.bisect_right(starts, start) - 1] if starts else False for start, _ in offsets]
        out.append((list(ids), is_response))
    return out


def tokenize_records(records: list[dict], fmt: str, tokenizer: Any, seq_len: int,
                     train_on_prompt: bool = False, chunk: int = 1024) -> list[dict[str, list[int]]]:
    """``{"input_ids", "labels"}`` for each valid record, truncated to ``seq_len`` tokens.

    Starts with bos when the tokenizer adds one (once, even if a chat template already wrote it);
    labels are the input id on response tokens and -100 on prompt tokens unless ``train_on_prompt``.
    """
    prefix = prefix_ids(tokenizer)
    out = []
    for i in range(0, len(records), chunk):
        rendered = [to_segments(r, fmt, tokenizer) for r in records[i:i + chunk]]
        for ids, is_response in _encode(rendered, tokenizer):
            if prefix and ids[:len(prefix)] != prefix:
                ids = prefix + ids
                is_response = [False] * len(prefix) + is_response
            labels = [t if (r or train_on_prompt) else IGNORE_INDEX for t, r in zip(ids, is_response, strict=True)]
            out.append({"input_ids": ids[:seq_len], "labels": labels[:seq_len]})
    return out


def tokenize_record(record: dict, fmt: str, tokenizer: Any, seq_len: int,
                    train_on_prompt: bool = False) -> dict[str, list[int]]:
    """One record's ``{"input_ids", "labels"}``, as ``tokenize_records``."""
    return tokenize_records([record], fmt, tokenizer, seq_len, train_on_prompt)[0]


def pack(examples: list[dict[str, list[int]]], seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate examples and cut the stream into ``seq_len`` blocks (the last may be shorter).

    Labels keep their masks. Attention is not blocked between examples that share a block: a
    token may attend to the end of the previous example. That costs little when examples begin with
    bos/eos separators and buys no padding at all.
    """
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [{"input_ids": ids[i:i + seq_len], "labels": labels[i:i + seq_len]}
            for i in range(0, len(ids), seq_len)]


# --- files -> datasets, with a cache --------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over everything that decides how text becomes ids: vocab, merges, normalizer,
    special tokens, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # transformers sets truncation/padding on the backend per call: state, not identity
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [tokenizer.chat_template, eos_text(tokenizer), prefix_ids(tokenizer),
             sorted(str(t) for t in tokenizer.all_special_tokens)]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def _cache_key(cfg: DataConfig, tokenizer: Any, seed: int) -> str:
    h = hashlib.sha256(f"lorakit-data-cache-v{CACHE_VERSION}".encode())
    for path in (cfg.train, cfg.val):
        h.update(b"\0file\0")
        if path:
            h.update(Path(path).read_bytes())
    fields = {"format": cfg.format, "seq_len": cfg.seq_len, "train_on_prompt": cfg.train_on_prompt,
              "packing": cfg.packing, "val": bool(cfg.val), "val_fraction": cfg.val_fraction, "seed": seed}
    h.update(json.dumps(fields, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()


def _to_tensors(split: str, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Ragged examples as flat int32 arrays plus offsets: (N+1,) offsets, (sum of lengths,) ids and labels."""
    offsets = [0]
    for ex in examples:
        offsets.append(offsets[-1] + len(ex["input_ids"]))
    return {
        f"{split}.offsets": torch.tensor(offsets, dtype=torch.int64),
        f"{split}.input_ids": torch.tensor([t for ex in examples for t in ex["input_ids"]], dtype=torch.int32),
        f"{split}.labels": torch.tensor([t for ex in examples for t in ex["labels"]], dtype=torch.int32),
    }


def _from_tensors(split: str, tensors: dict[str, torch.Tensor]) -> list[dict[str, list[int]]]:
    offsets = tensors[f"{split}.offsets"].tolist()
    ids = tensors[f"{split}.input_ids"].tolist()
    labels = tensors[f"{split}.labels"].tolist()
    return [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in pairwise(offsets)]


def cache_path(cfg: DataConfig, tokenizer: Any, cache_dir: str | Path, seed: int = 0) -> Path:
    """Where ``load_datasets`` keeps (or finds) the tokenized data for these inputs."""
    return Path(cache_dir) / f"data-{_cache_key(cfg, tokenizer, seed)}.safetensors"


def _write_cache(path: Path, train: list[dict], val: list[dict]) -> None:
    """Atomic: a crash mid-write leaves no half-file that a later run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({**_to_tensors("train", train), **_to_tensors("val", val)}, tmp,
                  metadata={"lorakit_cache": CACHE_VERSION})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def valid_records(path: str | Path, fmt: str, limit: int | None = None) -> tuple[list[dict], str]:
    """(the first ``limit`` records of a JSON/JSONL file, their format): the format detected when ``auto``,
    every returned record checked, the first bad one raised as ``file:line: problem``."""
    records = read_records(path)[:limit]
    if not records:
        raise LorakitError(f"{path}: no records (expected a JSON array or JSONL of objects)")
    if fmt == "auto":
        try:
            fmt = detect_file_format(records)
        except LorakitError as e:
            raise LorakitError(f"{path}: {e}") from None
    elif fmt not in FORMATS:
        raise LorakitError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    for line, record in records:
        problems = validate_record(record, fmt)
        if problems:
            raise LorakitError(f"{path}:{line}: {problems[0]} (lorakit data check {path} lists every bad record)")
    return [r for _, r in records], fmt


def _tokenize_all(records: list[dict], fmt: str, tokenizer: Any, cfg: DataConfig, where: str) -> list[dict]:
    try:
        examples = tokenize_records(records, fmt, tokenizer, cfg.seq_len, cfg.train_on_prompt)
    except LorakitError as e:
        raise LorakitError(f"{where}: {e} (lorakit data check {where} lists the records)") from None
    kept = [ex for ex in examples if any(t != IGNORE_INDEX for t in ex["labels"])]
    if len(kept) < len(examples):
        # the prompt alone fills seq_len: nothing of the answer is left to learn from
        log.warning("%s: dropped %d examples with no response token within --seq-len %d",
                    where, len(examples) - len(kept), cfg.seq_len)
    return pack(kept, cfg.seq_len) if cfg.packing else kept


def split_records(cfg: DataConfig, seed: int = 0) -> tuple[list[dict], list[dict], str]:
    """(training records, validation records, their format), checked, before tokenization: validation is
    ``cfg.val``, else a ``seed``-shuffled ``cfg.val_fraction`` of the training file, else empty."""
    train_records, fmt = valid_records(cfg.train, cfg.format)
    if cfg.val:
        val_records, _ = valid_records(cfg.val, fmt)
    elif cfg.val_fraction > 0:
        order = list(range(len(train_records)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(cfg.val_fraction * len(order)))
        if n_val >= len(order):
            raise LorakitError(f"--val-fraction {cfg.val_fraction} leaves no training data "
                               f"out of {len(order)} records")
        held = set(order[:n_val])
        val_records = [r for i, r in enumerate(train_records) if i in held]
        train_records = [r for i, r in enumerate(train_records) if i not in held]
    else:
        val_records = []
    return train_records, val_records, fmt


def load_datasets(cfg: DataConfig, tokenizer: Any, cache_dir: Path | None = None,
                  seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and validation examples (``{"input_ids", "labels"}`` lists) from ``cfg``.

    Validation comes from ``cfg.val``, else a ``seed``-shuffled ``cfg.val_fraction`` of the
    training file, else is empty. With ``cache_dir``, tokenized data is stored there as safetensors
    keyed by a sha256 of the files' bytes, the tokenizer and the fields that shape the result.
    """
    if not cfg.train:
        raise LorakitError("--data is required: a JSON array or JSONL file of training records")
    for flag, path in (("--data", cfg.train), ("--val-data", cfg.val)):
        if path and not Path(path).is_file():
            raise LorakitError(f"{flag} {path}: no such file")
    cached = cache_path(cfg, tokenizer, cache_dir, seed) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        tensors = load_file(str(cached))
        return _from_tensors("train", tensors), _from_tensors("val", tensors)

    train_records, val_records, fmt = split_records(cfg, seed)
    train = _tokenize_all(train_records, fmt, tokenizer, cfg, cfg.train)
    if not train:
        raise LorakitError(f"{cfg.train}: no example has a response token within --seq-len {cfg.seq_len}")
    val = _tokenize_all(val_records, fmt, tokenizer, cfg, cfg.val or cfg.train)
    if cached is not None:
        _write_cache(cached, train, val)
    return train, val


# --- batches --------------------------------------------------------------------------------------


def length_grouped_batches(examples: list[dict], batch_size: int, seed: int, epoch: int,
                           mega_batch_mult: int = 50, group_by_length: bool = True) -> list[list[int]]:
    """Example indices in batches of similar length, in a deterministic order per (seed, epoch).

    Shuffle, sort by length within mega-batches of ``mega_batch_mult * batch_size``, cut into
    batches, shuffle the batch order: little padding, yet each epoch sees a fresh order. With
    ``group_by_length`` False the shuffled order is cut as it is (random batches, more padding), for
    data where length predicts the answer. Either way the batch with the longest example goes first,
    so an out-of-memory error shows at step 1, not hours in.
    """
    if batch_size < 1:
        raise LorakitError(f"--batch-size must be at least 1, got {batch_size}")
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    lengths = [len(ex["input_ids"]) for ex in examples]
    if group_by_length:
        mega = mega_batch_mult * batch_size
        batches = []
        for i in range(0, len(order), mega):
            chunk = sorted(order[i:i + mega], key=lambda j: -lengths[j])
            batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
    else:
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[j] for j in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def collate(examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1,
            max_width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each (B, T), T = longest example, rounded up to
    a multiple of ``pad_to_multiple_of`` (never past ``max_width``): few distinct shapes for kernels that
    compile and cache one per shape (oneDNN's bf16 matmuls on CPU).

    Padded positions have attention_mask 0 and label -100.
    """
    longest = max(len(ex["input_ids"]) for ex in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    width = max(longest, min(width, max_width)) if max_width else width
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
