"""Many adapters in one forward: the base matmul once for the whole batch, each row's LoRA term from its own
adapter (the idea of Punica's BGMV and S-LoRA; PEFT's mixed batch routes rows the same way).

For a LoRA layer with base weight W and adapters g = 1..G, a batch whose row i uses adapter g(i) computes

    Y = X·Wᵀ + b                                        one matmul over all rows (B·T, in) -> (B·T, out)
    Y[rows_g] += s_g · (X[rows_g]·A_gᵀ)·B_gᵀ             per adapter present: (n_g·T, in) -> (n_g·T, r) -> out

Rows are the flattened (B·T) rows: a batch row's T positions, or in a packed prefill (one row holding several
prompts, ``route(..., tokens=...)``) each prompt's positions. Rows that use the base model alone belong to no
group, so they pay nothing for LoRA; a batch of base-only requests runs the plain base. One adapter in the
batch: two matmuls on its rows (a slice when they are contiguous). Several adapters (a mixed decode step, a
packed prefill of several adapters' prompts): the adapters present are stacked, per layer, into one A (R, in)
and one B (out, R) with R = the sum of their ranks (cached until the set changes), and the whole batch takes

    Y += ((X·A_stackᵀ) ⊙ M)·B_stackᵀ                    (B·T, in) -> (B·T, R), masked -> (B·T, out)

where M keeps, on row i, only the R columns of its own adapter, scaled by its s (other adapters' columns
become exact zeros: base rows add exactly nothing). Two matmuls per layer whatever the
number of adapters, instead of two per adapter plus the gathers: on a CPU, a decode step of many adapters
is made of small matmuls whose cost is their count (measured: README, Serving), and in a prefill each
adapter's in-place update of its rows is one more pass over the layer's output, where the stack makes one
(12 prompts over 8 adapters, one core: prefill +14% over the base stacked, +38% grouped). A GPU gathers each
row's A and B instead (BGMV); on a CPU that copy costs more than the masked columns.

This sits on top of lorakit's LoRA layers: ``lorakit.lora.load_adapter`` puts every adapter's A, B and
scaling on the model's ``LoraLayer`` modules; here each such layer runs its base alone (``disabled``: its
own forward, so quantized and Conv1D bases work unchanged), and a forward hook adds the routed terms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.lora import lora_layers
from lorakit.lora.layer import LoraEmbedding, LoraLayer, LoraLinear
from lorakit.serve.attention import packed_spans

Rows = slice | Tensor  # a contiguous range of (flattened) rows, or their indices (LongTensor)


@dataclass
class Plan:
    """How one route's rows map onto adapters, for a forward whose activations flatten to ``n`` rows (B·T)."""

    groups: list[tuple[str, Rows]]  # each adapter present and its flattened rows
    owner: list[str | None]  # per entry of the route: its adapter
    spans: list[tuple[int, int]]  # per entry: its flattened rows [start, stop)
    stacked: bool  # several adapters: the stacked, masked path
    names: tuple[str, ...] = ()  # the adapters present, sorted: the order of the stacks' columns
    masks: dict[tuple, Tensor] = field(default_factory=dict)  # (adapters, ranks, scales) of a stack -> (n, R)


def plan_rows(row_adapters: Sequence[str | None], n: int, tokens: Sequence[int] | None = None,
              device: torch.device | str = "cpu") -> Plan:
    """Entry i of ``row_adapters`` (None: the base) covers batch row i (``tokens`` None: T = n / entries
    positions each), or the next ``tokens[i]`` positions of one packed row. Groups are slices when an adapter's
    rows are contiguous, else a LongTensor of indices."""
    if tokens is None:
        t = n // max(len(row_adapters), 1)
        spans = [(i * t, (i + 1) * t) for i in range(len(row_adapters))]
    else:
        spans = packed_spans(tokens)
    by_adapter: dict[str, list[tuple[int, int]]] = {}
    for name, (a, b) in zip(row_adapters, spans, strict=True):
        if name is not None:
            runs = by_adapter.setdefault(name, [])
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)  # adjacent entries of one adapter: one run
            else:
                runs.append((a, b))
    groups: list[tuple[str, Rows]] = []
    for name, runs in by_adapter.items():
        if len(runs) == 1:
            groups.append((name, slice(*runs[0])))
        else:
            groups.append((name, torch.cat([torch.arange(a, b) for a, b in runs]).to(device)))
    stacked = len(groups) > 1
    return Plan(groups, list(row_adapters), spans, stacked, tuple(sorted(by_adapter)))


