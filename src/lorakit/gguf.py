"""GGUF files (llama.cpp, Ollama, LM Studio) as base models: found, checked, converted once, recorded.

transformers reads a GGUF file itself (``from_pretrained(folder, gguf_file=name)``): it dequantizes every
tensor, undoes llama.cpp's layout changes (the q/k RoPE row permutation) and rebuilds the tokenizer with
its chat template from the file's metadata. That takes ~20 s for a 135M-parameter file and must then be
held whole in memory, so lorakit does it once per file and keeps the result as an ordinary model folder:

    $LORAKIT_CACHE/gguf/<sha256 of the file>/
        config.json, generation_config.json, tokenizer.json, tokenizer_config.json, ...   (stage 1: cheap)
        model.safetensors (or shards + index), fp32: exactly what transformers dequantized   (stage 2)
        source.json   {"sha256", "file_name", "size", ...}: written last, the folder is complete

Every later load reads that folder like any Hugging Face checkpoint (memory-mapped, ~1 s), and QLoRA
streams it tensor by tensor into NF4 (``lorakit.quant.load``) without the 16-bit model ever being whole.
A file is keyed by its content, so a renamed or copied file reuses its conversion; its hash is kept per
(path, size, mtime) so a large file is hashed once. Conversions of the same file by concurrent processes
(the quickstart trains two at once) wait on one lock and convert once.

An adapter trained on a GGUF base records that file (``BASE_RECORD``) so export can pair it with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.device import cache_root
from lorakit.errors import LorakitError
from lorakit.fileio import sha256_file, write_atomic

MAGIC = b"GGUF"
SUFFIX = ".gguf"
BASE_RECORD = "lorakit_base.json"  # {"format": "gguf", "path", "file_name", "sha256", "size"} beside an adapter
CONVERSION = 1  # bump when the cached folder's layout or content changes: older conversions are redone
_TOKENIZER_DONE = "tokenizer.done"
_SOURCE = "source.json"


# --- finding and checking the file -------------------------------------------------------------------


def find_gguf(name_or_path: str | os.PathLike, flag: str = "--model") -> Path | None:
    """The GGUF file ``name_or_path`` names, as an absolute path: the file itself (any file ending in .gguf
    or starting with the GGUF magic bytes), or the one ``*.gguf`` in a folder that has no config.json.
    None when it names no GGUF (a model folder, a hub id, nothing). A folder with several .gguf files is
    an error naming them: which one is the model is the user's choice."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p.resolve() if p.suffix.lower() == SUFFIX or _starts_with_magic(p) else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(f for f in p.iterdir() if f.suffix.lower() == SUFFIX and f.is_file())
    if len(found) > 1:
        raise LorakitError(f"{flag} {name_or_path}: the folder holds {len(found)} GGUF files "
                           f"({', '.join(f.name for f in found[:4])}{' ...' if len(found) > 4 else ''}); "
                           "pass the one to use as the path of the file")
    return found[0].resolve() if found else None


def _starts_with_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def check_gguf(path: Path, flag: str = "--model") -> None:
    """A LorakitError unless ``path`` is a whole GGUF file: the magic bytes, a readable header and tensor
    table, and every tensor's bytes inside the file (an interrupted download is the usual culprit).
    Reads the header only (milliseconds); without transformers' header reader (transformers < 5) only the
    magic bytes are checked here and damage shows when the file is converted."""
    if not _starts_with_magic(path):
        raise LorakitError(f"{flag} {path}: not a GGUF file (it does not start with the GGUF magic bytes); "
                           "give a .gguf model file from llama.cpp, Ollama or LM Studio, or a model folder")
    try:
        from transformers.integrations.gguf.reader import GgufHeader
    except ImportError:
        return
    try:
        header = GgufHeader.from_file(str(path))
    except Exception as e:  # struct and numpy errors: the header itself is cut short or corrupt
        raise LorakitError(f"{flag} {path}: a damaged or truncated GGUF file: its header cannot be read "
                           f"({_first_line(e)}); download it again") from None
    needed = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
    size = path.stat().st_size
    if size < needed:
        raise LorakitError(f"{flag} {path}: a truncated GGUF file: its tensors need {needed:,} bytes but the file "
                           f"has {size:,} (an interrupted download?); download it again")


