"""The serving parts without HTTP: per-row adapters in one forward (against PEFT's mixed batch), the engine's
batch invariance, text streaming with stop strings, the adapter registry, and `check-adapter --for vllm`."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import LorakitError
from lorakit.serve.registry import AdapterError, AdapterRegistry, confine
from lorakit.serve.scheduler import Engine, Request, SamplingParams
from lorakit.serve.text import TextStream
from tests.conftest import randomize_lora, rel_err, tiny_llama

TARGETS = {"a": "all-linear", "b": ["q_proj", "v_proj"], "c": ["k_proj", "down_proj", "embed_tokens"]}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny Llama and three PEFT adapters on it (different ranks and targets, one on the embedding)."""
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_llama(vocab=128, hidden=32, layers=2)
    for i, (name, targets) in enumerate(TARGETS.items()):
        m = copy.deepcopy(base)
        lorakit.add_lora(m, lorakit.LoraConfig(r=4 * (i + 1), alpha=8, target_modules=targets))
        randomize_lora(m, std=0.3, seed=i + 1)
        lorakit.save_adapter(m, root / name)
    return base, root


def served(base, root, max_adapters: int = 8) -> tuple[torch.nn.Module, AdapterRegistry]:
    model = copy.deepcopy(base)
    registry = AdapterRegistry(model, torch.float32, max_adapters)
    for name in TARGETS:
        registry.add(name, str(root / name), trusted=True)
    return model, registry


@pytest.mark.parametrize("rows", [
    [None, "a", "b", "a", "c", None, "c"],  # several adapters in a decode step: the stacked path
    [None, "a", None, "a"],  # one adapter on rows that are not contiguous: the index path
    ["c", "b", None, "c"],  # stacked, on layers that only one of the two adapters targets
])
def test_rows_use_their_own_adapter_like_peft_mixed_batch(adapters, rows):
    from peft import PeftModel

    base, root = adapters
    model, registry = served(base, root)
    ids = torch.randint(0, 128, (len(rows), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), registry.batched.route(rows):
        ours = model(ids).logits
    peft = PeftModel.from_pretrained(copy.deepcopy(base), root / "a", adapter_name="a")
    for name in ("b", "c"):
        peft.load_adapter(root / name, adapter_name=name)
    with torch.no_grad():
        theirs = peft(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        plain = base(ids).logits
    assert rel_err(ours, theirs) < 1e-5
    base_rows = [i for i, r in enumerate(rows) if r is None]
    assert torch.equal(ours[base_rows], plain[base_rows])  # base rows: exactly the base model
    for i in set(range(len(rows))) - set(base_rows):
        assert rel_err(ours[i], plain[i]) > 1e-2  # adapter rows changed
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)  # outside route(): every row is the base


def test_engine_output_does_not_depend_on_the_batch(adapters):
    """Mixed adapters, 3 slots for 10 requests (rows leave and move): each equals the request run alone."""
    base, root = adapters
    model, registry = served(base, root)
    got: dict[Request, list[int]] = {}
    engine = Engine(model, registry, max_batch=3, max_queue=100, max_context=128,
                    deliver=lambda events: [got.setdefault(r, []).append(o.token) for r, o in events if o.token is not None])
    rng = random.Random(0)
    reqs = [Request([rng.randrange(4, 128) for _ in range(rng.randint(2, 20))],
                    SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]), seed=i),
                    rng.choice([None, "a", "b", "c"])) for i in range(10)]

    def run(batch):
        for r in batch:
            engine.submit(r)
        with torch.inference_mode():
            while engine.batch_size or engine.queue_depth:
                engine.step()

    assert engine.packed  # the first step admits 3 prompts (3 adapters) and prefills them in one packed forward
    run(reqs)
    together = [got[r] for r in reqs]
    alone = []
    for r in reqs:
        again = Request(r.prompt, r.params, r.adapter)
        run([again])
        alone.append(got[again])
    assert together == alone
    assert [len(t) for t in together] == [r.params.max_tokens for r in reqs]
    assert registry.in_use == {} and engine.cache.rows <= 4


@pytest.fixture(scope="module")
def tokenizer():
    from pathlib import Path

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[2] / "examples" / "base-model")


