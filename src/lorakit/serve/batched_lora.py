"""Many adapters in one forward: the base matmul once for the whole batch, each row's LoRA term from its own
adapter (the idea of Punica's BGMV and S-LoRA; PEFT's mixed batch routes rows the same way).

For a LoRA layer with base weight W and adapters g = 1..G, a batch whose row i uses adapter g(i) computes

    Y = X·Wᵀ + b                                        one matmul over all rows (B·T, in) -> (B·T, out)
    Y[rows_g] += s_g · (X[rows_g]·A_gᵀ)·B_gᵀ             per adapter present: (n_g·T, in) -> (n_g·T, r) -> out

Rows that use the base model alone belong to no group, so they pay nothing for LoRA; a batch of base-only
requests runs the plain base. One adapter in the batch (a prefill, or a batch for one adapter): two matmuls
on its rows, slices (views) when they are contiguous. Several adapters (a mixed decode step): the adapters
present are stacked, per layer, into one A (R, in) and one B (out, R) with R = the sum of their ranks (cached
until the set changes), and the whole batch takes

    Y += ((X·A_stackᵀ) ⊙ M)·B_stackᵀ                    (B·T, in) -> (B·T, R), masked -> (B·T, out)

where M keeps, on row i, only the R columns of its own adapter, scaled by its s (other adapters' columns
become exact zeros: base rows add exactly nothing). Two matmuls per layer whatever the
number of adapters, instead of two per adapter plus the gathers: on a CPU, a decode step of many adapters
is made of small matmuls whose cost is their count (measured: README, Serving). A GPU gathers each row's
A and B instead (BGMV); on a CPU that copy costs more than the masked columns.

This sits on top of lorakit's LoRA layers: ``lorakit.lora.load_adapter`` puts every adapter's A, B and
scaling on the model's ``LoraLayer`` modules; here each such layer runs its base alone (``disabled``: its
own forward, so quantized and Conv1D bases work unchanged), and a forward hook adds the routed terms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.lora import lora_layers
from lorakit.lora.layer import LoraEmbedding, LoraLayer, LoraLinear

Rows = slice | Tensor  # a contiguous range of batch rows, or their indices (LongTensor)


def group_rows(row_adapters: Sequence[str | None], device: torch.device | str = "cpu") -> list[tuple[str, Rows]]:
    """[(adapter, rows)] for the adapters in ``row_adapters`` (one entry per batch row; None: the base).
    Rows are a slice when the adapter's rows are contiguous, else a LongTensor of indices."""
    by_adapter: dict[str, list[int]] = {}
    for i, name in enumerate(row_adapters):
        if name is not None:
            by_adapter.setdefault(name, []).append(i)
    groups: list[tuple[str, Rows]] = []
    for name, rows in by_adapter.items():
        if rows[-1] - rows[0] + 1 == len(rows):
            groups.append((name, slice(rows[0], rows[-1] + 1)))
        else:
            groups.append((name, torch.tensor(rows, dtype=torch.long, device=device)))
    return groups


