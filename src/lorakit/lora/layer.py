"""LoRA layers: the frozen base weight plus named low-rank updates, W' = W + Σ wₖ·sₖ·Bₖ·Aₖ.

Hu et al. 2021, §4.1: h = W₀x + (α/r)·B·A·x with A (r, in) Kaiming-uniform and B (out, r) zero, so a fresh
adapter is an exact no-op. Each layer registers the base module's own ``weight``/``bias`` Parameters on
itself, so the model's state-dict keys for the base never change (torchtune's habit) and
``merge_and_unload`` just puts the original module back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LorakitError
from lorakit.lora.function import LoraLinearFunction, compute_dtype


class LoraAdapter(nn.Module):
    """One adapter's weights on one layer. ``scale`` is the runtime strength knob (0 switches it off)."""

    def __init__(self, shape_a: tuple[int, ...], shape_b: tuple[int, ...], scaling: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(shape_a))  # (r, in) or (r, in, kh, kw)
        self.lora_B = nn.Parameter(torch.zeros(shape_b))  # (out, r) or (out, r, 1, 1)
        self.scaling = scaling
        self.scale = 1.0
        self.dropout = dropout

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


class LoraLayer(nn.Module):
    """Shared by every LoRA layer kind: the adapter table, which are active, which are merged."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self._base = [base]  # a list hides it from nn.Module: its Parameters are registered below instead
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def base_layer(self) -> nn.Module:
        return self._base[0]

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float) -> LoraAdapter:
        shape_a, shape_b = self.adapter_shapes(r)
        ad = LoraAdapter(shape_a, shape_b, scaling, dropout).to(self.weight.device)
        self.adapters[name] = ad
        if name not in self.active_adapters:
            self.active_adapters.append(name)
        return ad

    def delta_weight(self, name: str) -> Tensor:
        """s·w·B·A in the base weight's layout, computed in float32."""
        ad = self.adapters[name]
        return self._delta(ad.lora_A.float(), ad.lora_B.float()) * (ad.scaling * ad.scale)

    def running(self) -> list[LoraAdapter]:
        """Adapters that still add to the output: active, not merged, non-zero strength."""
        if self.disabled:
            return []
        return [self.adapters[n] for n in self.active_adapters if n not in self.merged_adapters
                and self.adapters[n].scale != 0.0]


