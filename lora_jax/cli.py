"""`lora-jax`: argument parsing only; each subcommand calls one library function.

User errors print one line and exit with status 2; a diverged run exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]


def add_run_args(p: argparse.ArgumentParser, output_help: str) -> None:
    """The run-config options that `train` and `sweep` share (see `run_config_from_args`)."""
    p.add_argument("--config", help="YAML run config (sections: model, lora, data, optim, train; "
                                    "default: the built-in demonstration)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set lora.r=8 --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--model", help="Hugging Face Llama directory (default: the built-in demo model)")
    p.add_argument("--data", help="training JSONL ({text} | {prompt, completion} | {messages})")
    p.add_argument("--eval-data", help="held-out JSONL (default: a split of --data)")
    p.add_argument("--quantize", choices=("nf4", "int8"),
                   help="QLoRA: a 4-bit NF4 (or int8) frozen base; same as --set model.quantize=...")
    p.add_argument("--output-dir", help=output_help)
    p.add_argument("--overwrite", action="store_true", help="replace what --output-dir holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_args(p: argparse.ArgumentParser) -> None:
    add_run_args(p, "run directory (default: runs/demo)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() (TPU pods, SLURM, or LORA_JAX_* env)")


def load_run_config(path: str | None):
    """The RunConfig of a YAML file, or the demonstration's when `path` is None."""
    from lora_jax.config import RunConfig
    from lora_jax.errors import ConfigError

    if not path:
        from lora_jax.demo import demo_run_config

        return demo_run_config()
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path) as f:
        try:
            return RunConfig.from_dict(yaml.safe_load(f) or {})
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML: {e}") from None


def flag_overrides(args) -> list[str]:
    """`--set` pairs, then the shorthand flags of `add_run_args` as KEY=VALUE pairs."""
    pairs = list(args.overrides)
    for flag, key in (("model", "model.path"), ("data", "data.train_file"),
                      ("eval_data", "data.eval_file"), ("quantize", "model.quantize")):
        if getattr(args, flag, None):
            pairs.append(f"{key}={getattr(args, flag)}")
    return pairs


def _run_config(args):
    from lora_jax.errors import ConfigError

    if args.resume and args.overrides:
        raise ConfigError("--resume continues with the run's saved config; drop --set (or start a new "
                          "run with --overwrite)")
    pairs = flag_overrides(args)
    if args.output_dir:
        pairs.append(f"train.output_dir={args.output_dir}")
    return load_run_config(args.config).with_overrides(pairs)


def cmd_train(args) -> int:
    from lora_jax.distributed import initialize
    from lora_jax.train.loop import train

    initialize(auto=args.distributed)

    run = _run_config(args)
    summary = train(run, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    import jax

    if jax.process_index() == 0:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lora-jax train: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "train_loss_first", "train_loss_last", "eval_loss_before", "eval_loss_after",
                "eval_before", "eval_after", "tokens_per_s", "mfu", "compile_s", "trainable_params",
                "device", "adapter_dir", "output_dir"):
        value = summary.get(key)
        if isinstance(value, float):
            value = f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
        table.add_row(key, "-" if value is None else str(value))
    Console(stderr=False).print(table)


def cmd_export(args) -> int:
    from lora_jax.export import export_checkpoint

    written = export_checkpoint(args.checkpoint, step=args.step, peft_dir=args.peft, merged_dir=args.merged,
                                dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(json.dumps(written, indent=2))
    return 0


def cmd_generate(args) -> int:
    from lora_jax.generate import generate_cli

    for text in generate_cli(model=args.model, adapter=args.adapter, checkpoint=args.checkpoint,
                             prompts=args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-jax", description="LoRA fine-tuning of Llama models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (no arguments: the built-in demonstration)")
    _train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a run's checkpoint as a PEFT adapter or a merged HF model")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a `lora-jax train` output dir")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--peft", metavar="OUT_DIR", help="write a PEFT adapter here")
    p.add_argument("--merged", metavar="OUT_DIR", help="write the merged model here (transformers format)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="export dtype")
    p.add_argument("--max-shard-size", default="5GB", help="merged export shard size (default 5GB)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text with a base model and optional adapter")
    p.add_argument("--model", help="HF Llama directory (default: the built-in demo model)")
    p.add_argument("--adapter", help="PEFT adapter directory")
    p.add_argument("--checkpoint", metavar="RUN_DIR", help="use the latest checkpoint of a run instead")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    try:
        from lora_jax.sweep_cli import add_sweep_parser
    except ImportError:
        pass
    else:
        add_sweep_parser(sub)
    return parser


def main(argv=None) -> int:
    from lora_jax.errors import LoraJaxError
    from lora_jax.train.loop import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingDiverged as e:
        print(f"lora-jax: {e}", file=sys.stderr)
        return 1
    except LoraJaxError as e:
        print(f"lora-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
