"""kohya's layout, which A1111, ComfyUI and Forge load: each text-to-image adapter (a ``lorakit train`` run on
a diffusers pipeline, or any folder with diffusers' ``pytorch_lora_weights.safetensors``) as one
``<name>.safetensors`` with ``lora_unet_…`` / ``lora_te_…`` keys, ``.lora_down.weight``, ``.lora_up.weight``
and a scalar ``.alpha`` per module (``lorakit.diffusion.formats.to_kohya``, a pure conversion; UNet
pipelines: SD 1.x/2.x/SDXL). The check reads each written file back through the inverse conversion and
compares every tensor and alpha with the source adapter; diffusers' own loader reading the file is in the
tests (``tests/e2e/test_text_to_image.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.export import Exported, ExportJob, Written

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RoundTrip:
    """What the check found: per file, whether kohya -> diffusers gives back the source tensors and alphas."""

    files: list[tuple[str, int, bool]] = field(default_factory=list)  # (file, modules, equal)
    ran: bool = True

    @property
    def ok(self) -> bool:
        return all(equal for _, _, equal in self.files)

    def summary(self) -> str:
        lines = [f"  {name}: {n} modules, {'tensors and alphas equal' if eq else 'MISMATCH'}"
                 for name, n, eq in self.files]
        verdict = "OK" if self.ok else "MISMATCH: the kohya file does not reproduce the adapter"
        return "\n".join(["round trip: kohya file read back vs the source adapter (at --dtype):", *lines,
                          f"  -> {verdict}"])


def export(job: ExportJob) -> Exported:
    from lorakit.diffusion.io import read_diffusers, write_kohya

    dtype = DTYPES[job.dtype]
    written, sources = [], {}
    for adapter in job.adapters:
        state, alphas, _ = read_diffusers(adapter.path)
        state = {k: v.to(dtype) for k, v in state.items()}
        sdxl = any(k.startswith("text_encoder_2.") for k in state)
        path = job.workdir / f"{adapter.name}.safetensors"
        write_kohya(path, state, alphas, sdxl)
        written.append(Written(path, f"kohya/A1111 LoRA ({job.dtype}) of {adapter.name}", "adapter"))
        sources[path.name] = (state, alphas)

    def check(out: Path) -> RoundTrip:
        from lorakit.diffusion.formats import from_kohya
        from lorakit.diffusion.io import read_file

        report = RoundTrip()
        for name, (state, alphas) in sources.items():
            paths: dict[str, list[str]] = {}
            for module in alphas:
                component, path = module.split(".", 1)
                paths.setdefault(component, []).append(path)
            back, back_alphas = from_kohya(read_file(out / name)[0], paths, str(out / name))
            equal = back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state) \
                and back_alphas == alphas
            report.files.append((name, len(alphas), equal))
        return report

    return Exported(written, check=check)
