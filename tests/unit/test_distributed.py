"""The distributed sampler's arithmetic and the command line a torchrun user types, without launching ranks
(tests/e2e/test_distributed.py launches them)."""

from __future__ import annotations

import argparse
import contextlib
import io
from types import SimpleNamespace

import pytest

from lorakit.data.tokenize import collate, length_grouped_batches
from lorakit.train.distributed import Distributed
from lorakit.train.loop import BatchStream
from tests.unit.test_batch_order import two_lengths


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_parts_are_the_batch_in_order_and_balanced(world):
    for n in range(10):
        ids = list(range(100, 100 + n))
        parts = [Distributed(rank=r, world_size=world).shard(ids) for r in range(world)]
        assert [i for part in parts for i in part] == ids
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert all(part or n < world for part in parts)  # empty only with fewer examples than ranks


@pytest.mark.parametrize("grouped", [True, False])
def test_ranks_together_read_what_one_process_with_the_global_batch_reads(grouped):
    """Rank r's micro-batches are its part of the batches one process with batch 2·b reads, epoch after
    epoch; a rank with nothing to read gets a weight-0 stand-in."""
    examples = two_lengths(40) + [{"input_ids": [7] * 9, "labels": [7] * 9}]  # 41 = 5·8 + 1: a 1-example batch
    task = SimpleNamespace(
        batch_order=lambda e, b: length_grouped_batches(examples, b, 5, e, group_by_length=grouped),
        collate=lambda ids: collate([examples[i] for i in ids], 0) | {"ids": ids})
    one = BatchStream(task, 8)
    ranks = [BatchStream(task, 4, dist=Distributed(rank=r, world_size=2)) for r in range(2)]
    stand_ins = 0
    for _ in range(20):  # past three epochs
        (whole, w), parts = one.next(), [s.next() for s in ranks]
        assert w == 1.0
        real = [batch["ids"] for batch, weight in parts if weight == 1.0]
        assert [i for ids in real for i in ids] == whole["ids"]
        stand_ins += sum(weight == 0.0 for _, weight in parts)
        assert all((s.epoch, s.index) == (one.epoch, one.index) for s in ranks)  # one position for all ranks
    assert stand_ins == 3


def test_every_train_flag_reaches_lorakit_through_torchrun():
    """torchrun parses abbreviations of its own options anywhere on the line: `--r 8` is ambiguous there
    (--rdzv-*, --role, --run-path, --redirects), so the LoRA rank also has --lora-r. Every other flag of
    `lorakit train` must pass through untouched, including ones added later."""
    from torch.distributed.run import get_args_parser

    from lorakit.cli import build_parser
    from lorakit.config import load_config

    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flags = [s for a in train._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    torchrun = get_args_parser()
    refused = []
    for flag in flags:
        line = ["--nproc-per-node", "2", "-m", "lorakit", "train", flag, "1"]
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                ns = torchrun.parse_args(line)
        except SystemExit:
            refused.append(flag)
            continue
        assert ns.training_script_args == ["train", flag, "1"], flag
    assert refused == ["--r"]

    ns = torchrun.parse_args(["--nproc-per-node", "2", "-m", "lorakit", "train", "--lora-r", "4"])
    lorakit = train.parse_args(ns.training_script_args[1:])
    assert load_config(None, {k: v for k, v in vars(lorakit).items() if k not in ("config", "func")}).lora.r == 4


def test_fsdp_with_a_quantized_base_is_refused_in_one_line(tmp_path, capsys):
    from lorakit.cli import main

    code = main(["train", "--strategy", "fsdp", "--quantization", "nf4", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--strategy fsdp" in err and "--quantization nf4" in err and "--strategy ddp" in err
    assert not (tmp_path / "out").exists()
