"""The text task: a causal language model learns the response tokens of chat/alpaca/... records.

Loss: cross-entropy of each label token given everything before it, summed over the batch's label tokens
(prompt and padding positions carry label -100 and add nothing); the loop divides by the step's count.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.config import RunConfig
from lorakit.data import collate, length_grouped_batches, load_datasets
from lorakit.data.tokenize import IGNORE_INDEX, pad_token_id, split_records
from lorakit.device import data_cache_dir
from lorakit.errors import LorakitError
from lorakit.evaluate import answer_scores, predict
from lorakit.lora import add_lora, save_adapter
from lorakit.model import load_model, load_tokenizer, quiet_weight_bars, resolve_model_path
from lorakit.train import fastpath, precision
from lorakit.train.causal_loss import evaluate, shifted_hidden, shifted_logits
from lorakit.train.compile import compile_layers
from lorakit.train.cores import (
    MIN_SLICE_TOKENS,
    CoreSplit,
    batch_backward,
    core_split,
    slice_count,
    split_rows,
)
from lorakit.train.fused_loss import fused_head, linear_cross_entropy


class CausalLMTask:
    """LoRA (or every weight, ``--method full``) on a transformers causal LM; see ``train/task.py``."""

    unit = "tok"

    def __init__(self, cfg: RunConfig):
        t = cfg.train
        # an absolute model path, so config.yaml and adapter_config.json work from any directory
        self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, name_or_path=resolve_model_path(cfg.model.name_or_path)))
        # the tokenizer and the data first: they are cheap and checked before paying for the weights
        self.tokenizer = load_tokenizer(cfg.model.name_or_path)
        self.train_set, self.val_set = load_datasets(cfg.data, self.tokenizer, data_cache_dir(), seed=t.seed)
        self.pad_id = pad_token_id(self.tokenizer)
        self.answer_records, self.answer_format = self._answer_records(t.eval_generate) if self.val_set else ([], "")
        self.model = model = load_model(cfg.model, full_training=t.method == "full")
        if t.method == "lora":
            add_lora(model, cfg.lora)
        model.config.use_cache = False  # the KV cache only helps generation
        if cfg.model.gradient_checkpointing:
            # recompute each block's activations in backward; non-reentrant so frozen inputs still get grads
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        # the step's fast path (train/fastpath.py) and the loss without whole logits (train/fused_loss.py)
        layers = compile_layers(model) if t.compile else fastpath.enable(model)
        # under torchrun every rank decides alone: no probe (ranks could disagree), and FSDP shards the head
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        self.head = None if ranks > 1 and t.strategy == "fsdp" else fused_head(model)
        self._head_cast: tuple | None = None
        self.max_width = getattr(model.config, "max_position_embeddings", None)
        # --precision auto measures where it must (train/precision.py); config.yaml records the choice
        device, weights = next(model.parameters()).device, next(model.parameters()).dtype
        self.slices, threads_each, split_why = self._split_plan(device, ranks)
        # the probe times the step as the loop will run it: split where the loop splits
        self._probe_cores = CoreSplit(self.slices, threads_each) if self.slices > 1 else None
        self.bf16, why = precision.resolve(t.precision, device, weights, self._probe_key(),
                                           self._probe if ranks == 1 else None)
        if self._probe_cores is not None:
            self._probe_cores.close()
        self.pad_multiple = precision.pad_multiple(self.bf16, device)
        self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(t, precision="bf16" if self.bf16 else "fp32"))
        loss = "chunked cross-entropy against the head" if self.head is not None else "cross-entropy on logits"
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank builds the task; one says so
            print(f"step: {'; '.join(filter(None, (layers, loss, f'precision {why}', split_why)))}", file=sys.stderr)

    def _split_plan(self, device: torch.device, ranks: int) -> tuple[int, int, str]:
        """(slices, OpenMP threads per slice) of this run's micro-batches (``train/cores.py``; (1, all
        threads) when not split) and what the step line says of it."""
        t, model = self.cfg.train, self.model
        dropout = self.cfg.lora.dropout > 0 or getattr(model.config, "attention_dropout", 0) or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        refuse = [(device.type != "cpu", "on CPU only"), (ranks > 1, "one process only"),
                  (t.method != "lora", "LoRA only"), (bool(dropout), "no dropout"),
                  (self.cfg.model.quantization != "none", "no quantized base"), (t.compile, "not with --compile"),
                  (self.cfg.model.gradient_checkpointing, "not with gradient checkpointing")]
        why = next((reason for cond, reason in refuse if cond), None)
        threads = torch.get_num_threads()
        parts, threads_each = core_split(threads, t.batch_size)
        if parts < 2:
            return 1, threads, ""
        if why is not None:
            return 1, threads, f"rows not split across cores ({why})"
        widest = max(len(self.train_set[i]["input_ids"]) for i in self._probe_batches()[-1])  # a wide micro-batch
        if slice_count(t.batch_size, t.batch_size * widest, parts) < 2:
            return 1, threads, f"rows not split across cores (micro-batches under {2 * MIN_SLICE_TOKENS} tokens)"
        return parts, threads_each, (f"rows split across cores (up to {parts} slices × {threads_each} "
                                     f"thread{'s' * (threads_each > 1)}, {MIN_SLICE_TOKENS}+ tokens a slice)")

    def _answer_records(self, k: int) -> tuple[list[dict], str]:
        """(the first ``k`` validation records, their format): what ``--eval-generate`` answers at each eval."""
        if k == 0:
            return [], ""
        _, records, fmt = split_records(self.cfg.data, self.cfg.train.seed)
        if fmt == "text":
            raise LorakitError(f"--eval-generate {k}: the validation records are plain text, with no answer to "
                               "compare with; use alpaca, chat or prompt_completion data, or --eval-generate 0")
        return records[:k], fmt

    def _probe_batches(self) -> list[list[int]]:
        """Two micro-batches of epoch 0 for the precision probe: those at the median and the 90th percentile
        of padded width, so the probe sees the run's typical shapes."""
        order = self.batch_order(0, self.cfg.train.batch_size)
        width = sorted(range(len(order)), key=lambda b: max(len(self.train_set[i]["input_ids"]) for i in order[b]))
        return [order[width[len(width) // 2]], order[width[min(len(width) - 1, len(width) * 9 // 10)]]]

    def _probe_key(self) -> dict:
        c, t = self.model.config, self.cfg.train
        shape = {k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                  "intermediate_size", "num_attention_heads",
                                                  "num_key_value_heads", "vocab_size")}
        widths = [max(len(self.train_set[i]["input_ids"]) for i in b) // 16 for b in self._probe_batches()]
        return {"model": shape, "method": t.method, "r": self.cfg.lora.r, "target": str(self.cfg.lora.target_modules),
                "batch": t.batch_size, "width16": widths, "checkpointing": self.cfg.model.gradient_checkpointing,
                "slices": self.slices}

    def _probe(self, bf16: bool) -> tuple[float, float]:
        """(wall, CPU) seconds for forward and backward of the probe micro-batches in bf16 or fp32; no trace left."""
        self.bf16, self.pad_multiple = bf16, precision.pad_multiple(bf16, next(self.model.parameters()).device)
        batches = [self.collate(ids) for ids in self._probe_batches()]
        params = [p for p in self.model.parameters() if p.requires_grad]

        def run() -> None:
            for b in batches:
                batch_backward(self.loss_sum, b, params, max(1, self.count(b)), cores=self._probe_cores,
                               split=self.split)

        seconds = precision.timed(run)
        self.model.zero_grad(set_to_none=True)
        return seconds

    def batch_order(self, epoch: int, batch_size: int) -> list[list[int]]:
        return length_grouped_batches(self.train_set, batch_size, self.cfg.train.seed, epoch,
                                      group_by_length=self.cfg.data.group_by_length)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.train_set[i] for i in indices], self.pad_id, self.pad_multiple, self.max_width)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def split(self, batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]] | None:
        """``batch`` as up to ``parts`` row slices for the cores (``train/cores.py``), or None where slices
        run side by side would not compute what the whole batch does (``_split_plan``: random draws, a
        compiled or checkpointed model, a quantized base), would cost k copies of every weight's gradient
        (full fine-tuning) or would be too small to be worth a thread (``split_rows``)."""
        return split_rows(batch, min(parts, self.slices)) if self.slices > 1 else None

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.head is None:
            logits, targets = shifted_logits(self.model, batch, self.bf16)
            return F.cross_entropy(logits, targets, reduction="sum")
        hidden, targets = shifted_hidden(self.model, self.head, batch, self.bf16)
        return linear_cross_entropy(hidden, self.head_weight(hidden.dtype), targets)

    def head_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The head's weight (V, H) in the compute dtype: a frozen one is cast once, not every step."""
        w = self.head.weight
        if w.dtype == dtype or w.requires_grad:
            return w.to(dtype)
        key = (w._version, w.data_ptr(), dtype)
        if self._head_cast is None or self._head_cast[0] != key:
            self._head_cast = (key, w.detach().to(dtype))
        return self._head_cast[1]

    def evaluate(self) -> dict[str, float] | None:
        if not self.val_set:
            return None
        metrics = evaluate(self.model, self.val_set, self.cfg.train.batch_size, self.pad_id, self.bf16, self.head,
                           self.pad_multiple)
        if self.answer_records:
            # greedy, so nothing random is drawn: a resumed run logs the same numbers
            predictions = predict(self.model, self.tokenizer, self.answer_records, fmt=self.answer_format)
            metrics.update({f"eval_{k}": v for k, v in answer_scores(predictions).items()})
        return metrics

    def save_result(self, folder: Path) -> None:
        """A PEFT adapter for lora; for full, a model folder any HF loader reads."""
        if self.cfg.train.method == "lora":
            save_adapter(self.model, folder, base_model_name_or_path=self.cfg.model.name_or_path)
        else:
            self.model.config.use_cache = True
            with quiet_weight_bars():
                self.model.save_pretrained(folder, safe_serialization=True)
            self.model.config.use_cache = False
            self.tokenizer.save_pretrained(folder)

