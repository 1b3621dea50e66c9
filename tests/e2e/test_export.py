"""`lorakit export` end to end on the bundled base (examples/base-model) and a quickstart-style adapter, in the
real runtimes: llama.cpp through llama-cpp-python, ONNX Runtime GenAI. Each exported model must give PyTorch's
greedy tokens; the checks below call the runtimes directly, not lorakit's own parity code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BASE = Path(__file__).resolve().parents[2] / "examples" / "base-model"
CONFIG = BASE.parents[1] / "examples" / "configs" / "quickstart.yaml"
DATA = BASE.parents[1] / "examples" / "data"
MAX_NEW = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A quickstart run (examples/configs/quickstart.yaml) trained by `lorakit train` for 12 steps at lr 5e-3 on the
    task's first 64 examples: enough for the adapter to change every greedy answer (and end it with eos)."""
    from lorakit.cli import main

    root = tmp_path_factory.mktemp("export")
    for name, n in (("task_train.jsonl", 64), ("task_val.jsonl", 8)):
        lines = (DATA / name).read_text().splitlines()[:n]
        (root / name).write_text("\n".join(lines) + "\n")
    out = root / "qs-lora"
    assert main(["train", str(CONFIG), "--output", str(out), "--data", str(root / "task_train.jsonl"), "--val-data",
                 str(root / "task_val.jsonl"), "--max-steps", "12", "--lr", "5e-3", "--warmup-steps", "0",
                 "--threads", "1", "--log-every", "100"]) == 0
    return out


@pytest.fixture(scope="module")
def prompts(run) -> list[list[int]]:
    """Token ids of four validation prompts, as training rendered them (bos + alpaca prompt)."""
    from lorakit.data.tokenize import valid_records
    from lorakit.evaluate import prompts_and_references
    from lorakit.generate import encode_prompt
    from lorakit.model import load_tokenizer

    tok = load_tokenizer(str(BASE))
    records, fmt = valid_records(DATA / "task_val.jsonl", "auto", 4)
    return [encode_prompt(tok, p) for p, _ in prompts_and_references(records, fmt, tok)]


@pytest.fixture(scope="module")
def reference(run):
    """PyTorch greedy continuations: fn(scale or None for the base alone, prompt ids) -> new token ids."""
    from transformers import AutoModelForCausalLM

    from lorakit.lora import disable_adapters, load_adapter, set_adapter_scale

    model = load_adapter(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32), run).eval()

    @torch.no_grad()
    def greedy(scale: float | None, ids: list[int]) -> list[int]:
        x = torch.tensor([ids])
        kw = dict(max_new_tokens=MAX_NEW, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=3)
        if scale is None:
            with disable_adapters(model):
                return model.generate(x, **kw)[0, len(ids):].tolist()
        set_adapter_scale(model, scale)
        return model.generate(x, **kw)[0, len(ids):].tolist()

    return greedy


def llama_greedy(llm, ids: list[int]) -> list[int]:
    """llama.cpp's own greedy decoding (top_k 1), stopped at eos (2) or <|im_end|> (5) as transformers stops."""
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(int(token))
        if token in (2, 5) or len(out) == MAX_NEW:
            break
    return out


def run_export(*args) -> tuple[int, str, str]:
    """``lorakit export ARGS`` through the console script's ``main``, in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from lorakit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def tiny_run(tmp_path: Path, model_type: str, vocab_size: int) -> tuple[int, str, str]:
    """A tiny random model of ``model_type`` (2 layers, 4 query / 2 key-value heads) saved to tmp_path/model beside the
    tokenizer already there, a random LoRA on every linear layer, and its `lorakit export --format gguf --dtype f32
    --strict`: (exit code, stdout, stderr)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit import LoraConfig, add_lora, save_adapter
    from tests.conftest import randomize_lora

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model, std=0.2)
    save_adapter(model, tmp_path / "lora", base_model_name_or_path=str(tmp_path / "model"))
    return run_export("--adapter", tmp_path / "lora", "--format", "gguf", "--dtype", "f32", "--output",
                      tmp_path / "out", "--strict")


