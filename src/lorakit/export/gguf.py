"""GGUF for llama.cpp, Ollama and LM Studio, written with the ``gguf`` package (no llama.cpp checkout).

    OUT/<base>.<f32|f16|bf16|q8_0|q4_0>.gguf    the base: llama.cpp's tensor names and hyper-parameters, the
                                                tokenizer (its pre-tokenizer name checked, below) and chat template
    OUT/<adapter>.lora.gguf                     per adapter: general.type=adapter, adapter.type=lora,
                                                adapter.lora.alpha; <tensor>.lora_a (r, in), <tensor>.lora_b (out, r)
    OUT/<adapter>.merged.<dtype>.gguf           --merge instead: the adapter folded in, one file
    OUT/Modelfile[.<adapter>]                   Ollama: FROM the base, ADAPTER the LoRA, TEMPLATE the chat

llama.cpp's Llama RoPE rotates interleaved pairs (x₀,x₁),(x₂,x₃)…, Hugging Face's rotates halves (xᵢ, xᵢ₊d/2),
so llama.cpp's converter permutes each head's rows of W_q and W_k (``rope_permute``). A LoRA update changes
those rows too: P·(W + s·B·A) = P·W + s·(P·B)·A, so lora_B of q_proj/k_proj gets the same row permutation
and lora_A stays. Qwen2 uses the half-split (NEOX) rotation in llama.cpp too: nothing is permuted.

The tokenizer: llama.cpp re-implements each known pre-tokenizer (the regex that splits text before BPE)
and picks one by the name in ``tokenizer.ggml.pre``. convert_hf_to_gguf.py guesses that name from a hash of
one test string; here each candidate is written into a vocabulary-only GGUF and *checked*: llama.cpp must
tokenize the run's prompts and a set of edge-case texts exactly as the Hugging Face tokenizer does. A
prompt tokenized differently fails the parity check; an edge case is reported (SentencePiece-style
vocabularies: llama.cpp always adds the leading "▁", Hugging Face's Metaspace not before a leading space).
Without llama.cpp installed the name is inferred from tokenizer.json alone and the report says so.

An adapter trained on a GGUF base (``lorakit_base.json``) is written for that very file: no base is
re-exported, the Modelfile's FROM is the file, the LoRA's tensor names and shapes are checked against it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lorakit.errors import LorakitError
from lorakit.export import Exported, ExportJob, Written
from lorakit.export.source import LoraWeight, Source, load_source

# transformers model_type -> llama.cpp architecture; whether its q/k rows get llama.cpp's RoPE permutation
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
SUPPORTED = "Llama, Mistral, Qwen2"
BLOCK = 32  # q8_0 / q4_0 quantize rows in blocks of 32 values

# llama.cpp pre-tokenizer names to try, most common first; names sharing one regex are listed once
PRE_TOKENIZERS = ("gpt-2", "llama3", "qwen2", "smollm", "deepseek-llm", "deepseek-coder", "falcon", "mpt",
                  "dbrx", "stablelm2", "olmo", "command-r", "tekken", "gpt-4o", "bloom", "default")
# Texts the pre-tokenizer must split as Hugging Face does: llama.cpp's own check string (whitespace runs,
# emoji, digit runs, CJK, contractions) and more; the parity prompts are added to these.
CHECK_TEXTS = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "Hello world", " Hello world", "Hello World", "HELLO, WORLD!", "hello\n\nworld\n", "  leading and trailing  ",
    "def f(x):\n    return {'a': [1, 2.5, -3e-4], \"b\": (True, None)}\n",
    "x=1;y=22;z=333\t# tabs\tand\ttext", "I'm, you're, it's, we'll, they'd, I've; DON'T", "naïve café déjà vu",
    "Ünïcödé — “quotes” ‘single’ … ellipsis", "1234567890 0.001 1e10 12,345,678 $5.99 100%",
    "https://example.com/path?q=1&r=two#frag", "email@example.org", "C++ / C# / F#", "a\r\nb\rc",
    "日本語のテキスト、句読点。", "한국어 텍스트", "emoji 👍🏽 👨‍👩‍👧 flags 🇺🇸", "   ", "\t", "\n\n\n",
)


@dataclass
class Vocab:
    """Tokenizer metadata in llama.cpp's terms."""

    model: str                     # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    tokens: list[Any]
    types: list[int]
    scores: list[float] | None
    special: Any                   # gguf.SpecialVocab: merges, bos/eos/unk/pad ids, add_bos, chat template
    pre: str = "default"


