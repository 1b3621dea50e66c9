"""A frozen linear weight stored by bitsandbytes: NF4 with double quantization, or LLM.int8 rows.

NF4 (Dettmers et al. 2023, QLoRA §3): each block of 64 weights is scaled by its absmax and rounded to the
nearest of 16 normal-quantile levels (4 bits); the fp32 absmax constants are themselves quantized to 8 bits
in blocks of 256 (double quantization), so a weight costs 4 + 8/64 + 32/(64·256) = 4.127 bits.
int8 (Dettmers et al. 2022): each output row is scaled by its absmax/127 and rounded to int8 (8 bits plus
one fp32 scale per row).

The LoRA layer computes through ``dequantize``: W is rebuilt in the compute dtype for one matmul and
dropped again, so only the packed weights stay resident (``QuantizedLinearFunction`` dequantizes W a
second time in backward instead of keeping it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _import_bitsandbytes():
    """bitsandbytes, imported with ``torch.compile`` as the identity. On import it wraps its pure-PyTorch
    fallback kernels (MPS, odd shapes, 8-bit optimizers) in torch.compile, which loads torch's compiler
    stack: about 4 s and 40 MiB in every process, for kernels lorakit does not call (NF4 and int8 go
    through the native CPU and CUDA kernels). The fallbacks then run eagerly, as when compiling fails."""
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)
    try:
        import bitsandbytes
    finally:
        torch.compile = compile_
    return bitsandbytes


bnb = _import_bitsandbytes()
bnbf = bnb.functional

NF4_BLOCKSIZE = 64  # QLoRA §3; the nested absmax quantization uses bitsandbytes' blocks of 256
NF4_BITS = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * 256)  # 4.127 bits per weight


def unquantizable(linear: nn.Linear, quantization: str) -> str | None:
    """None when ``linear`` can be stored as ``quantization``, else why it stays 16-bit. NF4 needs whole
    blocks per row: a block straddling two rows would share one scale between two output channels, and
    bitsandbytes' 4-bit inference kernels refuse such shapes."""
    if quantization == "nf4" and linear.in_features % NF4_BLOCKSIZE:
        return f"in_features {linear.in_features} is not a multiple of the NF4 block size {NF4_BLOCKSIZE}"
    return None


def empty_quantized_linear(linear: nn.Linear, quantization: str, compute_dtype: torch.dtype) -> nn.Linear:
    """A bitsandbytes ``Linear4bit`` (NF4) or ``Linear8bitLt`` (int8) of ``linear``'s shape, every tensor on
    the meta device; ``set_quantized_weight`` fills the weight, the bias is loaded like any parameter."""
    bias = linear.bias is not None
    if quantization == "nf4":
        return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias, compute_dtype=compute_dtype,
                                 compress_statistics=True, quant_type="nf4", device="meta")
    if quantization == "int8":
        # threshold 0: no outlier columns kept in 16-bit; LoRA layers dequantize W for their matmul anyway
        return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                   threshold=0.0, device="meta")
    raise ValueError(f"unknown quantization {quantization!r}")


def set_quantized_weight(module: nn.Linear, weight: Tensor) -> None:
    """Quantize ``weight`` (out, in) into ``module`` (from ``empty_quantized_linear``) on its device."""
    if isinstance(module, bnb.nn.Linear4bit):
        packed, state = bnbf.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                           compress_statistics=True)  # packed: (out·in/2, 1) uint8
        module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCKSIZE,
                                          compress_statistics=True, quant_type="nf4", module=module,
                                          bnb_quantized=True)
        module.quant_state = state
    else:
        rows, scales, _ = bnbf.int8_vectorwise_quant(weight.float())  # (out, in) int8, (out,) fp32 absmax
        module.weight = bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales)


def dequantize(weight: Tensor, module: nn.Module, dtype: torch.dtype) -> Tensor:
    """W (out, in) in ``dtype``, rebuilt from ``module``'s packed ``weight``."""
    if weight.dtype == torch.int8:
        # Linear8bitLt's own forward moves the row scales from the weight to its matmul state
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scales).to(dtype)
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # Linear4bit's CPU inference path repacks the weight in place for its AVX512 kernel; undo it
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = module.quant_state = weight.quant_state
    return bnbf.dequantize_4bit(weight.data, state).to(dtype)


def storage_bytes(weight: Tensor, module: nn.Module) -> int:
    """Bytes the packed weight and its quantization constants occupy."""
    if weight.dtype == torch.int8:
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return weight.numel() + scales.numel() * scales.element_size()
    state = weight.quant_state
    extra = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
    return weight.numel() * weight.element_size() + sum(t.numel() * t.element_size() for t in extra)


class QuantizedLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b for a frozen quantized W (out, in), W = ``layer.weight_as(dtype)``.

    Backward needs only dx = dy·W, and dequantizes W again for it: saving the dequantized W instead would
    keep a 16-bit copy of every layer alive from forward to backward, the memory QLoRA exists to save.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: nn.Module, dtype: torch.dtype) -> Tensor:
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        return F.linear(x.to(dtype), layer.weight_as(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, dy: Tensor):
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (dy.to(ctx.dtype) @ ctx.layer.weight_as(ctx.dtype)).to(ctx.x_dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dbias, None, None
