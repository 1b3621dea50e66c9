"""``--compile``: torch.compile each decoder layer, transformers' own code with lorakit's LoRA autograd
function inside, instead of the fused eager layers of ``train/fastpath.py``.

Inductor fuses the elementwise work around the matmuls (norms, RoPE, SiLU·up, casts) into generated C++
(CPU) or Triton (CUDA) kernels. One compile serves every layer (same code, parameters as inputs) and every
sequence length (dynamic shapes). The first run pays for it (on a 2-core CPU: minutes for a Llama layer's
forward and backward); the compiled kernels are cached in ``$LORAKIT_CACHE/inductor`` and reused by later
runs of the same shapes. ``tests/unit/test_fused_step.py`` checks the layer compiles without graph breaks.
"""

from __future__ import annotations

import os

from torch import nn

from lorakit.device import cache_root
from lorakit.train.fastpath import decoder_layers


def compile_layers(model: nn.Module) -> str:
    """Compile ``model``'s decoder layers in place (lazily: at their first call); returns what runs."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    layers = decoder_layers(model)
    if not layers:
        return "transformers' own layers (--compile: no decoder layers found)"
    for layer in layers:
        layer.compile(dynamic=True)
    return f"torch.compile'd decoder layers ({len(layers)} × {type(layers[0]).__name__}; kernels cached in " \
           f"{os.environ['TORCHINDUCTOR_CACHE_DIR']})"