class LoraLinear(LoraLayer):
    """nn.Linear (weight (out, in)) or GPT-2's Conv1D (weight (in, out): fan_in_fan_out)."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.fan_in_fan_out = isinstance(base, Conv1D)
        if isinstance(base, nn.Linear):  # also bitsandbytes' quantized linears, whose packed weight has another shape
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            self.in_features, self.out_features = self.weight.shape
        self._cast: tuple | None = None  # (source version, dtype, cast weight): frozen W cast once, not per step

    def adapter_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def _delta(self, a: Tensor, b: Tensor) -> Tensor:
        d = b @ a  # (out, in)
        return d.t() if self.fan_in_fan_out else d

    @property
    def quantized(self) -> bool:
        """QLoRA: the base weight is packed by bitsandbytes (NF4 in uint8, LLM.int8 rows in int8)."""
        return self.weight.dtype in (torch.uint8, torch.int8)

    def weight_as(self, dtype: torch.dtype) -> Tensor:
        """The base weight as (out, in) in ``dtype``; a frozen weight is cast once and cached, a quantized
        one is dequantized anew on every call (caching it would undo the memory saving)."""
        if self.quantized:
            from lorakit.quant.bnb import dequantize

            return dequantize(self.weight, self.base_layer, dtype)
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        if w.dtype == dtype or w.requires_grad:
            return w.to(dtype)
        key = (self.weight._version, self.weight.data_ptr(), dtype)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, w.detach().to(dtype))
        return self._cast[1]

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        run = self.running()
        if self.quantized:  # the fused function saves W for backward; this path dequantizes it again there
            from lorakit.quant.bnb import QuantizedLinearFunction

            y = QuantizedLinearFunction.apply(x, self.bias, self, dtype)
        else:
            w = self.weight_as(dtype)
            if len(run) == 1:
                ad = run[0]
                return LoraLinearFunction.apply(x, w, self.bias, ad.lora_A, ad.lora_B, ad.scaling * ad.scale,
                                                ad.dropout, self.training)
            y = F.linear(x.to(dtype), w, None if self.bias is None else self.bias.to(dtype))
        for ad in run:  # a quantized base, or several adapters at once: summed, each with its own strength
            xd = F.dropout(x, ad.dropout, self.training).to(dtype)
            y = y + (xd @ ad.lora_A.to(dtype).t()) @ ad.lora_B.to(dtype).t() * (ad.scaling * ad.scale)
        return y


class LoraEmbedding(LoraLayer):
    """nn.Embedding: the update is a low-rank (num_embeddings, dim) table, looked up like the base.
    PEFT's layout: lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r)."""

    def adapter_shapes(self, r: int):
        return (r, self.weight.shape[0]), (self.weight.shape[1], r)

    def _delta(self, a: Tensor, b: Tensor) -> Tensor:
        return (b @ a).t()  # (num_embeddings, dim)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.base_layer
        y = F.embedding(ids, self.weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        for ad in self.running():
            after_a = F.embedding(ids, ad.lora_A.t(), e.padding_idx)  # (..., r)
            y = y + (after_a @ ad.lora_B.t()).to(y.dtype) * (ad.scaling * ad.scale)
        return y


class LoraConv2d(LoraLayer):
    """nn.Conv2d: A is a conv with the base's kernel/stride/padding to r channels, B a 1×1 conv to out."""

    def adapter_shapes(self, r: int):
        out_ch, in_ch, kh, kw = self.weight.shape
        return (r, in_ch, kh, kw), (out_ch, r, 1, 1)

    def _delta(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape[2:] == (1, 1):
            return (b.flatten(1) @ a.flatten(1))[:, :, None, None]
        # compose the two convolutions: (out, r, 1, 1) ∘ (r, in, kh, kw) -> (out, in, kh, kw)
        return F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        c = self.base_layer
        y = c._conv_forward(x, self.weight, self.bias)
        for ad in self.running():
            xd = F.dropout(x, ad.dropout, self.training)
            h = F.conv2d(xd.to(ad.lora_A.dtype), ad.lora_A, None, c.stride, c.padding, c.dilation)
            y = y + F.conv2d(h, ad.lora_B).to(y.dtype) * (ad.scaling * ad.scale)
        return y


def wrap(base: nn.Module) -> LoraLayer:
    """The LoRA layer kind for a base module."""
    if isinstance(base, (nn.Linear, Conv1D)):
        return LoraLinear(base)
    if isinstance(base, nn.Embedding):
        return LoraEmbedding(base)
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError("LoRA on grouped Conv2d is not supported")
        return LoraConv2d(base)
    raise TypeError(f"no LoRA layer for {type(base).__name__}")


def init_adapter(layer: LoraLayer, name: str, method: str) -> None:
    """kaiming (PEFT default: A Kaiming-uniform, B zero; embeddings A zero, B normal), gaussian (A ~ N(0, 1/r)),
    or pissa (Meng et al. 2024: A, B from W's top-r singular triplets, which are moved out of W)."""
    ad = layer.adapters[name]
    with torch.no_grad():
        if method == "pissa":
            _init_pissa(layer, ad)
        elif isinstance(layer, LoraEmbedding):
            nn.init.zeros_(ad.lora_A)
            nn.init.normal_(ad.lora_B)
        elif method == "gaussian":
            nn.init.normal_(ad.lora_A, std=1.0 / ad.r)
            nn.init.zeros_(ad.lora_B)
        else:
            nn.init.kaiming_uniform_(ad.lora_A, a=math.sqrt(5))
            nn.init.zeros_(ad.lora_B)


def _init_pissa(layer: LoraLayer, ad: LoraAdapter) -> None:
    if not isinstance(layer, LoraLinear):
        raise ValueError("PiSSA init applies to linear layers only")
    if layer.quantized:
        raise LorakitError("--init pissa moves W's top singular vectors into the adapter, which needs a 16-bit "
                           "base; use --quantization none or another --init")
    w = layer.weight.float()
    w = w.t() if layer.fan_in_fan_out else w  # (out, in)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sr = s[: ad.r] / ad.scaling  # so that scaling·B·A reproduces U_r·S_r·V_rᵀ exactly
    ad.lora_A.copy_(torch.diag(sr.sqrt()) @ vh[: ad.r])  # (r, in)
    ad.lora_B.copy_(u[:, : ad.r] @ torch.diag(sr.sqrt()))  # (out, r)
    # keep the initial factors: save_adapter turns the trained adapter into one for the untouched base
    ad.register_buffer("init_A", ad.lora_A.detach().clone(), persistent=False)
    ad.register_buffer("init_B", ad.lora_B.detach().clone(), persistent=False)
    residual = layer.weight.float() - layer._delta(ad.lora_A, ad.lora_B) * ad.scaling
    layer.weight.data.copy_(residual.to(layer.weight.dtype))