# --- architecture and names ---------------------------------------------------------------------------


def check_base(config: Any, where: str, modules: dict[str, list[str]]) -> None:
    """One line, before anything is loaded, for a base or adapter this format cannot express."""
    gguf_arch(config, where)
    if getattr(config, "tie_word_embeddings", False):
        for name, paths in modules.items():
            tied = [p for p in paths if p.endswith(("embed_tokens", "lm_head"))]
            if tied:
                raise LorakitError(f"adapter {name} on {tied[0]}: the base ties its embeddings to the output head, "
                                   "and llama.cpp cannot apply a LoRA to one of the two; export with --merge")


def gguf_arch(config: Any, where: str) -> tuple[str, bool]:
    """(llama.cpp architecture, permute q/k) for a transformers config, or one line naming what is supported."""
    found = ARCHITECTURES.get(getattr(config, "model_type", None))
    if found is None:
        name = (getattr(config, "architectures", None) or [getattr(config, "model_type", "unknown")])[0]
        raise LorakitError(f"{where}: architecture {name} is not supported by lorakit export --format gguf "
                           f"(supported: {SUPPORTED}); try --format onnx or --format merged")
    return found


def rope_permute(w: Tensor, n_head: int) -> Tensor:
    """Rows of a head-major projection (n_head·d, …), HF's half-split rotary order -> llama.cpp's
    interleaved one, within each head: row h·d + i·2 + j  <-  row h·d + j·d/2 + i. For W_q/W_k (out, in)
    and for their lora_B (out, r) alike."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute_heads(config: Any, hf_name: str) -> int | None:
    """The head count whose RoPE permutation ``hf_name`` (a q/k projection weight) needs, else None."""
    if hf_name.endswith("q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _name_map(arch: str, n_layers: int) -> Any:
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_enum, n_layers)


def _gguf_name(name_map: Any, hf_name: str) -> str:
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise LorakitError(f"tensor {hf_name} has no llama.cpp name (an architecture variant lorakit export does "
                           f"not know; supported: {SUPPORTED})")
    return name


# --- hyper-parameters and the tokenizer -----------------------------------------------------------------


def _rope(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None)
    if not params:  # transformers < 5: rope_theta and rope_scaling are separate attributes
        params = {**(getattr(config, "rope_scaling", None) or {}), "rope_theta": getattr(config, "rope_theta", 1e4)}
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(w: Any, config: Any, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = _rope(config)
    w.add_rope_freq_base(float(rope.get("rope_theta", 1e4)))
    kind = rope["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):  # llama3's scaling is the rope_freqs tensor (_llama3_rope_factors)
        raise LorakitError(f"rope_type {kind!r} is not supported by lorakit export --format gguf (default, linear "
                           "and llama3 are)")


def _llama3_rope_factors(config: Any) -> Tensor | None:
    """Llama 3.1's frequency-dependent RoPE scaling as llama.cpp's rope_freqs tensor (head_dim/2,), the
    convert_hf_to_gguf.py formula; None for other RoPE types."""
    rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (float(rope.get("rope_theta", 1e4)) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def build_vocab(source: Source) -> Vocab:
    """The tokenizer as llama.cpp stores it. Byte-level BPE (GPT-2 style: Llama 3, Qwen2, SmolLM) becomes
    "gpt2", SentencePiece-style BPE with byte fallback (Llama 2, Mistral) "llama"; the pre-tokenizer name is
    left to ``choose_pretokenizer``."""
    import json

    import gguf

    logging.getLogger("gguf").setLevel(logging.ERROR)  # its notes on tokenizer.json's pair template are noise here
    folder = Path(source.folder)
    tok_json = folder / "tokenizer.json"
    if not tok_json.is_file():
        raise LorakitError(f"{folder}: no tokenizer.json; lorakit export --format gguf reads fast tokenizers only "
                           "(save the tokenizer with transformers to write one)")
    spec = json.loads(tok_json.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    n_vocab = source.config.vocab_size
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.chat_template = getattr(source.tokenizer, "chat_template", None) or special.chat_template
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        tokens, types, scores = _spm_tokens(source.tokenizer, model, n_vocab)
        special.merges = []  # llama.cpp's SentencePiece-style tokenizer merges by score, not by merge list
        return Vocab("llama", tokens, types, scores, special)
    if model.get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        tokens, types = _bpe_tokens(source.tokenizer, n_vocab)
        return Vocab("gpt2", tokens, types, None, special)
    raise LorakitError(f"{tok_json}: a {model.get('type')} tokenizer without byte-level decoding; lorakit export "
                       "--format gguf writes byte-level BPE (Llama 3, Qwen2) and byte-fallback BPE (Llama 2, Mistral)")


def _bpe_tokens(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Byte-level BPE tokens and their llama.cpp types: added special tokens CONTROL, other added tokens
    USER_DEFINED (pre-normalized, as llama.cpp expects), ids the tokenizer lacks UNUSED padding."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            token = added[i]
            text = token.content
            if not token.normalized:
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            looks_special = text.startswith("<|") and text.endswith("|>")
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if token.special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _spm_tokens(tokenizer: Any, model: dict, n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    """SentencePiece-style BPE (byte fallback) for llama.cpp's "llama" tokenizer, which merges the adjacent
    pair whose result scores highest. Hugging Face's BPE merges the pair ranked first in its merge list, so
    each merge result scores minus its rank: the same merges in the same order. (gguf's LlamaHfVocab gives
    every token -1000, which made llama.cpp split 6 of 27 check texts differently here.)"""
    import gguf

    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges") or []]
    rank: dict[str, int] = {}
    for i, (a, b) in enumerate(merges):
        rank.setdefault(a + b, i)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            if i in added:
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank[text]) if text in rank else -float(len(merges) + i))
    return tokens, [int(t) for t in types], scores


def _write_vocab(w: Any, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    vocab.special.add_to_gguf(w, quiet=True)


def pretokenizer_candidates(source: Source, arch: str, vocab: Vocab) -> list[str]:
    """Names worth trying, the likeliest first: a SentencePiece-style vocabulary has none ("default");
    tokenizer.json's own pre_tokenizer hints at the family."""
    if vocab.model == "llama":
        return ["default"]
    import json

    spec = json.loads((Path(source.folder) / "tokenizer.json").read_text(encoding="utf-8"))
    text = json.dumps(spec.get("pre_tokenizer") or {})
    hints = []
    if arch == "qwen2":
        hints.append("qwen2")
    if '"individual_digits": true' in text:
        hints += ["smollm", "qwen2"]
    if "\\\\p{N}{1,3}" in text:
        hints.append("llama3")
    return list(dict.fromkeys(hints + list(PRE_TOKENIZERS)))


