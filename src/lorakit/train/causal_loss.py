"""The causal LM's outputs at its labelled positions, and the loss there: what training minimises and what
``lorakit eval`` and each training eval report as the label loss (``evaluate``).

Position t predicts token t+1; prompt and padding positions carry the label -100 and are left out before the
output head where the model allows it (``logits_to_keep``), or the head is applied a chunk at a time by the
fused loss (``train/fused_loss.py``).
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data import collate
from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.train.fused_loss import head_as_identity, linear_cross_entropy_eval


def shifted_hidden(model: nn.Module, head: nn.Module, batch: dict[str, torch.Tensor],
                   bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states (N, H) in the compute dtype, targets (N,)): what ``head`` would turn into
    ``shifted_logits``, for a loss that applies the head itself (``fused_head``). The model's own forward
    runs with the head as the identity, so wrappers' hooks on it (DDP) and ``logits_to_keep`` still apply."""
    with head_as_identity(head):
        hidden, targets = _labelled_outputs(model, batch, bf16)
    return hidden.to(torch.bfloat16 if bf16 else hidden.dtype), targets


def shifted_logits(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) in fp32, targets (N,)) at the N positions that carry a label: position t predicts
    token t+1, so logits[:, :-1] meet labels[:, 1:]; prompt and padding (-100) are dropped here.

    Only the positions some row of the batch has a label at go through the output head (transformers'
    ``logits_to_keep`` as indices; models without it compute all): with the loss on responses only, most
    positions are prompt, and the head (a V-wide GEMM, then an fp32 log-softmax) is a large part of the
    step on small models (about a fifth of it on the quickstart's 4096-token vocabulary)."""
    logits, targets = _labelled_outputs(model, batch, bf16)
    return logits.float(), targets


def _labelled_outputs(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's ``.logits`` output (N, ·), targets (N,)) at the N labelled positions."""
    device = next(model.parameters()).device
    targets = batch["labels"][:, 1:].to(device)  # (B, T-1)
    keep = targets != IGNORE_INDEX
    kwargs = {}
    if _takes_logits_to_keep(model):
        positions = keep.any(0).nonzero().squeeze(1)  # (P,) sequence positions whose logits are needed
        kwargs["logits_to_keep"] = positions
        targets, keep = targets[:, positions], keep[:, positions]  # (B, P)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    **kwargs).logits  # (B, P, ·), or (B, T, ·) without logits_to_keep
    if not kwargs:
        out = out[:, :-1]
    return out[keep], targets[keep]


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], batch_size: int, pad_id: int, bf16: bool,
             head: nn.Linear | None = None, pad_multiple: int = 1) -> dict[str, float]:
    """Loss per label token over all of ``examples``, its perplexity, and next-token accuracy; with ``head``
    (``fused_head``) the logits are made a chunk of rows at a time."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, pad_multiple,
                        getattr(model.config, "max_position_embeddings", None))
        if head is not None:
            hidden, targets = shifted_hidden(model, head, batch, bf16)
            batch_loss, batch_correct = linear_cross_entropy_eval(hidden, head.weight, targets)
            loss_sum += batch_loss
            correct += batch_correct
        else:
            logits, targets = shifted_logits(model, batch, bf16)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(-1) == targets).sum())
        n += targets.numel()
    model.train()
    loss = loss_sum / max(n, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_accuracy": correct / max(n, 1)}
