"""Build lorakit's bundled base model from the Python standard library, offline.

Every machine with Python has the same training data on disk: the stdlib's own source files, their
docstrings and the language reference text in `pydoc_data.topics`. This script turns them into

  examples/base-model/   a byte-level BPE tokenizer and a small LlamaForCausalLM (HF folder)
  examples/data/retain.txt  held-out stdlib source, for perplexity and forgetting checks

Plain PyTorch + transformers + tokenizers (not lorakit), fixed seeds and a fixed data order, so a
rerun on the same Python version rebuilds the same model (up to float rounding across CPUs).

    python examples/build_base_model.py            # about 15-20 min on 2 CPU cores
    python examples/build_base_model.py --steps 40 --out /tmp/base-model --retain /tmp/retain.txt
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads of several
# processes starve each other (measured 3.5x faster with 2 threads on an oversubscribed 2-core box).
# Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
SEED = 0
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0..5
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Directories of the stdlib that are not ordinary library source: tests, vendored wheels,
# codec tables (mostly escaped character maps) and third-party packages.
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "_bundled"}
# Held out of tokenizer and model training; their source is the retain/validation text.
HELD_OUT = ["fractions.py", "statistics.py", "textwrap.py"]
RETAIN_CHARS = 80_000
CODE_CHARS_PER_FILE = 24_000  # so a few huge modules (tkinter, _pydecimal) do not dominate
CORPUS_CHARS = 8_000_000


def stdlib_files(root: Path) -> list[Path]:
    """All library `.py` files under the stdlib root, sorted, without tests and site-packages."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def head_lines(text: str, limit: int) -> str:
    """The longest prefix of whole lines of `text` that fits in `limit` characters."""
    if len(text) <= limit:
        return text
    return text[: text.rfind("\n", 0, limit) + 1]