def choose_pretokenizer(source: Source, arch: str, vocab: Vocab, prompts: list[str], tmp: Path) -> tuple[str, str, bool]:
    """(name, how it was checked, whether the prompts tokenize alike): the candidate with which llama.cpp
    tokenizes the most texts exactly as the Hugging Face tokenizer does — the prompts (the run's own data)
    first, then ``CHECK_TEXTS`` (edge cases: whitespace runs, digits, emoji, scripts). Without llama.cpp, the
    likeliest candidate, marked unchecked."""
    from lorakit.export.parity import llama_cpp_tokenizer, runtime_missing

    candidates = pretokenizer_candidates(source, arch, vocab)
    missing = runtime_missing("llama.cpp")
    if missing:
        return candidates[0], f"not checked: {missing}", True
    prompts = list(dict.fromkeys(prompts))
    edge = [t for t in dict.fromkeys(CHECK_TEXTS) if t not in prompts]

    def hf(t: str) -> list[int]:
        return source.tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]

    expected = {t: hf(t) for t in prompts + edge}
    best: tuple[int, int, str, list[str]] = (-1, -1, candidates[0], [])
    for name in candidates:
        vocab.pre = name
        path = tmp / f".vocab-{name}.gguf"
        _write_file(path, arch, source.config, vocab, [], "vocab check", file_type=None)
        try:
            tokenize = llama_cpp_tokenizer(path)
        except RuntimeError:  # a name this llama.cpp build does not know
            continue
        finally:
            path.unlink(missing_ok=True)
        differ = [t for t in prompts + edge if tokenize(t) != expected[t]]
        score = (sum(t not in differ for t in prompts), sum(t not in differ for t in edge), name, differ)
        if not differ:
            return name, f"checked: llama.cpp tokenizes all {len(prompts)} prompts and {len(edge)} edge-case texts " \
                         "as Hugging Face does", True
        best = max(best, score, key=lambda b: b[:2])
    n_prompts, n_edge, name, differ = best
    vocab.pre = name
    how = (f"checked: llama.cpp tokenizes {max(n_prompts, 0)}/{len(prompts)} prompts and {max(n_edge, 0)}/{len(edge)} "
           f"edge-case texts as Hugging Face does; differs on e.g. {differ[0][:40]!r}" if differ else "")
    return name, how, n_prompts == len(prompts)


