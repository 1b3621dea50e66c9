"""A plain Hugging Face model folder with the adapter folded in: ``lorakit merge`` (``merge_to_folder``), then
the weights cast to ``--dtype``. Any runtime that reads transformers checkpoints (vLLM, TGI, llama.cpp's own
convert_hf_to_gguf.py, ONNX exporters) takes it from there."""

from __future__ import annotations

import json

import torch

from lorakit.export import Exported, ExportJob, Written

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export(job: ExportJob) -> Exported:
    from safetensors.torch import load_file, save_file

    from lorakit.merging import merge_to_folder

    adapter = job.adapters[0]
    merge_to_folder(job.model, str(adapter.path), str(job.workdir))
    dtype = DTYPES[job.dtype]
    for shard in sorted(job.workdir.glob("*.safetensors")):
        state = load_file(str(shard))
        if any(t.is_floating_point() and t.dtype != dtype for t in state.values()):
            save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}, str(shard),
                      metadata={"format": "pt"})
    config_file = job.workdir / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Exported([Written(job.workdir, f"Hugging Face model folder, {adapter.name} merged ({job.dtype})",
                             "merged")])
