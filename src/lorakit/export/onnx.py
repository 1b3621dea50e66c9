"""ONNX Runtime GenAI: one model folder that switches adapters at run time, one ``.onnx_adapter`` per adapter.

    OUT/model/                    onnxruntime-genai's model builder output for the base (fp32, or int4/int8
                                  weights for CPU): genai_config.json, model.onnx + model.onnx.data, tokenizer
    OUT/<adapter>.onnx_adapter    the adapter's LoRA weights in onnxruntime's adapter format
    --merge: OUT/model/ built from the merged weights instead, no adapter files

The builder's own LoRA support (``adapter_path``) bakes one adapter's weights into the graph as constants
(and would quantize them with the base). Instead, after building the base, each adapted projection's
node y = x·Wᵀ gets a LoRA path beside it, y' = y + (x·A_T)·B_T, whose weights A_T (in, r) and B_T (r, out)
are *graph inputs* with a zero default (an initializer of rank 1 under the same name): with no adapter
active the path adds x·0·0 = 0, the base's output. An ``.onnx_adapter`` holds A_T = Aᵀ and B_T = s·Bᵀ for
its modules; ``og.Adapters(model).load(file, name)`` + ``generator.set_active_adapter(adapters, name)`` feed
them, per generator, so requests on one loaded model can use different adapters. The LoRA path stays fp32
whatever the base's precision.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import LorakitError
from lorakit.export import Exported, ExportJob, Written
from lorakit.export.source import LoraWeight, Source, load_source

PRECISIONS = {"f32": "fp32", "int4": "int4", "int8": "int8"}
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def node_output(module_path: str) -> str:
    """The builder's output name for the projection at ``module_path`` (HF naming)."""
    if module_path == "lm_head":
        return "logits"
    m = _LAYER.match(module_path)
    if not m:
        raise LorakitError(f"adapter on {module_path}: --format onnx carries LoRA on the attention and MLP "
                           "projections and lm_head only; export with --merge")
    block = "attn" if m[2] == "self_attn" else "mlp"
    return f"/model/layers.{m[1]}/{block}/{m[3]}/MatMul/output_0"


def input_names(module_path: str) -> tuple[str, str]:
    """The graph inputs holding a module's A_T (in, r) and B_T (r, out)."""
    return f"{module_path}.lora_A.weight", f"{module_path}.lora_B.weight"


def build(hf_folder: str | Path, out: Path, precision: str, fuse: bool, cache: Path) -> None:
    """Run onnxruntime-genai's model builder (a subprocess: it puts its own modules on sys.path). Separate
    q/k/v and gate/up MatMuls (``fuse_qkv=false``) when LoRA paths are to be attached to them."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    if not fuse:
        cmd += ["--extra_options", "fuse_qkv=false"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        raise LorakitError(f"onnxruntime-genai's model builder failed on {hf_folder}: "
                           f"{lines[-1] if lines else 'no output'}")


def add_lora_inputs(model_file: Path, modules: dict[str, tuple[int, int]]) -> None:
    """Attach a LoRA path with input weights to each projection in ``modules`` ({path: (in, out)}), in place.
    The weights stay in model.onnx.data; only the graph (model.onnx) is rewritten."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output}
    new_nodes: dict[int, list] = {}
    for path, (n_in, n_out) in sorted(modules.items()):
        out_name = node_output(path)
        idx = producers.get(out_name)
        if idx is None:
            raise LorakitError(f"adapter on {path}: the built ONNX graph has no node producing {out_name} "
                               "(an architecture variant lorakit export does not know); export with --merge")
        node = graph.node[idx]
        base_out = f"{out_name}/base"
        node.output[0] = base_out
        a_name, b_name = input_names(path)
        graph.input.extend([helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [n_in, "lora_rank"]),
                            helper.make_tensor_value_info(b_name, TensorProto.FLOAT, ["lora_rank", n_out])])
        graph.initializer.extend([helper.make_tensor(a_name, TensorProto.FLOAT, [n_in, 1], np.zeros(n_in, np.float32)),
                                  helper.make_tensor(b_name, TensorProto.FLOAT, [1, n_out], np.zeros(n_out, np.float32))])
        prefix = out_name.rsplit("/", 2)[0] if out_name != "logits" else "/lm_head"
        x = node.input[0]
        new_nodes[idx] = [
            helper.make_node("MatMul", [x, a_name], [f"{prefix}/lora_A/output_0"], name=f"{prefix}/lora_A/MatMul"),
            helper.make_node("MatMul", [f"{prefix}/lora_A/output_0", b_name], [f"{prefix}/lora_B/output_0"],
                             name=f"{prefix}/lora_B/MatMul"),
            helper.make_node("Add", [base_out, f"{prefix}/lora_B/output_0"], [out_name], name=f"{prefix}/lora/Add"),
        ]
    nodes = []
    for i, n in enumerate(graph.node):  # keep the graph topologically sorted: each LoRA path after its base node
        nodes.append(n)
        nodes += new_nodes.get(i, [])
    del graph.node[:]
    graph.node.extend(nodes)
    tmp = model_file.with_name(f".tmp-{model_file.name}")
    onnx.save(model, str(tmp))
    tmp.replace(model_file)