# --- tensors ------------------------------------------------------------------------------------------


def _encode(name: str, t: Tensor, kind: str) -> tuple[np.ndarray, Any, str | None]:
    """(data, GGML type, why it stayed 16-bit) for one tensor in the requested ``kind``. 1-D tensors (norms,
    biases) stay f32 as llama.cpp's converter keeps them; q8_0/q4_0 need rows of whole 32-value blocks, others
    stay f16; with q4_0 the token embeddings and output head get q8_0 (they suffer most from 4 bits)."""
    import gguf
    from gguf.quants import quantize

    q = gguf.GGMLQuantizationType
    a = t.detach().float().contiguous().numpy()
    if a.ndim == 1 or kind == "f32":
        return a, q.F32, None
    if kind == "f16":
        return a.astype(np.float16), q.F16, None
    if kind == "bf16":
        return quantize(a, q.BF16), q.BF16, None
    if a.shape[-1] % BLOCK:
        return a.astype(np.float16), q.F16, f"{name} {tuple(a.shape)}: rows of {a.shape[-1]} are not whole blocks of {BLOCK}"
    qtype = q.Q8_0 if kind == "q8_0" or name in ("token_embd.weight", "output.weight") else q.Q4_0
    return quantize(a, qtype), qtype, None


def _file_type(kind: str) -> int:
    import gguf

    f = gguf.LlamaFileType
    return {"f32": f.ALL_F32, "f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0,
            "q4_0": f.MOSTLY_Q4_0}[kind]


def base_tensors(state: dict[str, Tensor], config: Any, arch: str, permute: bool) -> Iterator[tuple[str, Tensor]]:
    """(llama.cpp name, tensor) for every weight of a Hugging Face Llama-family state dict."""
    name_map = _name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    factors = _llama3_rope_factors(config)
    if factors is not None:
        yield "rope_freqs.weight", factors
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        heads = _permute_heads(config, hf_name) if permute else None
        yield _gguf_name(name_map, hf_name), rope_permute(t, heads) if heads else t


def lora_tensors(weights: list[LoraWeight], config: Any, arch: str, permute: bool,
                 alpha: float) -> Iterator[tuple[str, Tensor]]:
    """(name.lora_a, A) and (name.lora_b, B) per adapted module, in llama.cpp's layout and scale convention.

    llama.cpp scales each module by alpha / r (r = that module's rank) times the user's scale; a module whose
    scaling differs (rsLoRA's alpha/√r, PEFT's alpha_pattern) has the difference folded into B. Token
    embeddings: llama.cpp looks rows up in A, so it wants A as (num_embeddings, r) — PEFT's transposed."""
    name_map = _name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for w in weights:
        target = _gguf_name(name_map, f"{w.path}.weight")
        if tied and target in ("token_embd.weight", "output.weight"):
            raise LorakitError(f"adapter on {w.path}: the base ties its embeddings to the output head, and llama.cpp "
                               "cannot apply a LoRA to one of the two; export with --merge")
        b = w.b * (w.scaling * w.r / alpha)
        heads = _permute_heads(config, f"{w.path}.weight") if permute else None
        if heads:
            b = rope_permute(b, heads)
        yield f"{target}.lora_a", w.a.t().contiguous() if w.embedding else w.a
        yield f"{target}.lora_b", b