def docstrings(source: str) -> str:
    """The module, class and function docstrings of one source file, as English prose."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a few stdlib files (lib2to3 fixtures) are not valid Python 3
        return ""
    nodes = [tree] + [
        n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    docs = [ast.get_docstring(n, clean=True) for n in nodes]
    return "\n\n".join(d for d in docs if d and len(d) > 40)


def build_corpus(root: Path) -> tuple[list[str], str, dict]:
    """Training documents (code, docstrings, language reference) and the held-out retain text."""
    code, prose, held = [], [], []
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        source = path.read_text(encoding="utf-8", errors="replace")
        if rel in HELD_OUT:
            held.append(source)
            continue
        if rel == "pydoc_data/topics.py":  # escaped string literals; its text is added as prose below
            continue
        code.append(head_lines(source, CODE_CHARS_PER_FILE))
        doc = docstrings(source)
        if doc:
            prose.append(doc)
    import pydoc_data.topics

    prose += [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    docs = code + prose
    random.Random(SEED).shuffle(docs)
    kept, total = [], 0
    for d in docs:
        if total + len(d) > CORPUS_CHARS:
            break
        kept.append(d)
        total += len(d)
    retain = head_lines("\n\n".join(held), RETAIN_CHARS)
    stats = {"files": len(code), "code_docs": len(code), "prose_docs": len(prose), "corpus_chars": total}
    return kept, retain, stats


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with digits split one per token (so numbers are spelled digit by digit)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    # Like Llama: every encoded text starts with <s>; the caller appends </s> where a text ends.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def token_blocks(tok: PreTrainedTokenizerFast, docs: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate `<s> doc </s>` for every doc and cut into rows: (n_blocks, seq_len) int64."""
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(docs):  # the raw tokenizer: no max-length warning
        ids += enc.ids + [tok.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, text: str, seq_len: int) -> float:
    """exp(mean next-token NLL) over the full non-overlapping `seq_len` windows of `<s> text`."""
    model.eval()
    ids = torch.tensor(tok.backend_tokenizer.encode(text).ids)
    n = len(ids) // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)  # (n, T)
    nll = 0.0
    for batch in windows.split(16):  # batched: single rows are very slow on a busy CPU
        nll += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train()
    return math.exp(nll / n)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to peak / 10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def git_commit() -> str:
    """Short hash of the checkout this script runs from, or "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_tokenizer(tok: PreTrainedTokenizerFast, out: Path) -> None:
    """Save with the chat template inside tokenizer_config.json and the portable class name,
    so transformers 4.x loads the folder as well as 5.x."""
    tok.save_pretrained(out, save_jinja_files=False)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def dir_size(path: Path) -> int:
    """Bytes of the weights, configs and tokenizer files in `path` (not the card)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix != ".md")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "base-model")
    ap.add_argument("--retain", type=Path, default=HERE / "data" / "retain.txt")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate-size", type=int, default=688)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    random.seed(SEED)

    root = Path(sysconfig.get_paths()["stdlib"])
    docs, retain, corpus_stats = build_corpus(root)
    args.retain.parent.mkdir(parents=True, exist_ok=True)
    args.retain.write_text(retain, encoding="utf-8")
    print(f"corpus: {len(docs)} docs, {corpus_stats['corpus_chars'] / 1e6:.2f} M chars; "
          f"retain: {len(retain) / 1e3:.0f} KB -> {args.retain}", flush=True)

    tok = train_tokenizer(docs, args.vocab_size)
    blocks = token_blocks(tok, docs, args.seq_len)
    n_tokens = blocks.numel()
    print(f"tokenizer: vocab {len(tok)}, {corpus_stats['corpus_chars'] / n_tokens:.2f} chars/token; "
          f"{n_tokens / 1e6:.2f} M training tokens ({time.time() - t_start:.0f}s)", flush=True)

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M params", flush=True)

    # Weight decay on matrices only (not norms), as is usual for transformers.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(blocks), generator=gen)
    pos, losses, loads = 0, [], []
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        if pos + args.batch_size > len(order):  # next epoch, freshly shuffled
            order, pos = torch.randperm(len(blocks), generator=gen), 0
        batch = blocks[order[pos : pos + args.batch_size]]  # (B, T)
        pos += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.time() - t_train
            seen = (step + 1) * batch.numel()
            loads.append(os.getloadavg()[0])  # the times below depend on what else runs
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {group['lr']:.2e}  "
                  f"{elapsed:6.0f}s  {seen / elapsed:.0f} tok/s", flush=True)
    train_seconds = time.time() - t_train
    tokens_seen = args.steps * args.batch_size * args.seq_len
    final_loss = sum(losses[-20:]) / len(losses[-20:])

    ppl = perplexity(model, tok, retain, args.seq_len)
    print(f"retain perplexity {ppl:.2f}  (final train loss {final_loss:.3f})", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(args.out)  # safetensors
    save_tokenizer(tok, args.out)
    figures = {
        "python": sys.version.split()[0],
        "params": n_params,
        "vocab_size": len(tok),
        "corpus_docs": len(docs),
        "corpus_chars": corpus_stats["corpus_chars"],
        "corpus_tokens": n_tokens,
        "tokens_seen": tokens_seen,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "peak_lr": args.lr,
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_seen / train_seconds),
        "final_train_loss": round(final_loss, 4),
        "retain_perplexity": round(ppl, 3),
        "retain_chars": len(retain),
        "load_average": round(sum(loads) / len(loads), 1),
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    figures["size_bytes"] = dir_size(args.out)
    figures["total_seconds"] = round(time.time() - t_start, 1)
    (args.out / "build_info.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(figures, config, args))
    print(json.dumps(figures, indent=2))
    print(f"wrote {args.out} ({figures['size_bytes'] / 1e6:.1f} MB) in {figures['total_seconds']:.0f}s")


def model_card(f: dict, config: LlamaConfig, args: argparse.Namespace) -> str:
    """The Markdown model card with the measured figures."""
    held_out = "`, `".join(HELD_OUT)
    return f"""# lorakit tiny stdlib base model

A small Llama-architecture causal language model trained from scratch, offline, on the Python
standard library: its source files, its docstrings and the language reference text that ships in
`pydoc_data.topics`. It exists so that lorakit's quickstart, examples and tests can fine-tune a
real pretrained model on a laptop CPU with no network. It writes Python-like text; it is not an
assistant and knows nothing beyond the stdlib.

**A demonstration model for its own task.** At 4.2M parameters it learns the bundled task (naming the
type of a Python literal, `examples/data/task_*.jsonl`) and little else: it cannot pick up facts or a
general skill from a small home-made dataset (see Limitations). For real work, fine-tune your own base
with `--model` (a Hugging Face model folder or hub id), e.g. `lorakit train --model
Qwen/Qwen2.5-0.5B-Instruct --data my.jsonl`.

## Architecture

| | |
|---|---|
| class | `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU MLP, tied input/output embeddings) |
| hidden size | {config.hidden_size} |
| layers | {config.num_hidden_layers} |
| attention heads | {config.num_attention_heads} (head dim {config.hidden_size // config.num_attention_heads}, no GQA) |
| MLP intermediate size | {config.intermediate_size} |
| context length | {config.max_position_embeddings} tokens |
| vocabulary | {f['vocab_size']} (byte-level BPE, digits split one per token) |
| parameters | {f['params']:,} ({f['params'] / 1e6:.2f} M) |
| weights | `model.safetensors`, float32 |
| size on disk | {f['size_bytes'] / 1e6:.1f} MB (weights, configs, tokenizer) |

LoRA target names: `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`.

## Tokenizer

Byte-level BPE trained with the `tokenizers` library on the same corpus, saved as a
`PreTrainedTokenizerFast` (`AutoTokenizer.from_pretrained("examples/base-model")` works offline).
Special tokens: `<unk>`=0, `<s>`=1 (bos, prepended to every encoded text), `</s>`=2 (eos),
`<pad>`=3, `<|im_start|>`=4, `<|im_end|>`=5. `tokenizer_config.json` carries a ChatML
`chat_template`; the generation config stops on `</s>` or `<|im_end|>`. The chat tokens were never
seen in pretraining, so chat formats must be learned by fine-tuning.

Instruction data for lorakit's examples uses the alpaca prompt, the response followed by `</s>`:

```
### Instruction:
{{instruction}}

### Input:
{{input}}

### Response:
{{output}}</s>
```

(without the `### Input:` block when the input is empty).

## Training data

Python {f['python']} standard library (`sysconfig.get_paths()["stdlib"]`), files in sorted order,
skipping `test/`, `tests/`, `idle_test/`, `site-packages/`, `encodings/` (codec tables) and
`ensurepip/_bundled/`. Each source file contributes its first {CODE_CHARS_PER_FILE // 1000} KB of
code plus, as a separate English document, its module/class/function docstrings; the files
`{held_out}` are held out entirely. Documents are shuffled with seed {SEED} and capped at
{CORPUS_CHARS / 1e6:.0f} M characters: {f['corpus_docs']} documents, {f['corpus_chars'] / 1e6:.2f} M
characters, {f['corpus_tokens'] / 1e6:.2f} M tokens.

`examples/data/retain.txt` is the first {f['retain_chars'] / 1e3:.0f} KB of the held-out files:
pretraining-style text the model never saw, used to measure perplexity and forgetting.

## Training

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak learning rate {f['peak_lr']:g}, linear
warmup over {max(1, f['steps'] // 20)} steps then cosine decay to a tenth, gradient clipping 1.0;
{f['steps']} steps of {f['batch_size']} x {f['seq_len']} tokens = {f['tokens_seen'] / 1e6:.2f} M tokens
seen, on {f['threads']} CPU threads (torch {f['torch']}).

| figure | value |
|---|---|
| training time | {f['train_seconds'] / 60:.1f} min ({f['tokens_per_second']} tokens/s) |
| whole build (data, tokenizer, training, eval) | {f['total_seconds'] / 60:.1f} min |
| final train loss (mean of last 20 steps) | {f['final_train_loss']:.3f} |
| held-out perplexity on `retain.txt` | {f['retain_perplexity']:.2f} |

The times were measured with a load average of {f['load_average']:g} on the build machine (other
jobs shared its CPUs); on {f['threads']} otherwise idle cores the same build runs about 3x faster.
The same figures are in `build_info.json`.

## Limitations

Trained on about a million tokens, the model has no reliable copying or lookup circuits. With LoRA
(r=16, all linear layers, batch 16, 300-500 steps) it learned neither to repeat a 3-5 digit number
nor to spell a number 0-9999 in words (0% exact match), where a full fine-tune reached 53% on the
latter in 400 steps. A knowledge task (country -> capital) stayed near zero: 0% exact match after
150 LoRA steps, 3.3% after 1,000. Tasks that depend on which kinds of tokens the input contains
(brackets, quotes, number shapes), such as the bundled `examples/data/task_*.jsonl`, are learned quickly.

## Rebuild

From the repository root (built from commit `{f['commit']}`):

```
python examples/build_base_model.py
```

Defaults: `--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr:g} --vocab-size
{args.vocab_size} --hidden-size {args.hidden_size} --layers {args.layers} --heads {args.heads}
--intermediate-size {args.intermediate_size} --threads {args.threads}`. Seeds and data order are
fixed; the result depends on the Python version (the corpus is its stdlib) and may differ in the
last float bits across CPUs and torch versions.

## License

The training data is the Python standard library, licensed under the Python Software Foundation
License (PSF-2.0); the weights are a derivative of it and are distributed under the same terms.
The build script is part of lorakit (Apache-2.0).
"""


if __name__ == "__main__":
    main()
