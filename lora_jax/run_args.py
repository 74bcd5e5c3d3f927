"""The command-line options that describe a run, shared by `lora-jax train` and `lora-jax sweep`.

    add_run_args(parser, "run directory (default: runs/demo)")   # --config, --set, --model, ...
    run = load_run_config(args.config).with_overrides(flag_overrides(args))

Layering, later wins: --config (else the built-in demonstration) <- --set <- the shorthand flags
(--model, --data, --eval-data, --quantize).
"""

from __future__ import annotations

import argparse

from lora_jax.demo import demo_run_config
from lora_jax.errors import ConfigError
from lora_jax.run_config import RunConfig, load_yaml

__all__ = ["add_run_args", "flag_overrides", "load_run_config", "quote", "path_arg"]


def path_arg(text: str) -> str:
    """A path option: an empty one would silently mean the default, so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give a path")
    return text


def add_run_args(p: argparse.ArgumentParser, output_help: str) -> None:
    """The run-config options that `train` and `sweep` share (see `flag_overrides`)."""
    p.add_argument(
        "--config",
        type=path_arg,
        help="YAML run config (sections: model, lora, data, optim, train, mesh; default: the built-in demonstration)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set lora.r=8 --set optim.lr=1e-4 --set "
        "lora.target_modules=[q_proj,v_proj] (repeatable; values are YAML, and text "
        "as it is for text fields such as train.output_dir)",
    )
    p.add_argument("--model", type=path_arg, help="Hugging Face model directory (default: the built-in demo model)")
    p.add_argument("--data", type=path_arg, help="training JSONL ({text} | {prompt, completion} | {messages})")
    p.add_argument("--eval-data", type=path_arg, help="held-out JSONL (default: a split of --data)")
    p.add_argument(
        "--quantize",
        choices=("nf4", "int8", "fp8"),
        help="a quantised frozen base: nf4 (QLoRA), int8, or fp8 (FP8 GEMMs on Hopper/Ada); "
        "same as --set model.quantize=...",
    )
    p.add_argument("--output-dir", type=path_arg, help=output_help)
    p.add_argument("--overwrite", action="store_true", help="replace what --output-dir holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_run_config(path: str | None) -> RunConfig:
    """The RunConfig of a YAML file, or the demonstration's when `path` is None."""
    if path is None:
        return demo_run_config()
    d = load_yaml(path, "--config")
    try:
        return RunConfig.from_dict({} if d is None else d)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None


def quote(text: str) -> str:
    """`text` as a YAML single-quoted scalar: a flag's value is taken exactly (`--data null` is a
    file named null)."""
    return "'" + text.replace("'", "''") + "'"


def flag_overrides(args) -> list[str]:
    """`--set` pairs, then the shorthand flags of `add_run_args` as KEY=VALUE pairs."""
    pairs = list(args.overrides)
    for flag, key in (
        ("model", "model.path"),
        ("data", "data.train_file"),
        ("eval_data", "data.eval_file"),
        ("quantize", "model.quantize"),
    ):
        if getattr(args, flag, None) is not None:
            pairs.append(f"{key}={quote(getattr(args, flag))}")
    return pairs