def _write_file(path: Path, arch: str, config: Any, vocab: Vocab | None, tensors: Iterable[tuple[str, Tensor]],
                name: str, file_type: str | None, tensor_kind: str | None = None,
                adapter_alpha: float | None = None) -> list[str]:
    """One GGUF file, written to a temporary name and renamed. Returns the notes (tensors kept 16-bit)."""
    import gguf

    tmp = path.with_name(f".tmp-{path.name}")
    w = gguf.GGUFWriter(str(tmp), arch)
    kept: list[str] = []
    try:
        if adapter_alpha is not None:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_name(name)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter_alpha))
        else:
            _write_hparams(w, config, name)
            if file_type is not None:
                w.add_file_type(_file_type(file_type))
                w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if vocab is not None:
            _write_vocab(w, vocab)
        for tname, t in tensors:
            data, qtype, why = _encode(tname, t, tensor_kind or "f32")
            if why:
                kept.append(why)
            w.add_tensor(tname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return kept


def _gguf_base_info(path: Path) -> tuple[str, str, dict[str, tuple[int, ...]]]:
    """(architecture, weight type, {tensor name: numpy-order shape}) of an existing GGUF file; the weight type
    is its 2-D tensors' most common type (f32, f16, q4_1, ...)."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    kinds = Counter(t.tensor_type.name.lower() for t in reader.tensors if len(t.shape) == 2)
    return arch, kinds.most_common(1)[0][0], {t.name: tuple(int(d) for d in reversed(t.shape.tolist()))
                                             for t in reader.tensors}


def _check_against(tensors: list[tuple[str, Tensor]], base: dict[str, tuple[int, ...]], base_path: Path) -> None:
    """Each LoRA tensor must name a tensor of the base file and fit its shape (out, in)."""
    for name, t in tensors:
        target = name.rsplit(".", 1)[0]
        if target not in base:
            raise LorakitError(f"{base_path}: has no tensor {target} for the adapter's {name}; the adapter was not "
                               "trained on this file")
        out_in = base[target]
        fits = t.shape[1] == out_in[1] if name.endswith("lora_a") else t.shape[0] == out_in[0]
        if not name.startswith("token_embd") and not fits:
            raise LorakitError(f"{base_path}: {target} has shape {out_in}, the adapter's {name} {tuple(t.shape)}")


# --- the export -----------------------------------------------------------------------------------------


def export(job: ExportJob) -> Exported:
    from lorakit.export.ollama import modelfile
    from lorakit.export.parity import GgufTarget, gguf_check, parity_prompts, run_data_format

    source = load_source(job, check_base)
    config, out = source.config, job.workdir
    arch, permute = gguf_arch(config, source.base)
    kind = job.quantize or job.dtype
    lora_kind = job.dtype if job.dtype != "bf16" else "f16"
    stem = _stem(source.base)
    written: list[Written] = []
    notes: list[str] = []
    targets: list[GgufTarget] = []
    problems: list[str] = []
    prompts = parity_prompts(job, source.tokenizer)

    if job.merge:
        adapter = job.adapters[0].name
        path = out / f"{adapter}.merged.{kind}.gguf"
        vocab = _checked_vocab(source, arch, prompts, out, notes, problems)
        kept = _write_file(path, arch, config, vocab, base_tensors(source.merged_state_dict(adapter), config, arch,
                                                                   permute), f"{stem} + {adapter}", kind, kind)
        written.append(Written(path, f"{stem} with {adapter} merged ({kind})", "merged"))
        notes += _kept_note(kept, kind)
        targets.append(GgufTarget(path, [], adapter, f"merged {adapter}"))
        base_file = path
    else:
        if source.gguf_file is not None:
            base_file = source.gguf_file
            notes.append(f"the adapters were trained on the GGUF file {base_file} (SHA-256 checked): they are "
                         "written for it, the base is not re-exported")
        else:
            base_file = out / f"{stem}.{kind}.gguf"
            vocab = _checked_vocab(source, arch, prompts, out, notes, problems)
            kept = _write_file(base_file, arch, config, vocab, base_tensors(source.base_state_dict(), config, arch,
                                                                            permute), stem, kind, kind)
            written.append(Written(base_file, f"base model ({kind})", "base"))
            notes += _kept_note(kept, kind)
        targets.append(GgufTarget(base_file, [], None, "base"))
        for a in job.adapters:
            weights = source.lora_weights(a.name)
            alpha = _alpha(a.path, weights)
            tensors = list(lora_tensors(weights, config, arch, permute, alpha))
            if source.gguf_file is not None:
                base_arch, _, shapes = _gguf_base_info(source.gguf_file)
                if base_arch != arch:
                    raise LorakitError(f"{source.gguf_file}: architecture {base_arch}, the adapter's base {arch}")
                _check_against(tensors, shapes, source.gguf_file)
            path = out / f"{a.name}.lora.gguf"
            _write_file(path, arch, config, None, tensors, a.name, None, lora_kind, adapter_alpha=alpha)
            written.append(Written(path, f"LoRA adapter {a.name} (r={weights[0].r}, {len(weights)} modules, "
                                         f"{lora_kind})", "adapter"))
            targets.append(GgufTarget(base_file, [path], a.name, f"base + {a.name}"))
    for a in job.adapters:
        name = "Modelfile" if len(job.adapters) == 1 else f"Modelfile.{a.name}"
        lora = None if job.merge else f"./{a.name}.lora.gguf"
        frm = str(base_file) if source.gguf_file is not None and not job.merge else f"./{base_file.name}"
        text, note = modelfile(frm, lora, source.tokenizer, run_data_format(a.path))
        (out / name).write_text(text)
        written.append(Written(out / name, f"Ollama Modelfile for {a.name}" + (f" ({note})" if note else "")))
        if job.merge:
            break
    if source.gguf_file is not None and not job.merge:  # the file's own weights, with LoRA files in lora_kind
        kind = f"{_gguf_base_info(source.gguf_file)[1]} base {source.gguf_file.name}, LoRA {lora_kind}"
    exact = kind.split(" ")[0] in ("f32", "f16")
    return Exported(written, notes, check=lambda final: gguf_check(source, _moved(targets, out, final), prompts,
                                                                     exact, kind, problems),
                    base_bytes=source.gguf_file.stat().st_size if source.gguf_file else None)


def _moved(targets: list, workdir: Path, final: Path) -> list:
    """The parity targets with paths in the hidden work folder moved to the final output folder."""
    from lorakit.export.parity import GgufTarget

    def move(p: Path) -> Path:
        return final / p.relative_to(workdir) if p.is_relative_to(workdir) else p

    return [GgufTarget(move(t.base), [move(p) for p in t.loras], t.adapter, t.label) for t in targets]


def _checked_vocab(source: Source, arch: str, prompts: list[str], tmp: Path, notes: list[str],
                   problems: list[str]) -> Vocab:
    vocab = build_vocab(source)
    name, how, prompts_alike = choose_pretokenizer(source, arch, vocab, prompts, tmp)
    vocab.pre = name
    line = f"tokenizer: {vocab.model}, pre-tokenizer {name!r} ({how})"
    (notes if prompts_alike else problems).append(line if prompts_alike else f"TOKENIZER MISMATCH: {line}")
    return vocab


def _kept_note(kept: list[str], kind: str) -> list[str]:
    if not kept:
        return []
    return [f"{len(kept)} tensor(s) stayed f16 instead of {kind}: " + "; ".join(kept)]


def _alpha(path: Path, weights: list[LoraWeight]) -> float:
    """adapter.lora.alpha: the adapter's lora_alpha, so that alpha / r is the scaling of its usual module."""
    import json

    alpha = json.loads((path / "adapter_config.json").read_text()).get("lora_alpha")
    return float(alpha) if alpha else weights[0].scaling * weights[0].r


def _stem(base: str) -> str:
    p = Path(base)
    return p.stem if p.suffix.lower() == ".gguf" else p.name
