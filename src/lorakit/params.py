"""`lorakit params`: trainable/total parameters and training memory, from a model's config.json alone.

The model is built on the meta device (shapes, no storage), so a 175B config answers in seconds.
Memory is an accounting in bytes per component, per method; activations are an estimate (see
``activation_bytes``). Bytes per stored weight live in ``BYTES`` below.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LorakitError
from lorakit.gguf import converted_folder, find_gguf
from lorakit.lora.targets import is_linear, output_head_names, select_targets

# Bytes per weight for each storage. nf4 is QLoRA's NormalFloat4 with double quantization
# (Dettmers et al. 2023, §3): 4 bits per weight, plus one 8-bit absmax per block of 64 weights,
# plus one fp32 constant per 256 such absmaxes: 4 + 8/64 + 32/(64·256) = 4.127 bits ≈ 0.516 B.
# int8 is LLM.int8() (Dettmers et al. 2022): 1 byte per weight plus one fp32 scale per output row,
# added per layer in `base_bytes`. Only the linear layers are quantized; embeddings, norms, biases
# and the output head stay bf16, as QLoRA and lorakit.quant do (see `quantizes`).
NF4_BLOCK = 64
BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "nf4": (4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * 256)) / 8}
ADAMW_STATES = 2  # m and v, each fp32 (4 B) per trainable parameter

# Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
# Models", §4.1, eq. 1): a transformer layer without recomputation keeps 34·s·b·h + 5·a·s²·b bytes in
# 16-bit. The 5·a·s²·b term is the attention-score matrix; fused SDPA/flash kernels (transformers'
# default) never store it, so it is added only for eager attention. With gradient checkpointing only
# each layer's 2·s·b·h input is kept, plus one layer's activations recomputed in backward.
# Measured (bytes autograd saves) for lorakit's LoRA on a bf16 HF Llama: 34.5·s·b·h per layer with
# q_proj,v_proj, 42.7 with all-linear (every linear's input is kept then).
ACT_PER_LAYER = 34
ACT_SCORES = 5
# The loss on the logits (b·s·V), as lorakit's training loop computes it: the fp32 logits it holds (4 B)
# + the fp32 log-softmax kept for backward (4) + at the start of backward the fp32 gradients of the
# loss and of the log-softmax (4 + 4). Measured: the saved part is 4.0 B.
LOGITS_BYTES = 16
# The training process before any weight: Python, torch, transformers, tokenizers (measured: peak RSS of
# `lorakit train`'s imports on CPU, 382 MiB), and for QLoRA bitsandbytes too (386 MiB). Without it a
# measured peak RSS is 0.4 GiB above the estimate, a third of a 1B-parameter QLoRA run. On a GPU the
# CUDA context is of the same order.
RUNTIME_BYTES = {"full": 382 * 2**20, "lora": 382 * 2**20, "qlora": 386 * 2**20}

ASSUMPTIONS = [
    "full FT: fp32 weights + fp32 gradients + AdamW m, v = 16 B/param (as bf16 weights/grads + fp32 master copy)",
    "LoRA: base in bf16, 2 B/param; adapters: fp32 weights, gradients and AdamW m, v = 16 B/param",
    "QLoRA: nn.Linear but the output head in nf4 (0.516 B/param) or int8 (1 B + fp32 per row); the rest bf16",
    "activations: 34·s·b·h B per layer, 16-bit (Korthikanti et al. 2022 eq. 1; +5·a·s²·b with eager attention)",
    "logits: 16 B per token per vocabulary entry at the loss (fp32 logits, log-softmax and their gradients)",
    "runtime: the process itself (Python, torch, transformers; + bitsandbytes for QLoRA), measured on CPU",
]


@dataclass(frozen=True)
class ParamsReport:
    """Parameter counts and the training-memory breakdown (bytes per component, per method)."""

    model: str
    architecture: str
    total: int  # base model parameters, tied weights once
    trainable: int  # LoRA parameters: r·(in + out) per adapted module
    targets: int  # adapted modules
    r: int
    target_modules: list[str] | str
    quantization: str  # storage of the QLoRA base: nf4 or int8
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    memory: dict[str, dict[str, int]]  # method (full, lora, qlora) -> component -> bytes

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    @property
    def reduction(self) -> float:
        """How many times fewer parameters LoRA trains than full fine-tuning."""
        return self.total / self.trainable

    def to_json(self) -> dict:
        return {**asdict(self), "percent": self.percent, "reduction": self.reduction, "assumptions": ASSUMPTIONS}


def load_model_config(name_or_path: str) -> PretrainedConfig:
    """A model folder with config.json, a config.json path, a GGUF file (its metadata), or a hub id -> its
    transformers config."""
    gguf = find_gguf(name_or_path)
    if gguf is not None:
        name_or_path = str(converted_folder(gguf, weights=False))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise LorakitError(f"--model {name_or_path}: the folder has no config.json; point --model at a model folder or its config.json")
    if path.is_file():
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise LorakitError(f"--model {path}: not a usable transformers config.json ({_first_line(e)})") from None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".json") or name_or_path.count("/") > 1:
        raise LorakitError(f"--model {name_or_path}: no such file or folder; give a model folder, its config.json, or a hub id")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise LorakitError(f"--model {name_or_path}: not a local folder or config.json, and not loadable as a hub id "
                           f"(offline or unknown: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def build_on_meta(cfg: PretrainedConfig) -> nn.Module:
    """The model with every parameter on the meta device: shapes only, no storage, no init cost.
    The class is the one config.json names (``architectures``), else a causal LM, else the bare model."""
    named = getattr(transformers, (cfg.architectures or [""])[0], None)
    with torch.device("meta"):
        if isinstance(named, type) and issubclass(named, PreTrainedModel):
            return named._from_config(cfg)
        try:
            return AutoModelForCausalLM.from_config(cfg)
        except ValueError:  # no causal-LM class for this model type (T5, ViT...): the bare model
            return AutoModel.from_config(cfg)


def lora_params(module: nn.Module, r: int) -> int:
    """Parameters of one adapter: A (r × in) and B (out × r), as PEFT shapes them."""
    if isinstance(module, Conv1D):  # GPT-2's transposed linear: weight is (in, out)
        fan_in, fan_out = module.weight.shape
    elif is_linear(module):
        fan_in, fan_out = module.in_features, module.out_features
    elif isinstance(module, nn.Embedding):
        fan_in, fan_out = module.num_embeddings, module.embedding_dim
    elif isinstance(module, nn.Conv2d):  # A: in_ch → r with the base kernel; B: 1×1, r → out_ch
        kh, kw = module.kernel_size
        fan_in, fan_out = module.in_channels * kh * kw, module.out_channels
    else:
        raise TypeError(f"LoRA does not adapt {type(module).__name__}")
    return r * (fan_in + fan_out)


def quantizes(path: str, module: nn.Module, storage: str, heads: set[str]) -> bool:
    """Whether lorakit's QLoRA loader (lorakit.quant) stores this module's weight in ``storage``: every
    plain nn.Linear but the output head; nf4 also needs whole 64-weight blocks per row. GPT-2's Conv1D
    stays 16-bit."""
    if type(module) is not nn.Linear or path in heads:
        return False
    return storage != "nf4" or module.in_features % NF4_BLOCK == 0


def base_bytes(model: nn.Module, storage: str) -> int:
    """Bytes of the frozen base: ``storage`` bf16 or fp32 for every parameter, or nf4/int8 for the linear
    weights lorakit quantizes (``quantizes``) and bf16 for the rest. Tied weights count once."""
    if storage in ("bf16", "fp32"):
        return math.ceil(sum(p.numel() for p in model.parameters()) * BYTES[storage])
    heads = output_head_names(model)
    quantized: dict[int, float] = {}  # id(weight) -> bytes
    for path, m in model.named_modules():
        if quantizes(path, m, storage, heads):
            scales = 4 * m.out_features if storage == "int8" else 0  # one fp32 scale per output row
            quantized[id(m.weight)] = m.weight.numel() * BYTES[storage] + scales
    rest = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    return math.ceil(sum(quantized.values()) + rest * BYTES["bf16"])


def activation_bytes(model: nn.Module, batch_size: int, seq_len: int, checkpointing: bool = False) -> dict[str, int]:
    """Estimated activation bytes kept for backward: the transformer layers (Korthikanti et al. 2022,
    eq. 1) and the loss on the output logits (b·s·V). See ACT_PER_LAYER and LOGITS_BYTES."""
    cfg = model.config.get_text_config()
    b, s = batch_size, seq_len
    h, layers = getattr(cfg, "hidden_size", 0), getattr(cfg, "num_hidden_layers", 0)
    heads = getattr(cfg, "num_attention_heads", 0)
    scores = ACT_SCORES * heads * s * s * b if getattr(cfg, "_attn_implementation", "eager") == "eager" else 0
    layer = ACT_PER_LAYER * s * b * h + scores
    layers_bytes = layers * 2 * s * b * h + layer if checkpointing else layers * layer
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else 0
    return {"activations": layers_bytes, "logits": LOGITS_BYTES * b * s * vocab}


def memory_breakdown(model: nn.Module, trainable: int, quantization: str, batch_size: int, seq_len: int,
                     checkpointing: bool = False) -> dict[str, dict[str, int]]:
    """Training memory in bytes, per method (full, lora, qlora) and component. See ASSUMPTIONS."""
    total = sum(p.numel() for p in model.parameters())
    act = activation_bytes(model, batch_size, seq_len, checkpointing)

    def method(name: str, frozen: int, trained: int) -> dict[str, int]:
        parts = {"frozen_weights": frozen, "trainable_weights": 4 * trained, "gradients": 4 * trained,
                 "optimizer": ADAMW_STATES * 4 * trained, **act, "runtime": RUNTIME_BYTES[name]}
        return {**parts, "total": sum(parts.values())}

    return {"full": method("full", 0, total), "lora": method("lora", base_bytes(model, "bf16"), trainable),
            "qlora": method("qlora", base_bytes(model, quantization), trainable)}


def estimate(model_config: PretrainedConfig | str, r: int, target_modules: list[str] | str,
             exclude_modules: list[str] | str = (), quantization: str = "nf4", batch_size: int = 1,
             seq_len: int = 512, gradient_checkpointing: bool = False) -> ParamsReport:
    """Count LoRA's trainable parameters and estimate training memory without allocating a weight.
    ``quantization`` is the QLoRA base's storage: nf4 or int8 (``none`` means nf4)."""
    quantization = "nf4" if quantization == "none" else quantization
    if quantization not in ("nf4", "int8"):
        raise LorakitError(f"--quantization must be none, int8 or nf4, got {quantization!r}")
    cfg = load_model_config(model_config) if isinstance(model_config, str) else model_config
    model = build_on_meta(cfg)
    exclude = exclude_modules if isinstance(exclude_modules, str) else list(exclude_modules)
    paths = select_targets(model, target_modules, exclude)
    modules = dict(model.named_modules())
    trainable = sum(lora_params(modules[p], r) for p in paths)
    return ParamsReport(
        model=model_config if isinstance(model_config, str) else cfg.model_type,
        architecture=type(model).__name__,
        total=sum(p.numel() for p in model.parameters()),
        trainable=trainable,
        targets=len(paths),
        r=r,
        target_modules=target_modules,
        quantization=quantization,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        memory=memory_breakdown(model, trainable, quantization, batch_size, seq_len, gradient_checkpointing),
    )