def adapter_arrays(weights: list[LoraWeight]) -> dict[str, np.ndarray]:
    """{input name: value} for one adapter: A_T = Aᵀ (in, r), B_T = s·Bᵀ (r, out), fp32."""
    out = {}
    for w in weights:
        a_name, b_name = input_names(w.path)
        out[a_name] = np.ascontiguousarray(w.a.t().numpy(), dtype=np.float32)
        out[b_name] = np.ascontiguousarray((w.b * w.scaling).t().numpy(), dtype=np.float32)
    return out


def write_adapter(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    tmp = path.with_name(f".tmp-{path.name}")
    fmt.export_adapter(str(tmp))
    tmp.replace(path)


def save_merged(source: Source, name: str, folder: Path) -> None:
    """A Hugging Face folder of the base with adapter ``name`` folded in (fp32), for the builder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for f in Path(source.folder).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".gguf")) and f.name != \
                "model.safetensors.index.json":
            shutil.copy(f, folder / f.name)
    state = source.merged_state_dict(name)
    if getattr(source.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def check_supported(config: Any, where: str, modules: dict[str, list[str]]) -> None:
    """One line, before anything is loaded, for a base or adapter this format cannot express."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise LorakitError(f"{where}: architecture {kind} is not supported by lorakit export --format onnx "
                           "(supported: Llama, Mistral, Qwen2)")
    for name, paths in modules.items():
        for path in paths:
            if path.endswith("embed_tokens"):
                raise LorakitError(f"adapter {name} on {path}: --format onnx cannot switch an embedding LoRA; "
                                   "export with --merge")
            node_output(path)


def _modules(source: Source, weights: dict[str, list[LoraWeight]]) -> dict[str, tuple[int, int]]:
    """{module path: (in, out)} over every adapter; embeddings are refused."""
    modules: dict[str, tuple[int, int]] = {}
    for name, ws in weights.items():
        for w in ws:
            if w.embedding:
                raise LorakitError(f"adapter {name} on {w.path}: --format onnx cannot switch an embedding LoRA; "
                                   "export with --merge")
            node_output(w.path)
            modules[w.path] = (w.a.shape[1], w.b.shape[0])
    return modules


def export(job: ExportJob) -> Exported:
    from lorakit.export.parity import OnnxTarget, onnx_check, parity_prompts

    source = load_source(job, check_supported)
    check_supported(source.config, source.base, {})
    precision = PRECISIONS[job.quantize or job.dtype]
    out = job.workdir
    cache = out / ".builder-cache"
    model_dir = out / "model"
    written: list[Written] = []
    targets: list[OnnxTarget] = []
    try:
        if job.merge:
            name = job.adapters[0].name
            merged = out / ".merged-hf"
            save_merged(source, name, merged)
            build(merged, model_dir, precision, True, cache)
            shutil.rmtree(merged)
            written.append(Written(model_dir, f"ONNX Runtime GenAI model, {name} merged ({precision})", "merged"))
            targets.append(OnnxTarget(model_dir, None, name, f"merged {name}"))
        else:
            weights = {a.name: source.lora_weights(a.name) for a in job.adapters}
            modules = _modules(source, weights)
            build(source.folder, model_dir, precision, False, cache)
            add_lora_inputs(model_dir / "model.onnx", modules)
            written.append(Written(model_dir, f"ONNX Runtime GenAI model ({precision}), LoRA weights as inputs "
                                              f"on {len(modules)} projections", "base"))
            targets.append(OnnxTarget(model_dir, None, None, "base (no adapter active)"))
            for a in job.adapters:
                path = out / f"{a.name}.onnx_adapter"
                write_adapter(path, adapter_arrays(weights[a.name]))
                written.append(Written(path, f"adapter {a.name} (r={weights[a.name][0].r}, "
                                             f"{len(weights[a.name])} modules)", "adapter"))
                targets.append(OnnxTarget(model_dir, path, a.name, f"adapter {a.name} active"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    exact = precision == "fp32"
    prompts = parity_prompts(job, source.tokenizer)

    def check(final: Path):
        moved = [OnnxTarget(final / t.folder.relative_to(out), t.adapter and final / t.adapter.relative_to(out),
                            t.name, t.label) for t in targets]
        return onnx_check(source, moved, prompts, exact, precision)

    return Exported(written, [], check)