@pytest.fixture(scope="module")
def f32(run, tmp_path_factory) -> tuple[Path, int, str, str]:
    """`lorakit export --format gguf --dtype f32 --strict` of the run: (output folder, exit code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("f32") / "gguf"
    return (out, *run_export("--adapter", run, "--format", "gguf", "--dtype", "f32", "--output", out, "--strict"))


def test_gguf_f32_base_adapter_and_scale_match_pytorch(f32, prompts, reference):
    from llama_cpp import Llama

    out, code, text, err = f32
    assert code == 0, err
    assert "-> OK" in text and "pre-tokenizer 'smollm' (checked:" in text, text
    base, lora = out / "base-model.f32.gguf", out / "qs-lora.lora.gguf"
    assert "of the base" in text and base.is_file() and lora.is_file()
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./base-model.f32.gguf\nADAPTER ./qs-lora.lora.gguf\n" in modelfile and "### Response:" in modelfile

    plain = Llama(model_path=str(base), n_ctx=256, verbose=False)
    with_lora = Llama(model_path=str(base), lora_path=str(lora), n_ctx=256, verbose=False)
    half = Llama(model_path=str(base), lora_path=str(lora), lora_scale=0.5, n_ctx=256, verbose=False)  # --lora-scaled 0.5
    changed = 0
    for ids in prompts:
        assert llama_greedy(plain, ids) == reference(None, ids)
        assert llama_greedy(with_lora, ids) == reference(1.0, ids)
        assert llama_greedy(half, ids) == reference(0.5, ids)
        changed += reference(1.0, ids) != reference(None, ids)
    assert changed > 0  # the adapter changes answers, so matching it means something

    # transformers' own GGUF reader undoes llama.cpp's layout: it must give back the exact original weights
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=base.name, dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).state_dict()
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_gguf_f16_and_merged_match_pytorch(run, prompts, reference, tmp_path):
    from llama_cpp import Llama

    code, text, err = run_export("--adapter", run, "--format", "gguf", "--output", tmp_path / "f16", "--strict")
    assert code == 0 and "-> OK" in text, err + text
    base, lora = tmp_path / "f16" / "base-model.f16.gguf", tmp_path / "f16" / "qs-lora.lora.gguf"
    code, text, err = run_export("--adapter", run, "--format", "gguf", "--merge", "--output", tmp_path / "m",
                             "--strict")
    assert code == 0 and "-> OK" in text, err + text
    merged = tmp_path / "m" / "qs-lora.merged.f16.gguf"
    assert [p.name for p in sorted((tmp_path / "m").iterdir())] == ["Modelfile", merged.name]

    f16 = Llama(model_path=str(base), lora_path=str(lora), n_ctx=256, verbose=False)
    one = Llama(model_path=str(merged), n_ctx=256, verbose=False)
    for ids in prompts:
        assert llama_greedy(f16, ids) == reference(1.0, ids)
        assert llama_greedy(one, ids) == reference(1.0, ids)


def test_gguf_q8_0_keeps_unblockable_rows_16_bit(run, tmp_path):
    code, text, err = run_export("--adapter", run, "--format", "gguf", "--quantize", "q8_0", "--output", tmp_path)
    assert code == 0, err
    # the bundled model's down_proj rows hold 688 values, not whole blocks of 32: they stay f16, and say so
    assert "4 tensor(s) stayed f16 instead of q8_0" in text and "blk.0.ffn_down.weight" in text
    assert "top-1 agreement" in text and "reported (quantized" in text


@pytest.fixture(scope="module")
def half(run, tmp_path_factory) -> Path:
    """A second adapter: the run's with lora_B halved, so PyTorch at scale 0.5 is its reference."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("half") / "half"
    shutil.copytree(run, out)
    weights = out / "adapter_model.safetensors"
    save_file({k: v * 0.5 if "lora_B" in k else v for k, v in load_file(str(weights)).items()}, str(weights),
              metadata={"format": "pt"})
    return out


