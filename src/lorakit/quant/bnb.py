"""A frozen linear weight stored by bitsandbytes: NF4 with double quantization, or LLM.int8 rows.

NF4 (Dettmers et al. 2023, QLoRA §3): each block of 64 weights is scaled by its absmax and rounded to the
nearest of 16 normal-quantile levels (4 bits); the fp32 absmax constants are themselves quantized to 8 bits
in blocks of 256 (double quantization), so a weight costs 4 + 8/64 + 32/(64·256) = 4.127 bits.
int8 (Dettmers et al. 2022): each output row is scaled by its absmax/127 and rounded to int8 (8 bits plus
one fp32 scale per row).

The LoRA layer computes through ``QuantizedLinearFunction``: W is rebuilt in the compute dtype a slab of
rows at a time for one matmul and dropped again, so only the packed weights stay resident (backward
dequantizes W a second time instead of keeping it).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn


def _no_optional_kernels_warning(record: logging.LogRecord) -> bool:
    """Drop bitsandbytes' import-time warning that the optional ``kernels`` package (a faster CPU NF4 matmul,
    fetched from the hub) is not installed; any other failure to load those kernels is still shown."""
    return not (str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
                and any(isinstance(a, ModuleNotFoundError) and a.name == "kernels" for a in record.args or ()))


def _import_bitsandbytes():
    """bitsandbytes, imported with ``torch.compile`` as the identity. On import it wraps its pure-PyTorch
    fallback kernels (MPS, odd shapes, 8-bit optimizers) in torch.compile, which loads torch's compiler
    stack: about 4 s and 40 MiB in every process, for kernels lorakit does not call (NF4 and int8 go
    through the native CPU and CUDA kernels). The fallbacks then run eagerly, as when compiling fails."""
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_optional_kernels_warning)
    try:
        import bitsandbytes
    finally:
        torch.compile = compile_
    return bitsandbytes


bnb = _import_bitsandbytes()
bnbf = bnb.functional

NF4_BLOCKSIZE = 64  # QLoRA §3; the nested absmax quantization uses bitsandbytes' blocks of 256
NF4_BITS = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * 256)  # 4.127 bits per weight
SLAB_BYTES = 8 * 2**20  # the most of W one matmul holds dequantized at once


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


def dequantize(weight: Tensor, module: nn.Module, dtype: torch.dtype, rows: slice = slice(None)) -> Tensor:
    """W[rows] (rows, in) in ``dtype``, rebuilt from ``module``'s packed ``weight``; all of W by default.
    A row range of NF4 needs whole blocks per row (``row_slabs`` only splits such weights)."""
    start, stop, _ = rows.indices(module.out_features)
    whole = (start, stop) == (0, module.out_features)
    if weight.dtype == torch.int8:
        # Linear8bitLt's own forward moves the row scales from the weight to its matmul state
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data[start:stop], scales[start:stop]).to(dtype)
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # Linear4bit's CPU inference path repacks the weight in place for its AVX512 kernel; undo it
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = module.quant_state = weight.quant_state
    absmax = state.absmax
    if state.nested:  # double quantization: the fp32 absmax are stored as 8-bit blocks of 256 + an offset
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    cols = module.in_features
    packed = weight.data if whole else weight.data.view(-1)[start * cols // 2:stop * cols // 2]  # 2 per byte
    if not whole:
        absmax = absmax[start * cols // state.blocksize:stop * cols // state.blocksize]
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax.float(), state.blocksize, state.quant_type,
                                                         [stop - start, cols], dtype)


def row_slabs(module: nn.Module) -> list[slice]:
    """Row ranges of about ``SLAB_BYTES`` of 16-bit W each: what one matmul dequantizes at a time."""
    cols = module.in_features
    state = getattr(module.weight, "quant_state", None)
    if state is not None and (cols % state.blocksize or cols % 2):
        return [slice(None)]  # blocks straddle rows: only all of W dequantizes
    step = max(1, SLAB_BYTES // (2 * cols))
    return [slice(i, min(i + step, module.out_features)) for i in range(0, module.out_features, step)]


def storage_bytes(weight: Tensor, module: nn.Module) -> int:
    """Bytes the packed weight and its quantization constants occupy."""
    if weight.dtype == torch.int8:
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return weight.numel() + scales.numel() * scales.element_size()
    state = weight.quant_state
    extra = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
    return weight.numel() * weight.element_size() + sum(t.numel() * t.element_size() for t in extra)


class QuantizedLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b for a frozen quantized W (out, in), dequantized in row slabs (``row_slabs``).

    Backward needs only dx = dy·W, and dequantizes W again for it: saving the dequantized W instead would
    keep a 16-bit copy of every layer alive from forward to backward, the memory QLoRA exists to save.
    Slabs bound the 16-bit transient of one matmul to ``SLAB_BYTES``, whatever the layer's size.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: nn.Module, dtype: torch.dtype) -> Tensor:
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        base = layer.base_layer
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
        y = x2.new_empty(x2.shape[0], base.out_features)  # (N, out)
        for rows in row_slabs(base):
            y[:, rows] = x2 @ dequantize(layer.weight, base, dtype, rows).t()
        if bias is not None:
            y += bias.to(dtype)
        return y.view(*x.shape[:-1], base.out_features)

    @staticmethod
    def backward(ctx, dy: Tensor):
        dx = dbias = None
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        if ctx.needs_input_grad[0]:
            base = ctx.layer.base_layer
            dy16 = dy2.to(ctx.dtype)
            dx = dy16.new_zeros(dy16.shape[0], base.in_features)  # (N, in)
            for rows in row_slabs(base):
                dx.addmm_(dy16[:, rows], dequantize(ctx.layer.weight, base, ctx.dtype, rows))
            dx = dx.view(*dy.shape[:-1], base.in_features).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dbias = dy2.sum(0)
        return dx, dbias, None, None
