"""train/cores.py: a batch's row slices run side by side give the whole batch's gradients, the same every run."""

from __future__ import annotations

import threading

import torch

import lorakit
from lorakit.train import fastpath
from lorakit.train.causal_loss import shifted_hidden
from lorakit.train.cores import CoreSplit, core_split
from lorakit.train.fused_loss import fused_head, head_as_identity, linear_cross_entropy
from tests.conftest import randomize_lora, tiny_llama


def test_core_split_shares_out_the_threads():
    assert core_split(2, 4) == (2, 1)
    assert core_split(8, 2) == (2, 4)  # more cores than rows: threads per slice
    assert core_split(1, 4) == (1, 1)
    assert core_split(4, 1) == (1, 4)


def test_slices_side_by_side_give_the_batch_gradients_in_a_fixed_order():
    torch.manual_seed(0)
    model = lorakit.add_lora(tiny_llama(layers=2), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model)
    model.train()
    assert fastpath.enable(model).startswith("fused decoder layers")
    head = fused_head(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[3, 20:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(b):
        hidden, targets = shifted_hidden(model, head, b, bf16=False)
        return linear_cross_entropy(hidden, head.weight, targets)

    whole = loss(batch)
    (whole * 0.5).backward()
    expected = [p.grad.clone() for p in params]

    slices = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    threads = torch.get_num_threads()
    split = CoreSplit(2, 1)
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        total = split.backward(loss, slices, params, 2.0)  # / 2: the same as the × 0.5 above, exactly
        runs.append([p.grad.clone() for p in params])
        assert abs(total - whole.item()) <= 1e-4 * abs(whole.item())
    split.close()
    assert torch.get_num_threads() == threads  # the workers' one thread each is theirs alone
    assert "forward" not in head.__dict__  # every slice has left head_as_identity
    for got, want in zip(runs[0], expected, strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max().clamp(min=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))  # bit for bit, run to run


def test_head_as_identity_holds_while_any_thread_is_inside():
    head = torch.nn.Linear(3, 5)
    x = torch.randn(2, 3)
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with head_as_identity(head):
            inside.set()
            leave.wait()

    t = threading.Thread(target=other)
    t.start()
    inside.wait()
    with head_as_identity(head):
        assert torch.equal(head(x), x)
    assert torch.equal(head(x), x)  # the other thread is still inside
    leave.set()
    t.join()
    assert head(x).shape == (2, 5)  # both left: the real head again
