"""``lorakit check-adapter DIR --for vllm``: whether vLLM will load a PEFT adapter, by vLLM's own rules, and
the ``vllm serve`` flags it needs. Scale-out runs on vLLM: a GPU fleet serves lorakit's adapters unchanged.

The rules, from vLLM's source (vllm/config/lora.py, vllm/lora/peft_helper.py, the model classes):
- ``--max-lora-rank`` takes one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (``MaxLoRARanks``) and an adapter's
  rank must not exceed it (``PEFTHelper.validate_legal``);
- no DoRA (``use_dora``), no ``modules_to_save`` (``_validate_features``); no bias terms;
- ``rank_pattern`` / ``alpha_pattern`` are not read (``PEFTHelper.from_dict`` keeps only its own fields), so
  every module would get lora_alpha / r: an adapter that needs them would be served wrong, silently;
- LoRA weights only on modules the model class supports: the decoder's projections (vLLM packs q/k/v and
  gate/up into qkv_proj and gate_up_proj and splits the adapter to match); ``embed_tokens`` / ``lm_head``
  only for model classes that list them in ``embedding_modules`` (Llama and Mistral do; Qwen2/3 and Gemma
  do not).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lorakit.errors import LorakitError
from lorakit.lora.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                         "gate_up_proj"})
EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})
WITH_EMBEDDINGS = frozenset({"llama", "mistral", "granite"})  # model types whose vLLM class has embedding_modules
_KEY = re.compile(r"^(?P<path>.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def vllm_problems(folder: str | Path, model_type: str | None) -> tuple[list[str], int, list[str]]:
    """(problems, largest rank, targeted module names) of the adapter in ``folder`` for vLLM."""
    folder = Path(folder)
    cfg_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    try:
        config = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise LorakitError(f"{cfg_file}: missing (a PEFT adapter folder holds {CONFIG_NAME})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorakitError(f"{cfg_file}: unreadable adapter config ({e})") from None
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}: vLLM serves LoRA adapters only")
    if config.get("use_dora"):
        problems.append("use_dora: true — vLLM does not support DoRA; merge the adapter (lorakit merge) instead")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} — vLLM only supports modules_to_save being "
                        "None; merge the adapter (lorakit merge) instead")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"bias {config.get('bias')!r} / lora_bias — vLLM serves LoRA weights without bias terms")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} {config[key]} — vLLM ignores it and scales every module by lora_alpha/r, "
                            "so this adapter would be served wrong; retrain with one r and alpha")
    if not weights.is_file():
        raise LorakitError(f"{weights}: missing")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LorakitError(f"{weights}: not a readable safetensors file ({e})") from None
    allowed = PROJECTIONS | (EMBEDDINGS if model_type in WITH_EMBEDDINGS else frozenset())
    ranks, modules, refused = [], set(), set()
    for key, shape in shapes.items():
        m = _KEY.match(key.removeprefix(PREFIX))
        if m is None:
            problems.append(f"{key}: not a LoRA weight — vLLM reports it as 'unsupported LoRA weight'")
            continue
        leaf = m["path"].rsplit(".", 1)[-1]
        (modules if leaf in allowed else refused).add(leaf)
        if key.endswith(("lora_A.weight", "lora_embedding_A")):
            ranks.append(shape[0])
    if refused:
        where = f"{model_type} models" if model_type else "this model (architecture unknown: assumed Llama-like)"
        problems.append(f"targets {', '.join(sorted(refused))} — vLLM applies LoRA to {', '.join(sorted(allowed))} "
                        f"for {where}")
    rank = max(ranks, default=0)
    if rank > MAX_LORA_RANKS[-1]:
        problems.append(f"rank {rank} — above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]})")
    return problems, rank, sorted(modules | refused)


def _base_model_type(base: str | None) -> str | None:
    config = Path(base).expanduser() / "config.json" if base else None
    if config is not None and config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError):
            return None
    return None


def check_adapter_command(adapter: str, model: str | None, name: str | None) -> int:
    """Print whether vLLM takes the adapter and the ``vllm serve`` command; 0 if it does, 1 if not."""
    folder = Path(adapter)
    if not folder.is_dir():
        raise LorakitError(f"{adapter}: adapter folder not found")
    try:
        declared = json.loads((folder / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        declared = None
    base = model or declared
    problems, rank, modules = vllm_problems(folder, _base_model_type(base))
    if problems:
        print(f"{adapter}: vLLM will refuse or mis-serve this adapter:")
        for p in problems:
            print(f"  - {p}")
        return 1
    max_rank = next(r for r in MAX_LORA_RANKS if r >= rank)
    name = name or folder.resolve().name
    command = ["vllm", "serve", base or "BASE_MODEL", "--enable-lora", "--lora-modules",
               f"{name}={folder.resolve()}", "--max-lora-rank", str(max_rank)]
    print(f"{adapter}: vLLM will load this adapter (rank {rank}; targets {', '.join(modules)})")
    print("  " + shlex.join(command))
    print(f"  then request it as model {name!r}; add --max-loras N to batch N adapters at once")
    return 0