def test_onnx_adapters_switch_on_and_off_in_one_process(run, half, prompts, reference, tmp_path):
    import onnxruntime_genai as og

    code, text, err = run_export("--adapter", f"{run},{half}", "--format", "onnx", "--output", tmp_path, "--strict")
    assert code == 0 and "-> OK" in text, err + text
    model = og.Model(str(tmp_path / "model"))
    adapters = og.Adapters(model)
    adapters.load(str(tmp_path / "qs-lora.onnx_adapter"), "qs")
    adapters.load(str(tmp_path / "half.onnx_adapter"), "half")

    def greedy(ids: list[int], adapter: str | None) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + MAX_NEW, do_sample=False)
        gen = og.Generator(model, params)
        if adapter:
            gen.set_active_adapter(adapters, adapter)
        gen.append_tokens(ids)  # og.Tokenizer adds no bos: the ids carry it
        out = []
        while not gen.is_done() and len(out) < MAX_NEW:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    for ids in prompts:  # on, off, the other one, on again: one loaded model
        assert greedy(ids, "qs") == reference(1.0, ids)
        assert greedy(ids, None) == reference(None, ids)
        assert greedy(ids, "half") == reference(0.5, ids)
        assert greedy(ids, "qs") == reference(1.0, ids)


def test_unsupported_architecture_and_modules_to_save_get_one_line(run, tmp_path):
    import shutil

    from lorakit import LoraConfig, add_lora, save_adapter
    from tests.conftest import tiny_gpt2

    gpt2 = tiny_gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2")
    add_lora(gpt2, LoraConfig(r=4, target_modules=["c_attn"]))
    save_adapter(gpt2, tmp_path / "gpt2-lora", base_model_name_or_path=str(tmp_path / "gpt2"))
    code, out, err = run_export("--adapter", tmp_path / "gpt2-lora", "--format", "gguf", "--output", tmp_path / "x")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "architecture GPT2LMHeadModel is not supported" in err and "(supported: Llama, Mistral, Qwen2)" in err

    saved = tmp_path / "saved"
    shutil.copytree(run, saved)
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    for fmt in ("gguf", "onnx"):
        code, out, err = run_export("--adapter", saved, "--format", fmt, "--output", tmp_path / "y")
        assert code == 2 and err.count("\n") == 1 and "modules_to_save ['lm_head']" in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

    # LoRA on the bundled model's embeddings, which are tied to its output head
    from transformers import AutoModelForCausalLM

    tied = add_lora(AutoModelForCausalLM.from_pretrained(BASE), LoraConfig(r=4, target_modules=["embed_tokens"]))
    save_adapter(tied, tmp_path / "emb", base_model_name_or_path=str(BASE))
    for fmt, says in (("gguf", "ties its embeddings to the output head"), ("onnx", "cannot switch an embedding LoRA")):
        code, out, err = run_export("--adapter", tmp_path / "emb", "--format", fmt, "--output", tmp_path / "z")
        assert code == 2 and err.count("\n") == 1 and says in err and "--merge" in err, err
    assert not (tmp_path / "z").exists()


def test_ollama_template_is_the_chat_template_in_go(tmp_path):
    from lorakit.export.ollama import chat_pieces, modelfile
    from lorakit.model import load_tokenizer

    tok = load_tokenizer(str(BASE))  # ChatML
    pieces = chat_pieces(tok)
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert pieces.render(conversation) == tok.apply_chat_template(conversation, tokenize=False,
                                                                  add_generation_prompt=True)
    text, note = modelfile("./b.gguf", "./a.gguf", tok, "chat")
    assert note is None and 'PARAMETER stop "<|im_end|>"' in text
    assert '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"  # rewrites content
    assert chat_pieces(tok) is None