class BatchedLora:
    """Routes each batch row of ``model`` to its own adapter (or none) during ``route(...)``.

    ``attach()`` must follow every change of the model's adapter set (it hooks LoRA layers that are new)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.groups: list[tuple[str, Rows]] = []
        self.row_adapters: Sequence[str | None] = ()
        self._hooked: set[int] = set()
        self._stacks: dict[int, tuple[tuple, Tensor, Tensor]] = {}  # id(layer) -> (key, A_stack, B_stack)
        self._masks: dict[tuple, Tensor] = {}  # per route(): (adapters, ranks, scales) -> (B, 1, R) scale mask
        self.attach()

    def attach(self) -> None:
        """Hook every LoRA layer not hooked yet, and make it compute its base alone."""
        for _, layer in lora_layers(self.model):
            if id(layer) in self._hooked:
                continue
            if isinstance(layer, LoraLinear):
                layer.register_forward_hook(self._linear_hook)
            elif isinstance(layer, LoraEmbedding):
                layer.register_forward_hook(self._embedding_hook)
            else:  # the registry refuses adapters on other layer kinds before they get here
                raise TypeError(f"no batched LoRA path for {type(layer).__name__}")
            layer.disabled = True
            self._hooked.add(id(layer))
        self.forget()

    def forget(self) -> None:
        """Drop the stacked weights: call after any adapter is loaded or unloaded."""
        self._stacks.clear()

    @contextmanager
    def route(self, row_adapters: Sequence[str | None], device: torch.device | str = "cpu") -> Iterator[None]:
        """Within the block, batch row i of every forward uses adapter ``row_adapters[i]`` (None: the base)."""
        self.groups = group_rows(row_adapters, device)
        self.row_adapters = row_adapters
        try:
            yield
        finally:
            self.groups, self.row_adapters = [], ()
            self._masks.clear()

    def _linear_hook(self, layer: LoraLayer, args: tuple, y: Tensor) -> Tensor:
        # x (B, T, in) or (B, in); y (B, T, out) or (B, out), fresh from the base matmul: updated in place
        x = args[0]
        if len(self.groups) > 1:
            return self._stacked(layer, x, y)
        for name, rows in self.groups:
            ad = layer.adapters[name] if name in layer.adapters else None
            if ad is None:  # this adapter does not target this layer
                continue
            a, b = ad.lora_A, ad.lora_B  # (r, in), (out, r), already in the compute dtype
            s = ad.scaling * ad.scale
            if isinstance(rows, slice):
                xa = x[rows].reshape(-1, x.shape[-1]).to(a.dtype) @ a.t()  # (n·T, r)
                y[rows].view(-1, y.shape[-1]).addmm_(xa, b.t(), alpha=s)
            else:
                xa = x.index_select(0, rows).reshape(-1, x.shape[-1]).to(a.dtype) @ a.t()
                y.index_add_(0, rows, (xa @ b.t()).view(len(rows), *y.shape[1:]), alpha=s)
        return y

    def _stacked(self, layer: LoraLayer, x: Tensor, y: Tensor) -> Tensor:
        # x (B, T, in) or (B, in); y (B, T, out) or (B, out). Every adapter of the batch that targets this layer
        # in name order, so the stack stays valid while requests come and go in another order
        present = [(name, layer.adapters[name]) for name in sorted(n for n, _ in self.groups) if name in layer.adapters]
        if not present:
            return y
        key = tuple((name, ad.r, ad.scaling * ad.scale) for name, ad in present)
        stack = self._stacks.get(id(layer))
        if stack is None or stack[0] != key:
            a = torch.cat([ad.lora_A for _, ad in present])  # (R, in)
            b = torch.cat([ad.lora_B for _, ad in present], dim=1)  # (out, R)
            stack = self._stacks[id(layer)] = (key, a, b)
        _, a, b = stack
        mask = self._masks.get(key)
        if mask is None:  # (B, 1, R): row i's own adapter's columns hold its scale, every other column 0
            owner = torch.cat([torch.full((ad.r,), i) for i, (_, ad) in enumerate(present)])  # (R,)
            index = {name: i for i, (name, _) in enumerate(present)}
            rows = torch.tensor([index.get(name, -1) for name in self.row_adapters])  # (B,) -1: none here
            scale = torch.tensor([s for _, _, s in key]).repeat_interleave(torch.tensor([r for _, r, _ in key]))
            mask = self._masks[key] = torch.where(rows[:, None] == owner[None], scale, 0.0)[:, None].to(
                a.device, a.dtype)
        xa = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype) @ a.t()  # (B, T, R)
        xa.mul_(mask)  # row i keeps its own adapter's columns; a row's values never reach another row
        y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), b.t())  # (B·T, R)·(R, out)
        return y

    def _embedding_hook(self, layer: LoraLayer, args: tuple, y: Tensor) -> Tensor:
        # ids (B, T); y (B, T, dim). PEFT's layout: lora_embedding_A (r, num_embeddings), B (dim, r)
        ids = args[0]
        pad = layer.base_layer.padding_idx
        for name, rows in self.groups:
            ad = layer.adapters[name] if name in layer.adapters else None
            if ad is None:
                continue
            s = ad.scaling * ad.scale
            picked = ids[rows] if isinstance(rows, slice) else ids.index_select(0, rows)
            delta = F.embedding(picked, ad.lora_A.t(), pad) @ ad.lora_B.t()  # (n, T, dim)
            if isinstance(rows, slice):
                y[rows].add_(delta.to(y.dtype), alpha=s)
            else:
                y.index_add_(0, rows, delta.to(y.dtype), alpha=s)
        return y
