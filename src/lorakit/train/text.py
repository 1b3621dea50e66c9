"""The text task: a causal language model learns the response tokens of chat/alpaca/... records.

Loss: cross-entropy of each label token given everything before it, summed over the batch's label tokens
(prompt and padding positions carry label -100 and add nothing); the loop divides by the step's count.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import RunConfig
from lorakit.data import collate, length_grouped_batches, load_datasets
from lorakit.data.tokenize import IGNORE_INDEX, pad_token_id
from lorakit.device import data_cache_dir, use_bf16
from lorakit.lora import add_lora, save_adapter
from lorakit.model import load_model, load_tokenizer, resolve_model_path


class CausalLMTask:
    """LoRA (or every weight, ``--method full``) on a transformers causal LM; see ``train/task.py``."""

    def __init__(self, cfg: RunConfig):
        t = cfg.train
        # an absolute model path, so config.yaml and adapter_config.json work from any directory
        self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, name_or_path=resolve_model_path(cfg.model.name_or_path)))
        # the tokenizer and the data first: they are cheap and checked before paying for the weights
        self.tokenizer = load_tokenizer(cfg.model.name_or_path)
        self.train_set, self.val_set = load_datasets(cfg.data, self.tokenizer, data_cache_dir(), seed=t.seed)
        self.pad_id = pad_token_id(self.tokenizer)
        self.model = model = load_model(cfg.model, full_training=t.method == "full")
        self.bf16 = use_bf16(t.precision, next(model.parameters()).device)
        if t.method == "lora":
            add_lora(model, cfg.lora)
        model.config.use_cache = False  # the KV cache only helps generation
        if cfg.model.gradient_checkpointing:
            # recompute each block's activations in backward; non-reentrant so frozen inputs still get grads
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()

    def batch_order(self, epoch: int, batch_size: int) -> list[list[int]]:
        return length_grouped_batches(self.train_set, batch_size, self.cfg.train.seed, epoch,
                                      group_by_length=self.cfg.data.group_by_length)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.train_set[i] for i in indices], self.pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, targets = shifted_logits(self.model, batch, self.bf16)
        return F.cross_entropy(logits, targets, reduction="sum")

    def evaluate(self) -> dict[str, float] | None:
        if not self.val_set:
            return None
        return evaluate(self.model, self.val_set, self.cfg.train.batch_size, self.pad_id, self.bf16)

    def save_result(self, folder: Path) -> None:
        """A PEFT adapter for lora; for full, a model folder any HF loader reads."""
        if self.cfg.train.method == "lora":
            save_adapter(self.model, folder, base_model_name_or_path=self.cfg.model.name_or_path)
        else:
            self.model.config.use_cache = True
            self.model.save_pretrained(folder, safe_serialization=True)
            self.model.config.use_cache = False
            self.tokenizer.save_pretrained(folder)


def shifted_logits(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) in fp32, targets (N,)) at the N positions that carry a label: position t predicts
    token t+1, so logits[:, :-1] meet labels[:, 1:]; prompt and padding (-100) are dropped here.

    Only the positions some row of the batch has a label at go through the output head (transformers'
    ``logits_to_keep`` as indices; models without it compute all): with the loss on responses only, most
    positions are prompt, and the head (a V-wide GEMM, then an fp32 log-softmax) is a large part of the
    step on small models (about a fifth of it on the quickstart's 4096-token vocabulary)."""
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
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       **kwargs).logits  # (B, P, V), or (B, T, V) without logits_to_keep
    if not kwargs:
        logits = logits[:, :-1]
    return logits[keep].float(), targets[keep]


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], batch_size: int, pad_id: int, bf16: bool) -> dict[str, float]:
    """Loss per label token over all of ``examples``, its perplexity, and next-token accuracy."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        logits, targets = shifted_logits(model, collate(examples[i:i + batch_size], pad_id), bf16)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(-1) == targets).sum())
        n += targets.numel()
    model.train()
    loss = loss_sum / max(n, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_accuracy": correct / max(n, 1)}

