"""Which modules get an adapter: PEFT's matching rules, with errors that say what exists.

- a list of names: a module matches when its path equals a name or ends with ``"." + name``;
- a single string: a regex that must match the whole module path (``re.fullmatch``), except that a bare
  name such as ``"q_proj"`` means that one name (PEFT would only match a top-level module);
- ``"all-linear"``: every linear layer (``nn.Linear``, GPT-2's ``Conv1D``, quantized linears)
  except the output head (the module whose weight the model reports as its output embeddings);
- ``"auto"`` (the default): ``"all-linear"``, except on a diffusers model (a UNet or a diffusion
  transformer), where it is the attention projections ``DIFFUSION_TARGETS``, as diffusers' LoRA scripts.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LorakitError

ALL_LINEAR = "all-linear"
AUTO = "auto"
DIFFUSION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def is_linear(module: nn.Module) -> bool:
    """True for the layer types LoRA treats as a linear map (bitsandbytes' quantized linears too)."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; this catches any other wrapper that
    # exposes the same shape attributes without importing bitsandbytes here.
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) pairs with LoRA layers shown as the modules they wrap, their adapters hidden."""
    from lorakit.lora.layer import LoraLayer

    out = []
    for path, m in model.named_modules():
        if ".adapters" in path:
            continue
        out.append((path, m.base_layer if isinstance(m, LoraLayer) else m))
    return out


def supported(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv2d))


def _name_matches(path: str, names: Iterable[str] | str) -> bool:
    if isinstance(names, str) and re.fullmatch(r"[\w.]+", names):
        names = [names]  # a bare module name ("q_proj") means that name, not a whole-path regex
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head (lm_head and friends), left out of ``all-linear`` as PEFT does."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    out = getattr(out, "base_layer", out)
    for path, m in base_modules(model):
        if out is not None and m is out:
            heads.add(path)
        elif path.split(".")[-1] in ("lm_head", "score", "classifier", "cls", "qa_outputs"):
            heads.add(path)
    return heads


def select_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None = None,
) -> list[str]:
    """Module paths that get an adapter, in model order. Raises LorakitError when nothing matches,
    naming the close matches and the module names that exist."""
    exclude_modules = exclude_modules or []
    if target_modules == AUTO:
        target_modules = DIFFUSION_TARGETS if type(model).__module__.startswith("diffusers.") else ALL_LINEAR
    candidates = [(p, m) for p, m in base_modules(model) if p and supported(m)]
    if target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        chosen = [p for p, m in candidates if is_linear(m) and p not in heads]
    else:
        chosen = [p for p, _ in candidates if _name_matches(p, target_modules)]
    chosen = [p for p in chosen if not _name_matches(p, exclude_modules)]
    if not chosen:
        raise LorakitError(no_match_message(model, target_modules, exclude_modules))
    return chosen


def no_match_message(model: nn.Module, target_modules: list[str] | str, exclude: list[str] | str) -> str:
    leaf_names = sorted({p.split(".")[-1] for p, m in base_modules(model) if p and supported(m)})
    asked = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    close = sorted({c for t in asked for c in difflib.get_close_matches(t, leaf_names, n=3, cutoff=0.5)})
    msg = f"--target {','.join(asked)} matches no module of this model"
    if exclude:
        msg += " (after --exclude)"
    if close:
        msg += f"; did you mean {', '.join(close)}?"
    return msg + f"; available: {', '.join(leaf_names) or '(no linear, embedding or conv2d layers)'}"
