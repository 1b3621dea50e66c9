"""The training loss's logits: only labelled positions go through the output head, with the same result."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.train.causal_loss import _takes_logits_to_keep, shifted_logits
from tests.conftest import tiny_gpt2, tiny_llama


class AllLogits(nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: the loop must compute every position."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def batch() -> dict[str, torch.Tensor]:
    """Two rows, right-padded: prompt (-100) then response labels at different places in each row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 9:16] = ids[0, 9:16]
    labels[1, 5:12] = ids[1, 5:12]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]  # (B, T-1, V)
    targets = b["labels"][:, 1:]
    keep = targets != -100
    return logits[keep].float(), targets[keep]


def test_only_labelled_positions_reach_the_head_and_the_loss_is_unchanged():
    model, b = tiny_llama(), batch()
    assert _takes_logits_to_keep(model)
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    with torch.no_grad():
        logits, targets = shifted_logits(model, b, bf16=False)
        ref_logits, ref_targets = reference(model, b)
    # labels sit at positions 9..15 (row 0) and 5..11 (row 1): predicted from positions 4..14, 11 of 16
    assert rows == [11, 16]
    assert torch.equal(targets, ref_targets) and logits.shape == ref_logits.shape == (14, 128)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(F.cross_entropy(logits, targets), F.cross_entropy(ref_logits, ref_targets), atol=1e-6)


def test_models_without_logits_to_keep_compute_every_position():
    for inner in (tiny_llama(), tiny_gpt2()):
        model, b = AllLogits(inner), batch()
        assert not _takes_logits_to_keep(model)
        with torch.no_grad():
            logits, targets = shifted_logits(model, b, bf16=False)
            ref_logits, ref_targets = reference(inner, b)
        assert torch.equal(targets, ref_targets) and torch.allclose(logits, ref_logits, atol=1e-6)


def test_gradients_match_the_full_computation():
    b = batch()
    grads = []
    for fn in (lambda m: shifted_logits(m, b, bf16=False), lambda m: reference(m, b)):
        model = tiny_llama()
        logits, targets = fn(model)
        F.cross_entropy(logits, targets).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
