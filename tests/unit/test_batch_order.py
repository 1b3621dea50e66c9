"""Training batch order: length-grouped (the default) or a seeded random permutation per epoch."""

from __future__ import annotations

import random
from types import SimpleNamespace

from lorakit.data.tokenize import collate, length_grouped_batches
from lorakit.train.loop import BatchStream


def two_lengths(n: int = 400) -> list[dict]:
    """Half the examples 5 tokens long, half 50, in random order: length predicts the answer here."""
    rng = random.Random(1)
    lengths = [5] * (n // 2) + [50] * (n // 2)
    rng.shuffle(lengths)
    return [{"input_ids": [7] * n_tok, "labels": [7] * n_tok} for n_tok in lengths]


def homogeneous(examples: list[dict], batches: list[list[int]]) -> float:
    """Fraction of batches whose examples all have one length."""
    return sum(len({len(examples[i]["input_ids"]) for i in b}) == 1 for b in batches) / len(batches)


def test_random_order_covers_every_example_once_per_epoch_deterministically():
    examples = two_lengths()
    for epoch in (0, 1):
        batches = length_grouped_batches(examples, 8, seed=3, epoch=epoch, group_by_length=False)
        assert sorted(i for b in batches for i in b) == list(range(len(examples)))
        assert all(len(b) == 8 for b in batches)
        assert batches == length_grouped_batches(examples, 8, seed=3, epoch=epoch, group_by_length=False)
    assert (length_grouped_batches(examples, 8, seed=3, epoch=0, group_by_length=False)
            != length_grouped_batches(examples, 8, seed=3, epoch=1, group_by_length=False))
    assert (length_grouped_batches(examples, 8, seed=3, epoch=0, group_by_length=False)
            != length_grouped_batches(examples, 8, seed=4, epoch=0, group_by_length=False))


def test_random_order_mixes_lengths_that_grouping_separates():
    examples = two_lengths()
    grouped = length_grouped_batches(examples, 8, seed=0, epoch=0)
    mixed = length_grouped_batches(examples, 8, seed=0, epoch=0, group_by_length=False)
    assert homogeneous(examples, grouped) > 0.9
    assert homogeneous(examples, mixed) < 0.1  # one length per batch by chance: about 2/2**8
    assert 50 in {len(examples[i]["input_ids"]) for i in mixed[0]}  # the longest still goes first


def stream_of(examples: list[dict], grouped: bool, epoch: int = 0, index: int = 0) -> BatchStream:
    """The loop's stream over a task that is just these examples (the text task's order and collate)."""
    task = SimpleNamespace(batch_order=lambda e, b: length_grouped_batches(examples, b, 5, e, group_by_length=grouped),
                           collate=lambda ids: collate([examples[i] for i in ids], 0))
    return BatchStream(task, 8, epoch, index)


def test_a_stream_resumed_at_its_position_continues_the_same_random_order():
    examples = two_lengths(40)
    stream = stream_of(examples, grouped=False)
    for _ in range(7):  # 5 batches per epoch: into the second epoch
        stream.next()
    assert (stream.epoch, stream.index) == (1, 2)
    resumed = stream_of(examples, grouped=False, epoch=1, index=2)
    for _ in range(6):
        (a, _), (b, _) = stream.next(), resumed.next()
        assert all((a[k] == b[k]).all() for k in a)
    grouped = stream_of(examples, grouped=True, epoch=resumed.epoch)
    assert resumed.batches == length_grouped_batches(examples, 8, 5, resumed.epoch, group_by_length=False)
    assert resumed.batches != grouped.batches