def stream(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    ts = TextStream(tokenizer, stop)
    pieces = [ts.add(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return pieces + [ts.finish()], ts


def test_text_stream_pieces_join_to_the_decoded_text(tokenizer):
    text = "naïve café → déjà vu: print('ok')\n    return x"
    pieces, ts = stream(tokenizer, text, [])
    assert "".join(pieces) == tokenizer.decode(ts.ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces) and sum(1 for p in pieces if p) > 5


def test_text_stream_cuts_at_a_stop_string_across_tokens(tokenizer):
    pieces, ts = stream(tokenizer, "def main():\n    return 42\nprint(main())", ["return 4", "zzz"])
    assert "".join(pieces) == "def main():\n    " and ts.stopped
    assert ts.tokens_used < len(ts.ids) + 1 and all("ret" not in p for p in pieces)
    held, ts = stream(tokenizer, "value = retu", ["return"])  # a partial stop is released only at the end
    assert held[-1].endswith("retu") and "".join(held) == "value = retu" and not ts.stopped


def test_registry_lru_pins_and_retires(adapters):
    base, root = adapters
    model, registry = served(base, root, max_adapters=2)
    assert list(registry.loaded) == ["b", "c"] and registry.names() == ["a", "b", "c"]  # "a" evicted, still known
    assert "a" not in lorakit.adapter_names(model)
    assert registry.acquire("a") and list(registry.loaded) == ["c", "a"]  # reloaded, the idle LRU one out
    assert registry.acquire("c") and not registry.acquire("b")  # both loaded ones pinned: "b" must wait
    registry.release("a")
    assert registry.acquire("b") and list(registry.loaded) == ["c", "b"]
    registry.remove("c")  # in use: forgotten now, unloaded when its request finishes
    assert "c" not in registry.names() and "c" in lorakit.adapter_names(model)
    registry.release("c")
    assert "c" not in lorakit.adapter_names(model) and list(registry.loaded) == ["b"]
    with pytest.raises(AdapterError, match="was unloaded"):
        registry.acquire("c")
    with pytest.raises(AdapterError, match="exists already"):
        registry.add("b", str(root / "b"), trusted=True)


def copy_adapter(src, dst, config=None, weights=None):
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    tensors = load_file(src / "adapter_model.safetensors")
    save_file(weights(tensors) if weights else tensors, dst / "adapter_model.safetensors")
    return dst


def nan_first(tensors):
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    return tensors


@pytest.mark.parametrize(("config", "weights", "says"), [
    ({"bias": "all"}, None, "bias terms"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"r": 6}, None, "says r=6"),
    ({"use_dora": True}, None, "DoRA"),
    (None, nan_first, "NaN"),
    (None, lambda t: {k: v[:, :1].contiguous() if k.endswith("lora_B.weight") else v for k, v in t.items()}, "shape"),
])
def test_registry_refuses_what_it_cannot_serve(adapters, tmp_path, config, weights, says):
    base, root = adapters
    model, registry = served(base, root)
    before = {n: p.clone() for n, p in model.named_parameters()}
    bad = copy_adapter(root / "a", tmp_path / "bad", config, weights)
    with pytest.raises(LorakitError, match=says):
        registry.add("bad", str(bad), trusted=True)
    assert "bad" not in lorakit.adapter_names(model) and "bad" not in registry.names()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_confine_refuses_escapes(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "ok").mkdir(parents=True)
    (outside / "x").mkdir(parents=True)
    (root / "link").symlink_to(outside / "x")
    (root / "loop").symlink_to(root / "loop")
    assert confine(root, "ok") == (root / "ok").resolve() == confine(root, str(root / "ok"))
    for path, says in (("../outside/x", "'..'"), ("ok/../../outside/x", "'..'"), (str(outside / "x"), "absolute"),
                       ("link", "outside"), ("loop", "no such"), ("", "non-empty"), ("nope", "no such")):
        with pytest.raises(AdapterError, match=says):
            confine(root, path)


def check(capsys, folder, *args) -> tuple[int, str]:
    from lorakit.cli import main

    code = main(["check-adapter", str(folder), "--for", "vllm", *map(str, args)])
    return code, capsys.readouterr().out


def test_check_adapter_for_vllm(adapters, tmp_path, capsys):
    base, root = adapters
    model_dir = tmp_path / "base"
    base.save_pretrained(model_dir)
    code, out = check(capsys, root / "b", "--model", model_dir, "--name", "sql")
    assert code == 0 and "vLLM will load" in out
    assert f"vllm serve {model_dir} --enable-lora --lora-modules sql={(root / 'b').resolve()} --max-lora-rank 8" in out
    code, out = check(capsys, root / "c", "--model", model_dir)  # rank 12 -> 16; embed_tokens: Llama has it
    assert code == 0 and "--max-lora-rank 16" in out
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    code, out = check(capsys, root / "c", "--model", qwen)
    assert code == 1 and "targets embed_tokens" in out
    bad = copy_adapter(root / "a", tmp_path / "bad", {"use_dora": True, "modules_to_save": ["lm_head"],
                                                      "alpha_pattern": {"q_proj": 4}, "bias": "lora_only"})
    code, out = check(capsys, bad, "--model", model_dir)
    assert code == 1
    for reason in ("DoRA", "modules_to_save", "alpha_pattern", "bias"):
        assert reason in out
    big = copy_adapter(root / "a", tmp_path / "big", {"r": 1024},
                       lambda t: {k: torch.zeros(1024, v.shape[1]) if "lora_A" in k else v for k, v in t.items()})
    code, out = check(capsys, big, "--model", model_dir)
    assert code == 1 and "rank 1024" in out


def test_serve_flags(tmp_path):
    from lorakit.cli import build_parser
    from lorakit.config import ServeRunConfig, load_config

    a = build_parser().parse_args(["serve", "--model", "m", "--adapter", "x=dir1", "--adapter", "y=dir2",
                                   "--port", "9001", "--max-batch", "4"])
    flags = {k: v for k, v in vars(a).items() if k not in ("command", "func", "config")}
    cfg = load_config(None, flags, root=ServeRunConfig)
    assert cfg.serve.adapters == ["x=dir1", "y=dir2"] and cfg.serve.port == 9001 and cfg.model.name_or_path == "m"
    assert cfg.serve.host == "127.0.0.1"  # loopback unless told otherwise
    (tmp_path / "s.yaml").write_text("model: {name_or_path: m}\nserve: {max_queue: 3, adapters: [z=d]}\n")
    assert load_config(tmp_path / "s.yaml", {}, root=ServeRunConfig).serve.max_queue == 3
    for bad in ({"adapter": ["nodir"]}, {"max-queue": "0"}, {"port": "70000"}):
        with pytest.raises(LorakitError):
            load_config(None, bad, root=ServeRunConfig)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_serves_mixed_batches(adapters, tmp_path, quantization):
    """--quantization: the engine over a bitsandbytes base (adapters on the dequantized weights); base rows
    give the quantized model's own greedy tokens, adapter rows differ, a mixed batch equals each alone."""
    from lorakit.quant import load_quantized

    base, root = adapters
    base.save_pretrained(tmp_path / "base")
    model, _ = load_quantized(tmp_path / "base", quantization, torch.float32)
    registry = AdapterRegistry(model, torch.float32, 8)
    for name in TARGETS:
        registry.add(name, str(root / name), trusted=True)
    got: dict[Request, list[int]] = {}
    engine = Engine(model, registry, max_batch=4, max_queue=8, max_context=128,
                    deliver=lambda events: [got.setdefault(r, []).append(o.token) for r, o in events if o.token is not None])
    prompt = [5, 17, 42, 9, 77, 3]
    reqs = [Request(prompt, SamplingParams(max_tokens=8), adapter) for adapter in (None, "a", "b", "c")]

    def run(batch):
        for r in batch:
            engine.submit(r)
        with torch.inference_mode():
            while engine.batch_size or engine.queue_depth:
                engine.step()
        return [got[r] for r in batch]

    together = run(reqs)
    assert together == [run([Request(r.prompt, r.params, r.adapter)])[0] for r in reqs]
    with torch.inference_mode():
        plain = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert together[0] == plain[0, len(prompt):].tolist()
    assert all(t != together[0] for t in together[1:])
