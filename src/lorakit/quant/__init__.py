"""QLoRA's frozen base: bitsandbytes NF4 (double-quantized) or int8 linears, loaded tensor by tensor."""

from lorakit.quant.bnb import NF4_BITS, NF4_BLOCKSIZE, dequantize, unquantizable
from lorakit.quant.load import LoadReport, load_quantized, plan

__all__ = ["NF4_BITS", "NF4_BLOCKSIZE", "dequantize", "unquantizable", "LoadReport", "load_quantized", "plan"]