class BatchedLora:
    """Routes each batch row (or each request's tokens in one packed row) of ``model`` to its own adapter
    (or none) during ``route(...)``.

    ``attach()`` must follow every change of the model's adapter set (it hooks LoRA layers that are new)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.row_adapters: Sequence[str | None] = ()
        self.tokens: Sequence[int] | None = None
        self.device: torch.device | str = "cpu"
        self._plans: dict[int, Plan] = {}  # per route(): flattened row count -> plan
        self._hooked: set[int] = set()
        # id(layer) -> (adapters present, A_stackᵀ (in, R), B_stackᵀ (R, out), their (name, rank, scale)): kept
        # across forwards while the same adapters are present (a decode step after another)
        self._stacks: dict[int, tuple[tuple[str, ...], Tensor | None, Tensor | None, tuple]] = {}
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
    def route(self, row_adapters: Sequence[str | None], device: torch.device | str = "cpu",
              tokens: Sequence[int] | None = None) -> Iterator[None]:
        """Within the block, batch row i of every forward uses adapter ``row_adapters[i]`` (None: the base);
        with ``tokens``, the forward is one packed row whose next ``tokens[i]`` positions use that adapter."""
        self.row_adapters, self.tokens, self.device = row_adapters, tokens, device
        try:
            yield
        finally:
            self.row_adapters, self.tokens = (), None
            self._plans.clear()

    def _plan(self, n: int) -> Plan:
        plan = self._plans.get(n)
        if plan is None:
            plan = self._plans[n] = plan_rows(self.row_adapters, n, self.tokens, self.device)
        return plan

    def _linear_hook(self, layer: LoraLayer, args: tuple, y: Tensor) -> Tensor:
        # x (..., in), y (..., out) fresh from the base matmul, updated in place; both seen as (n, ·) rows, n = B·T
        if not self.row_adapters:
            return y
        x = args[0].reshape(-1, args[0].shape[-1])  # (n, in)
        out = y.view(-1, y.shape[-1])  # (n, out)
        plan = self._plan(x.shape[0])
        if plan.stacked:
            self._stacked(layer, x, out, plan)
            return y
        for name, rows in plan.groups:
            ad = layer.adapters[name] if name in layer.adapters else None
            if ad is None:  # this adapter does not target this layer
                continue
            a, b = ad.lora_A, ad.lora_B  # (r, in), (out, r), already in the compute dtype
            s = ad.scaling * ad.scale
            if isinstance(rows, slice):
                out[rows].addmm_(x[rows].to(a.dtype) @ a.t(), b.t(), alpha=s)  # (m, in) -> (m, r) -> (m, out)
            else:
                xa = x.index_select(0, rows).to(a.dtype) @ a.t()
                out.index_add_(0, rows, xa @ b.t(), alpha=s)
        return y

    def _stacked(self, layer: LoraLayer, x: Tensor, y: Tensor, plan: Plan) -> None:
        # x (n, in), y (n, out). Every adapter of the batch that targets this layer, in name order, so the stack
        # stays valid while requests come and go in another order; rebuilt when the adapters present change
        stack = self._stacks.get(id(layer))
        if stack is None or stack[0] != plan.names:
            present = [(name, layer.adapters[name]) for name in plan.names if name in layer.adapters]
            a = torch.cat([ad.lora_A for _, ad in present]) if present else None  # (R, in)
            b = torch.cat([ad.lora_B for _, ad in present], dim=1) if present else None  # (out, R)
            key = tuple((name, ad.r, ad.scaling * ad.scale) for name, ad in present)
            stack = self._stacks[id(layer)] = (plan.names, None if a is None else a.t(), None if b is None else b.t(),
                                               key)
        _, at, bt, key = stack
        if at is None:  # no adapter of this batch targets this layer
            return
        mask = plan.masks.get(key)
        if mask is None:  # (n, R): row i's own adapter's columns hold its scale, every other column 0
            owner = torch.cat([torch.full((r,), i) for i, (_, r, _) in enumerate(key)])  # (R,)
            index = {name: i for i, (name, _, _) in enumerate(key)}
            rows = torch.full((x.shape[0],), -1)  # (n,) -1: no adapter of this layer
            for name, (start, stop) in zip(plan.owner, plan.spans, strict=True):
                rows[start:stop] = index.get(name, -1)
            scale = torch.tensor([s for _, _, s in key]).repeat_interleave(torch.tensor([r for _, r, _ in key]))
            mask = plan.masks[key] = torch.where(rows[:, None] == owner[None], scale, 0.0).to(at.device, at.dtype)
        xa = x.to(at.dtype) @ at  # (n, R)
        xa.mul_(mask)  # row i keeps its own adapter's columns; a row's values never reach another row
        y.addmm_(xa, bt)  # (n, R)·(R, out)

    def _embedding_hook(self, layer: LoraLayer, args: tuple, y: Tensor) -> Tensor:
        # ids (B, T); y (B, T, dim), seen as (n,) and (n, dim). PEFT's layout: lora_embedding_A (r, num_embeddings),
        # B (dim, r). Grouped even where rows interleave: an embedding's LoRA term is a lookup, not a matmul
        if not self.row_adapters:
            return y
        ids = args[0].reshape(-1)
        out = y.view(-1, y.shape[-1])
        pad = layer.base_layer.padding_idx
        for name, rows in self._plan(ids.shape[0]).groups:
            ad = layer.adapters[name] if name in layer.adapters else None
            if ad is None:
                continue
            s = ad.scaling * ad.scale
            picked = ids[rows] if isinstance(rows, slice) else ids.index_select(0, rows)
            delta = F.embedding(picked, ad.lora_A.t(), pad) @ ad.lora_B.t()  # (m, dim)
            if isinstance(rows, slice):
                out[rows].add_(delta.to(y.dtype), alpha=s)
            else:
                out.index_add_(0, rows, delta.to(y.dtype), alpha=s)
        return y