def file_sha256(path: Path) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) under the cache: a large file is hashed once."""
    st = path.stat()
    memo = cache_root() / "gguf" / "hashes" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    key = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with contextlib.suppress(OSError, ValueError):
        seen = json.loads(memo.read_text())
        if {k: seen.get(k) for k in key} == key and isinstance(seen.get("sha256"), str):
            return seen["sha256"]
    sha = sha256_file(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run a rehash
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, lambda p: p.write_text(json.dumps({**key, "sha256": sha})))
    return sha


def base_record(path: str | os.PathLike) -> dict[str, Any]:
    """What an adapter trained on GGUF file ``path`` records about its base (``BASE_RECORD``)."""
    file = Path(path).resolve()
    return {"format": "gguf", "path": str(file), "file_name": file.name, "sha256": file_sha256(file),
            "size": file.stat().st_size}


# --- the converted folder ----------------------------------------------------------------------------


def converted_folder(path: str | os.PathLike, weights: bool = True, flag: str = "--model") -> Path:
    """The model folder converted from GGUF file ``path`` (absolute), converting it now if needed: the
    config and tokenizer only (``weights=False``: seconds), or the weights too (fp32 safetensors)."""
    file = Path(path).resolve()
    if not _starts_with_magic(file):
        check_gguf(file, flag)
    sha = file_sha256(file)
    folder = cache_root() / "gguf" / f"{sha}-v{CONVERSION}"
    if _complete(folder, weights):
        return folder
    check_gguf(file, flag)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_name(folder.name + ".lock")):
        if not _complete(folder, weights):  # another process may have converted it while we waited
            folder.mkdir(exist_ok=True)
            if not (folder / _TOKENIZER_DONE).is_file():
                _publish(folder, lambda tmp: _convert_config_and_tokenizer(file, tmp, flag), _TOKENIZER_DONE)
            if weights:
                _publish(folder, lambda tmp: _convert_weights(file, folder, tmp, flag), None)
                source = {"sha256": sha, "file_name": file.name, "size": file.stat().st_size,
                          "converted_from": str(file), "conversion": CONVERSION, "dtype": "float32"}
                write_atomic(folder / _SOURCE, lambda p: p.write_text(json.dumps(source, indent=2) + "\n"))
    return folder


def _complete(folder: Path, weights: bool) -> bool:
    return (folder / (_SOURCE if weights else _TOKENIZER_DONE)).is_file()


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _publish(folder: Path, write: Any, marker: str | None) -> None:
    """``write(tmp)`` into a fresh folder beside ``folder``, then move its files in one by one, then the
    ``marker``: a reader trusts the folder only once the marker (or source.json) is there."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        write(tmp)
        for item in sorted(tmp.iterdir()):
            os.replace(item, folder / item.name)
        if marker:
            (folder / marker).write_text("")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _readable(file: Path, flag: str, what: str, load: Any) -> Any:
    """``load()``, with whatever a damaged file makes transformers or gguf raise turned into one line."""
    try:
        return load()
    except ImportError as e:
        raise LorakitError(f"{flag} {file}: reading GGUF files needs the gguf and accelerate packages "
                           f"({_first_line(e)}); pip install gguf accelerate") from None
    except Exception as e:  # a truncated file fails deep inside numpy (reshape, index) with no file name
        raise LorakitError(f"{flag} {file}: cannot read its {what}: a truncated or damaged GGUF file, or an "
                           f"architecture transformers cannot load from GGUF ({_first_line(e)}); download "
                           "it again, or convert it to a Hugging Face folder") from None


def _convert_config_and_tokenizer(file: Path, out: Path, flag: str) -> None:
    """Stage 1: config.json (from the file's metadata), generation_config.json and the tokenizer with its
    chat template, as an ordinary folder's files."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    print(f"lorakit: reading {file.name}'s config and tokenizer (once; kept in {out.parent})", file=sys.stderr,
          flush=True)
    config = _readable(file, flag, "config", lambda: AutoConfig.from_pretrained(file.parent, gguf_file=file.name))
    tokenizer = _readable(file, flag, "tokenizer", lambda: AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name))
    _plain_config(config)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _convert_weights(file: Path, folder: Path, out: Path, flag: str) -> None:
    """Stage 2: every tensor dequantized to fp32 by transformers, saved as safetensors into ``out``. The
    config is stage 1's (in ``folder``): passing it spares transformers a parse of the file's metadata."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    print(f"lorakit: dequantizing {file.name} to a safetensors folder (once; ~10 s per 100M parameters on "
          "2 cores)", file=sys.stderr, flush=True)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "config": AutoConfig.from_pretrained(folder)}
    with contextlib.suppress(ImportError):  # transformers >= 5: never keep GGUF blocks (needs `kernels`)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=file.name, dequantize=True)
    with _tensor_name_maps_cached():
        model = _readable(file, flag, "weights", lambda: AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, **kwargs))
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise LorakitError(f"{flag} {file}: transformers kept {packed[0]} quantized; lorakit needs it dequantized "
                           "(update transformers, or convert the file to a Hugging Face folder)")
    _plain_config(model.config)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("config.json", "generation_config.json"):  # stage 1's are the ones kept
        (out / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _tensor_name_maps_cached() -> Iterator[None]:
    """transformers maps GGUF tensor names by calling ``gguf.get_tensor_name_map(arch, n_layers)`` once per
    module of the model (397 times for SmolLM2-135M: a third of the conversion's time). The map is a pure
    function of its arguments, so while converting, each is built once."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _plain_config(config: Any) -> None:
    """The config of an ordinary fp32 checkpoint: without the GGUF quantization entry (the cached weights
    are dequantized) and without the file's display name as its path."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    config._name_or_path = ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --- what an adapter records ---------------------------------------------------------------------------


def write_base_record(folder: str | os.PathLike, base: str | os.PathLike) -> None:
    """``folder/lorakit_base.json`` for an adapter whose base is GGUF file ``base``."""
    record = base_record(base)
    write_atomic(Path(folder) / BASE_RECORD, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))


def recorded_base(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The GGUF base an adapter folder records (``{"format": "gguf", "path", "file_name", "sha256",
    "size"}``), or None when it records none (its base is a model folder or a hub id)."""
    file = Path(adapter_dir) / BASE_RECORD
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorakitError(f"{file}: unreadable ({e}); delete it or train the adapter again") from None
    keys = ("format", "path", "file_name", "sha256", "size")
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise LorakitError(f"{file}: expected the keys {', '.join(keys)}")
    return record