def _gib(n: int) -> str:
    g = n / 2**30
    return "0" if n == 0 else "<0.01" if g < 0.01 else f"{g:,.2f}"


def _fewer(x: float) -> str:
    """9281.6 -> '≈9,300×': two significant figures."""
    digits = max(0, int(math.floor(math.log10(x))) - 1) if x >= 1 else 0
    return f"≈{round(x, -digits):,.0f}×"


def render(report: ParamsReport) -> None:
    """Print the parameter counts, the memory table and the assumptions behind it."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    targets = report.target_modules if isinstance(report.target_modules, str) else ",".join(report.target_modules)
    console.print(f"{report.model} ({report.architecture}): LoRA r={report.r} on {targets}, {report.targets} modules")
    counts = Table("parameters", "count", "")
    counts.columns[1].justify = "right"
    counts.add_row("trainable (LoRA)", f"{report.trainable:,}", f"{report.percent:.4g}% of the base")
    counts.add_row("total (base model)", f"{report.total:,}", "")
    counts.add_row("reduction", _fewer(report.reduction), "fewer trained than full fine-tuning")
    console.print(counts)
    ckpt = ", gradient checkpointing" if report.gradient_checkpointing else ""
    console.print(f"training memory in GiB: batch {report.batch_size} × seq {report.seq_len}{ckpt}, AdamW")
    cols = ["frozen_weights", "trainable_weights", "gradients", "optimizer", "activations", "logits", "runtime",
            "total"]
    mem = Table("method", *(c.replace("_", " ") + ("*" if c in ("activations", "logits") else "") for c in cols))
    for column in mem.columns[1:]:
        column.justify = "right"
    names = {"full": "full FT", "lora": "LoRA (bf16 base)", "qlora": f"QLoRA ({report.quantization} base)"}
    for method, parts in report.memory.items():
        mem.add_row(names[method], *(_gib(parts[c]) for c in cols))
    console.print(mem)
    console.print("* an estimate. Assumptions:\n" + "\n".join(f"- {a}" for a in ASSUMPTIONS), highlight=False)


def params_command(args) -> int:
    """`lorakit params [CONFIG] [--model ...]`: flags override the YAML run config's values."""
    from lorakit.config import load_config

    overrides = {"model": args.model, "r": args.r, "target": args.target, "exclude": getattr(args, "exclude", None),
                 "quantization": args.quantization, "batch-size": args.batch_size, "seq-len": args.seq_len,
                 "gradient-checkpointing": getattr(args, "gradient_checkpointing", None)}
    cfg = load_config(args.config, overrides)
    report = estimate(cfg.model.name_or_path, cfg.lora.r, cfg.lora.target_modules, cfg.lora.exclude_modules,
                      cfg.model.quantization, cfg.train.batch_size, cfg.data.seq_len, cfg.model.gradient_checkpointing)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        render(report)
    return 0