def test_sentencepiece_vocabulary_and_grouped_kv_heads(tmp_path, monkeypatch):
    """A Llama-2-style tokenizer (SentencePiece BPE with byte fallback, converted by transformers) and grouped
    key/value heads (k_proj's RoPE permutation over 2 heads, q_proj's over 4), on a tiny random Llama."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter((DATA / "retain.txt").read_text().splitlines()),
                                   model_writer=sp, vocab_size=600, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, split_digits=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", minloglevel=2)
    src, model_dir = tmp_path / "sp", tmp_path / "model"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(sp.getvalue())
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    AutoTokenizer.from_pretrained(src).save_pretrained(model_dir)  # tokenizer.json only, as lorakit saves it
    code, text, err = tiny_run(tmp_path, "llama", 600)
    assert code == 0 and "-> OK" in text, err + text
    # llama.cpp adds SentencePiece's leading "▁" even before a leading space, transformers' Metaspace does not
    assert "tokenizer: llama, pre-tokenizer 'default' (checked: llama.cpp tokenizes 4/4 prompts" in text
    assert "differs on e.g. ' Hello world'" in text

    # prompts that this GGUF tokenizes differently fail the check, and --strict says so with exit status 1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(" Hello world\nHello world\n")
    code, text, err = run_export("--adapter", tmp_path / "lora", "--format", "gguf", "--dtype", "f32", "--output",
                                 tmp_path / "out2", "--prompts", prompts, "--strict")
    assert code == 1 and "TOKENIZER MISMATCH" in text and "parity check failed (--strict)" in err, err + text

    # without llama.cpp the files are still written; the check is skipped, naming the install command
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    code, text, err = run_export("--adapter", tmp_path / "lora", "--format", "gguf", "--output", tmp_path / "out3")
    assert code == 0 and (tmp_path / "out3" / "lora.lora.gguf").is_file(), err
    assert 'parity: not checked: llama.cpp is not installed: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install' in text
    code, text, err = run_export("--adapter", tmp_path / "lora", "--format", "gguf", "--output", tmp_path / "out4",
                                 "--strict")
    assert code == 1 and "could not run (--strict)" in err


def test_adapter_on_a_gguf_base_is_written_for_that_file(run, f32, prompts, reference, tmp_path):
    """Issue 15's contract: an adapter trained on a GGUF file records it (lorakit_base.json); export pairs the LoRA
    GGUF with that very file instead of re-exporting a base, and refuses a file that changed."""
    import shutil

    from llama_cpp import Llama

    from lorakit.gguf import write_base_record

    base = tmp_path / "base.gguf"  # the bundled model as GGUF: the weights the run was trained on, exactly
    shutil.copy(f32[0] / "base-model.f32.gguf", base)
    adapter = tmp_path / "on-gguf"
    shutil.copytree(run, adapter)
    write_base_record(adapter, base)
    code, text, err = run_export("--adapter", adapter, "--format", "gguf", "--output", tmp_path / "out", "--strict")
    assert code == 0 and "-> OK" in text and "(GGUF f32 base base.gguf, LoRA f16)" in text, err + text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "on-gguf.lora.gguf"]
    assert (tmp_path / "out" / "Modelfile").read_text().startswith(f"FROM {base}\nADAPTER ./on-gguf.lora.gguf\n")
    llm = Llama(model_path=str(base), lora_path=str(tmp_path / "out" / "on-gguf.lora.gguf"), n_ctx=256, verbose=False)
    assert all(llama_greedy(llm, ids) == reference(1.0, ids) for ids in prompts)

    with open(base, "ab") as f:
        f.write(b"\0")
    code, out, err = run_export("--adapter", adapter, "--format", "gguf", "--output", tmp_path / "out2")
    assert code == 2 and "not the file the adapter was trained on" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral_match_pytorch_in_llama_cpp(arch, tmp_path):
    """Tiny random Qwen2 (q/k/v biases, no RoPE permutation in llama.cpp) and Mistral (llama.cpp's llama
    architecture) with grouped KV heads and the bundled tokenizer: GGUF f32 base + LoRA give PyTorch's tokens."""
    import shutil

    (tmp_path / "model").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE / f, tmp_path / "model" / f)
    code, text, err = tiny_run(tmp_path, arch, 4096)
    assert code == 0 and "-> OK" in text and "base + lora" in text, err + text
