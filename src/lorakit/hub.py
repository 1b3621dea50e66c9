"""``--model NAME``: a local path or a Hugging Face hub id, told apart without asking the hub.

A name that can only be meant as a local path (it starts with ``.``, ``/`` or ``~``, has more than one
``/``, or its parent folder exists here, like ``examples/`` in ``examples/base-modle``), or any name while
the hub is offline (``HF_HUB_OFFLINE``) and not in the hub cache, fails at once when it names nothing, with
its close matches, instead of being sent to the hub to be retried for a minute.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """What huggingface_hub and transformers read: nothing is downloaded when either variable is set."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def meant_as_local(name: str) -> bool:
    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and Path(name).parent.is_dir()


def in_hub_cache(name: str) -> bool:
    """True when the hub model ``name`` has a config.json in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, or no huggingface_hub: not in the cache either way
        return False


def close_matches(name: str) -> list[str]:
    """``name`` with its first missing path component replaced by the closest existing entries (folders,
    and ``.gguf`` files for the last component)."""
    parts = Path(name).expanduser().parts
    missing = next((i for i in range(len(parts)) if not Path(*parts[:i + 1]).exists()), None)
    if missing is None:
        return []
    here = Path(*parts[:missing]) if missing else Path(".")
    last = missing == len(parts) - 1
    try:
        entries = [p.name for p in here.iterdir() if p.is_dir() or (last and p.suffix == ".gguf")]
    except OSError:
        return []
    dot = "./" if name.startswith("./") else ""  # Path drops it
    return [dot + str(Path(*parts[:missing], match, *parts[missing + 1:]))
            for match in difflib.get_close_matches(parts[missing], entries, n=3)]


def missing_model_message(name: str, flag: str = "--model") -> str | None:
    """The one-line error for a model name that names nothing usable without the hub, else None (it
    exists here, or it may be a hub id)."""
    if name and Path(name).expanduser().exists():
        return None
    matches = close_matches(name) if name else []
    hint = f"; did you mean {' or '.join(matches)}?" if matches else "; give a model folder, a .gguf file or a hub id"
    shown = name or "''"
    if meant_as_local(name):
        return f"{flag} {shown}: no such folder or file{hint}"
    if hub_offline() and not in_hub_cache(name):
        return (f"{flag} {shown}: no such local folder, and not a hub model in the Hugging Face cache "
                f"(HF_HUB_OFFLINE is set, so nothing is downloaded){hint}")
    return None
