"""`lora-jax`: argument parsing only; each subcommand calls one library function.

User errors print one line (`lora-jax: error: ...`) and exit with status 2, usage errors included;
a diverged run exits with status 1. `main(argv)` returns the exit status instead of exiting, so it
can be called in-process (tests, notebooks).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings

import jax
from rich.console import Console
from rich.table import Table

from lora_jax.distributed import initialize
from lora_jax.errors import ConfigError, ConfigWarning, LoraJaxError
from lora_jax.export import export_checkpoint
from lora_jax.generate import generate_cli
from lora_jax.run_args import add_run_args, flag_overrides, load_run_config, path_arg, quote
from lora_jax.sweep_cli import add_sweep_parser
from lora_jax.train.loop import TrainingDiverged, TrainingInterrupted, train

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other user error (status 2)."""

    def error(self, message: str):
        self.exit(2, f"lora-jax: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, below: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (below is not None and value >= below):
            limit = f" and < {below}" if below is not None else ""
            raise argparse.ArgumentTypeError(f"{text} must be an integer >= {minimum}{limit}")
        return value

    parse.__name__ = "int"
    return parse


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


# the flags that would change a run's configuration: --resume refuses them (see _train_args)
_CONFIG_FLAGS = (
    ("config", "--config"),
    ("overrides", "--set"),
    ("model", "--model"),
    ("data", "--data"),
    ("eval_data", "--eval-data"),
    ("quantize", "--quantize"),
)


def _train_args(p: argparse.ArgumentParser) -> None:
    add_run_args(p, "run directory (default: runs/demo)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir with its saved config (run.json); "
        "--config, --set, --model, --data, --eval-data, --quantize and --overwrite "
        "would change or discard that run, so they are refused with --resume",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: jax.distributed.initialize() (TPU pods, SLURM, or LORA_JAX_* env)",
    )


def _run_config(args):
    """The RunConfig of `lora-jax train`'s arguments; --resume refuses what would change the run."""
    if args.resume:
        given = [
            f"{flag} {' '.join(v) if isinstance(v, list) else v}"
            for attr, flag in _CONFIG_FLAGS
            if (v := getattr(args, attr, None))
        ]
        if given:
            raise ConfigError(
                f"--resume continues with the run's saved config (run.json), so "
                f"{'; '.join(given)} would be ignored and is refused: drop it, or start a "
                "new run with --overwrite"
            )
        if args.overwrite:
            raise ConfigError("--resume continues the run in --output-dir and --overwrite deletes it; pass one of them")
    pairs = flag_overrides(args)
    if args.output_dir is not None:
        pairs.append(f"train.output_dir={quote(args.output_dir)}")
    return load_run_config(args.config).with_overrides(pairs)


def cmd_train(args) -> int:
    run = _run_config(args)  # bad input fails here, before anything starts
    if not args.resume:  # a resumed run was warned when it started
        run.warn_unusual()
    initialize(auto=args.distributed)
    summary = train(run, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if jax.process_index() == 0:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    table = Table(title="lora-jax train: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "steps",
        "train_loss_first",
        "train_loss_last",
        "eval_loss_before",
        "eval_loss_after",
        "eval_before",
        "eval_after",
        "tokens_per_s",
        "mfu",
        "compile_s",
        "checkpoint_s",
        "trainable_params",
        "device",
        "adapter_dir",
        "output_dir",
    ):
        value = summary.get(key)
        if isinstance(value, float):
            value = f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
        table.add_row(key, "-" if value is None else str(value))
    Console(stderr=False).print(table)


def _check_export_dirs(args) -> None:
    """An export directory may not be, or hold, the run it exports (replacing it would delete the
    run), nor be the other export's directory."""
    run = os.path.realpath(args.checkpoint)
    outs = [(flag, d) for flag, d in (("--peft", args.peft), ("--merged", args.merged)) if d]
    for flag, d in outs:
        real = os.path.realpath(d)
        if real == run or run.startswith(real.rstrip(os.sep) + os.sep):
            raise ConfigError(
                f"{flag} {d} is, or holds, the run directory {args.checkpoint}; export to another directory"
            )
    if len(outs) == 2 and os.path.realpath(outs[0][1]) == os.path.realpath(outs[1][1]):
        raise ConfigError(f"--peft and --merged both name {args.peft}; give them different directories")


def cmd_export(args) -> int:
    _check_export_dirs(args)
    written = export_checkpoint(
        args.checkpoint,
        step=args.step,
        peft_dir=args.peft,
        merged_dir=args.merged,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(json.dumps(written, indent=2))
    return 0


def cmd_generate(args) -> int:
    for text in generate_cli(
        model=args.model,
        adapter=args.adapter,
        checkpoint=args.checkpoint,
        prompts=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    ):
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-jax",
        description="LoRA fine-tuning of decoder language models in JAX (Llama, Qwen2, Qwen3, Mistral, GPT-2, Gemma 3)",
    )
    sub = parser.add_subparsers(dest="command", required=True)  # subparsers are _Parser too

    p = sub.add_parser("train", help="fine-tune (no arguments: the built-in demonstration)")
    _train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a run's checkpoint as a PEFT adapter or a merged HF model")
    p.add_argument(
        "--checkpoint", required=True, type=path_arg, metavar="RUN_DIR", help="a `lora-jax train` output dir"
    )
    p.add_argument("--step", type=_int_at_least(0), help="checkpoint step (default: latest)")
    p.add_argument("--peft", type=path_arg, metavar="OUT_DIR", help="write a PEFT adapter here")
    p.add_argument(
        "--merged", type=path_arg, metavar="OUT_DIR", help="write the merged model here (transformers format)"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="export dtype")
    p.add_argument("--max-shard-size", default="5GB", help="merged export shard size (default 5GB)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an OUT_DIR that holds a previous export of the same kind (anything else is refused)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text with a base model and optional adapter")
    p.add_argument("--model", type=path_arg, help="Hugging Face model directory (default: the built-in demo model)")
    p.add_argument("--adapter", type=path_arg, help="PEFT adapter directory")
    p.add_argument(
        "--checkpoint",
        type=path_arg,
        metavar="RUN_DIR",
        help="use the latest checkpoint of a run instead (its base model too)",
    )
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable, not empty)")
    p.add_argument(
        "--max-new-tokens",
        type=_int_at_least(1),
        default=48,
        help="tokens to generate per prompt (default 48); prompt + these must fit the model's "
        "context (max_position_embeddings)",
    )
    p.add_argument("--temperature", type=_nonnegative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--top-k",
        type=_int_at_least(0),
        default=0,
        help="sample from the k most likely tokens (needs --temperature > 0; 0 = all)",
    )
    p.add_argument("--seed", type=_int_at_least(0, 2**63), default=0, help="sampling seed (default 0)")
    p.set_defaults(func=cmd_generate)

    add_sweep_parser(sub)
    return parser


def _quiet_startup() -> None:
    """transformers' start-up notices ("PyTorch was not found...", advisory warnings) are noise for
    this program, which never runs torch; its errors still show. Takes effect for a transformers
    imported after this; the user's own TRANSFORMERS_VERBOSITY / _NO_ADVISORY_WARNINGS win."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _show_config_warning(show):
    """A `warnings.showwarning` printing a ConfigWarning as one `lora-jax: warning:` line."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ConfigWarning):
            print(f"lora-jax: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def _one_line(error) -> str:
    """The message on one line, whatever it quotes (a record's text, a YAML snippet)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def main(argv=None) -> int:
    """Run `lora-jax ARGV`; returns the exit status (0 ok, 1 diverged, 2 bad input, 128 + signal:
    stopped by SIGTERM (143) or SIGINT (130) after saving a checkpoint)."""
    _quiet_startup()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error already printed as one line (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2

    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigWarning)
        warnings.showwarning = _show_config_warning(warnings.showwarning)
        try:
            return args.func(args)
        except TrainingInterrupted as e:  # SIGTERM/SIGINT: the step in flight was saved
            print(f"lora-jax: {e}", file=sys.stderr)
            return e.exit_code  # 128 + signal: 143 SIGTERM, 130 SIGINT
        except TrainingDiverged as e:
            print(f"lora-jax: {e}", file=sys.stderr)
            return 1
        except LoraJaxError as e:
            print(f"lora-jax: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("lora-jax: interrupted", file=sys.stderr)
            # a save abandoned by a second Ctrl-C: Orbax's threads would log errors at exit
            logging.disable(logging.CRITICAL)
            return 130


if __name__ == "__main__":
    sys.exit(main())
