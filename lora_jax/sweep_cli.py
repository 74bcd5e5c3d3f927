"""`lora-jax sweep`: argument parsing for `lora_jax.sweep.sweep` (registered by `lora_jax.cli`;
the run options it shares with `train` come from `lora_jax.run_args`).

    lora-jax sweep                                   # r in {4, 16} x alpha in {8, 32} on the demo
    lora-jax sweep --grid lora.r=4,8,16,32 --grid lora.lora_alpha=8,16,32 --grid optim.lr=1e-4,3e-4
    lora-jax sweep --sweep experiments/sweeps/demo_rank_alpha.yaml --set train.steps=50

Layering, later wins: the base run (--config, else the built-in demonstration with
`DEMO_SWEEP_STEPS` steps) <- the sweep file's run-config sections <- its `set:` list <- --set,
--model, --data, --eval-data, --quantize. The grid is the sweep file's `grid:` updated by --grid options
(the demonstration grid when neither gives one). Output directory: --output-dir, else the sweep
file's `output_dir:`, else runs/sweep.

Sweep file (YAML):

    output_dir: runs/sweep-rank-alpha      # optional
    lora: {target_modules: all-linear}     # optional run-config sections (model, lora, data, optim,
    train: {steps: 150}                    #   train), merged onto the base run
    set: [optim.warmup_steps=10]           # optional KEY=VALUE overrides (or a mapping)
    grid:                                  # {key: [values]} (a product), or a list of
      lora.r: [4, 8, 16, 32]               #   configurations [{key: value}, ...]
      lora.lora_alpha: [8, 16, 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import cast

from rich.console import Console

from lora_jax.errors import ConfigError
from lora_jax.run_args import add_run_args, flag_overrides, load_run_config
from lora_jax.run_config import RunConfig, load_yaml, parse_field_value, section_classes
from lora_jax.sweep import ALLOWED_KEYS, check_grid, expand_grid, normalize_grid, parse_grid_args, ranking_table, sweep

__all__ = ["add_sweep_parser", "cmd_sweep", "build_sweep", "DEMO_GRID", "DEMO_SWEEP_STEPS", "DEFAULT_OUTPUT_DIR"]

DEMO_GRID = {"lora.r": [4, 16], "lora.lora_alpha": [8, 32]}
DEMO_SWEEP_STEPS = 120  # the demo trains 300; a 2 x 2 sweep of 120 steps stays under ~2 min on 2 cores
DEFAULT_OUTPUT_DIR = "runs/sweep"
_FILE_KEYS = ("grid", "set", "output_dir", "model", "lora", "data", "optim", "train")


def add_sweep_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sweep",
        help="train a grid of LoRA configurations in one compiled program (no arguments: "
        "r x alpha on the built-in demonstration)",
        description="Train every configuration of a grid (Cartesian product) over one frozen base in "
        "one jitted, vmapped program; write results.csv/json, loss_curves.png, heatmap.png "
        "and one PEFT adapter per configuration. Grid keys: " + ", ".join(ALLOWED_KEYS),
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="one axis of the grid, e.g. --grid lora.r=4,8,16 --grid optim.lr=1e-4,3e-4 "
        "(repeatable; the grid is their Cartesian product)",
    )
    p.add_argument(
        "--sweep",
        metavar="FILE.yaml",
        help="sweep file: a grid: mapping plus optional run-config sections, set:, output_dir:",
    )
    add_run_args(p, f"sweep directory (default: {DEFAULT_OUTPUT_DIR})")
    p.add_argument(
        "--adapters-per-pass",
        default="auto",
        metavar="N|all|auto",
        help="configurations trained per pass of the one compiled step: all at once "
        "(vmapped; GPU/TPU), N at a time in a loop inside the program, or auto "
        "(1 on a CPU, all elsewhere)",
    )
    p.set_defaults(func=cmd_sweep)
    return p


def _read_sweep_file(path: str) -> dict:
    spec = load_yaml(path, "--sweep")
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ConfigError(f"--sweep {path} holds a {type(spec).__name__}; it must be a mapping with a grid: key")
    unknown = sorted(set(map(str, spec)) - set(_FILE_KEYS))
    if unknown:
        raise ConfigError(f"--sweep {path}: unknown key(s) {unknown}; allowed: {list(_FILE_KEYS)}")
    out = spec.get("output_dir")
    if out is not None and (not isinstance(out, str) or not out.strip()):
        raise ConfigError(f"--sweep {path}: output_dir: {out!r} must be a directory path (text)")
    return spec


def _sets(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{where} set: must be a list of KEY=VALUE strings or a mapping, not {value!r}")


def _file_value(section: str, key, value):
    """A field of a sweep file's run-config section: text is parsed by the field's annotation, as
    --set parses it (`[q_proj, v_proj]`, `1e-4`); other YAML values, and keys that are no field
    (`RunConfig.from_dict` names them), are kept as they are."""
    klass = section_classes()[section]
    if not isinstance(value, str) or key not in {f.name for f in dataclasses.fields(klass)}:
        return value
    return parse_field_value(klass, key, value, key=f"{section}.{key}")


def build_sweep(args):
    """(run, grid, output_dir) from parsed arguments; ConfigError on bad input."""
    cli_grid = parse_grid_args(args.grid)  # malformed / unknown keys fail before anything loads
    spec = _read_sweep_file(args.sweep) if args.sweep else {}
    run = load_run_config(args.config)  # --config, else the demonstration
    if not args.config:
        run = run.with_overrides([f"train.steps={DEMO_SWEEP_STEPS}"])
    sections = {k: spec[k] for k in ("model", "lora", "data", "optim", "train") if k in spec}
    if sections:
        d = run.to_dict()
        for name, values in sections.items():
            if not isinstance(values, dict):
                raise ConfigError(f"--sweep {args.sweep}: section {name}: must be a mapping of fields")
        try:
            for name, values in sections.items():
                d[name].update({k: _file_value(name, k, v) for k, v in values.items()})
            run = RunConfig.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"--sweep {args.sweep}: {e}") from None
    run = run.with_overrides(_sets(spec.get("set"), f"--sweep {args.sweep}:") + flag_overrides(args))

    file_grid = spec.get("grid")
    if file_grid is not None and not isinstance(file_grid, (dict, list)):
        raise ConfigError(f"--sweep {args.sweep}: grid: must map keys to value lists, e.g. grid: {{lora.r: [4, 8]}}")
    if isinstance(file_grid, list):  # an explicit list of configurations
        if cli_grid:
            raise ConfigError(
                "--grid cannot extend a sweep file whose grid: is a list of configurations; put the values in the file"
            )
        grid = file_grid
        check_grid(grid)
    elif file_grid is not None or cli_grid:
        grid = dict(normalize_grid(file_grid)) if file_grid is not None else {}
        grid.update(cli_grid)
    else:
        grid = dict(DEMO_GRID)
    expand_grid(run, grid)  # every configuration is valid (e.g. optim.lr=-1) before anything loads
    out = args.output_dir or spec.get("output_dir") or DEFAULT_OUTPUT_DIR
    return run, grid, out


def _per_pass(text: str):
    """--adapters-per-pass: "auto", "all" (None) or a positive integer."""
    if text in ("auto", "all"):
        return None if text == "all" else text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--adapters-per-pass {text}: use a positive integer, all or auto")
    return n


def cmd_sweep(args) -> int:
    per_pass = _per_pass(args.adapters_per_pass)
    run, grid, out = build_sweep(args)
    run.warn_unusual()
    result = sweep(
        run, grid, output_dir=out, progress=not args.no_progress, overwrite=args.overwrite, adapters_per_pass=per_pass
    )
    console = Console()
    console.print(ranking_table(result.rows, result.metric, title=f"lora-jax sweep: {len(result.rows)} configurations"))
    t = result.timing
    console.print(
        f"one program: {result.compiles['train_step']} compile(s) of the train step for "
        f"{len(result.rows)} configurations; {t['total_s']:.1f} s in all "
        f"(compile {t['compile_s']:.1f} s, train {t['train_s']:.1f} s, eval {t['eval_s']:.1f} s)"
    )
    out_dir = cast(str, result.output_dir)  # set: build_sweep always names an output directory
    console.print(
        f"results: {os.path.join(out_dir, 'results.csv')}, results.json, loss_curves.png, heatmap.png, adapters/<name>/"
    )
    if all(r["diverged"] for r in result.rows):
        print(
            "lora-jax: every configuration diverged (non-finite loss); lower optim.lr or raise optim.warmup_steps",
            file=sys.stderr,
        )
        return 1
    return 0
