"""The adapters a server knows by name: loaded into the base model (at most ``max_adapters`` at once, least
recently used unloaded first and reloaded on demand), or known by path only.

An adapter is untrusted input. Loading one at runtime (``POST /v1/adapters``) takes a path inside
``--adapter-dir`` only: no ``..``, no absolute path elsewhere, no symlink whose target leaves the folder;
safetensors only (``lorakit.lora.read_adapter`` refuses a pickled ``adapter_model.bin``); every tensor's
module, shape and rank checked against the base (``lorakit.lora.load_adapter``), plus what the batched path
cannot serve (bias terms, ``modules_to_save``, non-finite weights) refused before the adapter goes live.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora import load_adapter, lora_layers
from lorakit.lora.io import CONFIG_NAME, WEIGHTS_NAME
from lorakit.lora.layer import LoraEmbedding, LoraLinear
from lorakit.serve.batched_lora import BatchedLora

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class AdapterError(LorakitError):
    """An adapter request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class AdapterInfo:
    name: str
    path: str
    rank: int
    loaded: bool


def confine(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute inside it) as a real path inside ``root``; AdapterError
    when it climbs out with ``..``, names an absolute path elsewhere, or reaches outside through a symlink."""
    if not path or "\x00" in path:
        raise AdapterError("path must be a non-empty folder name inside --adapter-dir", param="path")
    given = Path(path)
    if ".." in given.parts:
        raise AdapterError(f"path {path!r}: '..' is not allowed; give a folder inside --adapter-dir", param="path")
    real_root = root.resolve()
    candidate = given if given.is_absolute() else root / given
    if given.is_absolute() and not (given.is_relative_to(root.absolute()) or given.is_relative_to(real_root)):
        raise AdapterError(f"path {path!r}: absolute paths outside --adapter-dir are not allowed", param="path")
    try:
        real = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):  # RuntimeError: a symlink loop
        raise AdapterError(f"path {path!r}: no such adapter folder in --adapter-dir", param="path") from None
    if not real.is_relative_to(real_root) or not real.is_dir():
        raise AdapterError(f"path {path!r}: resolves outside --adapter-dir (a symlink?) or is not a folder",
                           param="path")
    for name in (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin"):
        f = real / name
        if f.is_symlink() and not f.resolve().is_relative_to(real_root):
            raise AdapterError(f"path {path!r}: {name} is a symlink to a file outside --adapter-dir", param="path")
    return real


class AdapterRegistry:
    """Adapters by name -> path, with the loaded ones in ``model`` (LRU order) and per-adapter use counts.

    Every change to the model happens under ``lock``, which the scheduler holds while it runs a forward:
    loading and unloading happen between decode steps, never during one."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, max_adapters: int, adapter_dir: str | None = None,
                 reserved: tuple[str, ...] = ()):
        self.model, self.dtype, self.max_adapters = model, dtype, max_adapters
        self.adapter_dir = Path(adapter_dir).expanduser() if adapter_dir else None
        self.reserved = set(reserved)  # names an adapter may not take (the base model's id)
        self.lock = threading.RLock()
        self.batched = BatchedLora(model)
        self.paths: dict[str, Path] = {}
        self.ranks: dict[str, int] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.in_use: Counter[str] = Counter()
        self.retiring: set[str] = set()  # deleted while requests still use them: unloaded when they finish

    # --- what the API calls ---------------------------------------------------------------------------

    def add(self, name: str, path: str, trusted: bool = False) -> AdapterInfo:
        """Register adapter ``name`` from ``path`` and load it (checked against the base). ``trusted``: a
        path from the command line, not confined to --adapter-dir."""
        if not NAME_RE.match(name or ""):
            raise AdapterError(f"adapter name {name!r}: use 1-128 letters, digits and . _ - : / @ +, starting "
                               "with a letter or digit", param="name")
        if trusted:
            folder = Path(path).expanduser().resolve()
        elif self.adapter_dir is None:
            raise AdapterError("this server was started without --adapter-dir: adapters cannot be loaded at "
                               "runtime", status=403)
        else:
            folder = confine(self.adapter_dir, path)
        with self.lock:
            if name in self.reserved or name in self.paths or name in self.retiring:
                raise AdapterError(f"model {name!r} exists already; DELETE /v1/adapters/{name} first or pick "
                                   "another name", status=409, param="name")
            self._load(name, folder)
            self.paths[name] = folder
            self._evict_beyond(self.max_adapters)
            return self.info(name)

    def remove(self, name: str) -> None:
        """Forget ``name``; its weights leave memory now, or when the last request using it finishes."""
        with self.lock:
            if name not in self.paths:
                raise AdapterError(f"no adapter named {name!r}", status=404, param="name")
            del self.paths[name]
            if self.in_use[name]:
                self.retiring.add(name)
            else:
                self._unload(name)

    def info(self, name: str) -> AdapterInfo:
        return AdapterInfo(name, str(self.paths[name]), self.ranks.get(name, 0), name in self.loaded)

    def names(self) -> list[str]:
        return list(self.paths)

    # --- what the scheduler calls, under the lock -------------------------------------------------------

    def acquire(self, name: str) -> bool:
        """Pin ``name`` for one request, loading it if it was evicted. False when every loaded adapter is in
        use and none can make room (the request waits). AdapterError when the adapter is gone or broken."""
        with self.lock:
            if name not in self.paths:
                raise AdapterError(f"adapter {name!r} was unloaded", status=404)
            if name not in self.loaded:
                if not self._evict_beyond(self.max_adapters - 1):
                    return False
                self._load(name, self.paths[name])
            self.loaded.move_to_end(name)
            self.in_use[name] += 1
            return True

    def release(self, name: str) -> None:
        with self.lock:
            self.in_use[name] -= 1
            if self.in_use[name] <= 0:
                del self.in_use[name]
                if name in self.retiring:
                    self.retiring.discard(name)
                    self._unload(name)

    # --- internals --------------------------------------------------------------------------------------

    def _evict_beyond(self, keep: int) -> bool:
        """Unload idle adapters, least recently used first, until at most ``keep`` are loaded."""
        for name in list(self.loaded):
            if len(self.loaded) <= keep:
                break
            if not self.in_use[name]:
                self._unload(name)
        return len(self.loaded) <= keep

    def _load(self, name: str, folder: Path) -> None:
        try:
            load_adapter(self.model, folder, name)  # config, safetensors only, shapes vs the base: LorakitError
            self.ranks[name] = self._check_loaded(name, folder)
        except Exception:  # nothing of a refused adapter stays in the model
            self._unload(name)
            raise
        self.loaded[name] = None
        self.batched.attach()

    def _check_loaded(self, name: str, folder: Path) -> int:
        """What the batched path needs beyond the shapes: returns the largest rank."""
        config = json.loads((folder / CONFIG_NAME).read_text())  # read_adapter has validated it
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            raise AdapterError(f"{folder}: adapters with bias terms (bias={config.get('bias')!r}, lora_bias) "
                               "are not served; train with bias none")
        if config.get("modules_to_save"):
            raise AdapterError(f"{folder}: modules_to_save {config['modules_to_save']} replaces whole modules, "
                               "which cannot be batched per request; merge this adapter instead (lorakit merge)")
        ranks, declared = [], config.get("r")
        patterned = bool(config.get("rank_pattern"))
        for path, layer in lora_layers(self.model):
            if name not in layer.adapters:
                continue
            if not isinstance(layer, (LoraLinear, LoraEmbedding)):
                raise AdapterError(f"{folder}: targets {path} ({type(layer.base_layer).__name__}); only linear "
                                   "and embedding layers are served")
            ad = layer.adapters[name]
            if not patterned and declared is not None and ad.r != declared:
                raise AdapterError(f"{folder}: {path} has rank {ad.r} but adapter_config.json says r={declared} "
                                   "(and no rank_pattern)")
            ad.to(self.dtype).requires_grad_(False)
            if not (torch.isfinite(ad.lora_A).all() and torch.isfinite(ad.lora_B).all()):
                raise AdapterError(f"{folder}: {path} holds NaN or infinite weights")
            ranks.append(ad.r)
        for p in self.model.parameters():  # load_adapter marks every adapter trainable again: serving is not
            p.requires_grad_(False)
        return max(ranks)

    def _unload(self, name: str) -> None:
        for _, layer in lora_layers(self.model):
            if name in layer.adapters:
                del layer.adapters[name]
                if name in layer.active_adapters:
                    layer.active_adapters.remove(name)
        getattr(self.model, "lora_configs", {}).pop(name, None)
        self.loaded.pop(name, None)
        self.batched.forget()
