"""The run's output directory: refused, opened or resumed, and the small JSON files in it.

`prepare_output_dir` refuses a directory holding another run (unless resuming or overwriting) and
writes nothing; `open_output` restores the latest checkpoint when resuming (refusing one that does
not fit the run or its base) or creates the directory; `write_json` writes a file atomically on
process 0; `saved_eval_before` / `saved_first_loss` read back what a resumed run already measured.
"""

from __future__ import annotations

import json
import os
import shutil

from lora_jax.checkpoint import Checkpointer, CheckpointMismatch, fingerprints_match
from lora_jax.data import DataLoader
from lora_jax.errors import ConfigError, LoraJaxError
from lora_jax.run_config import RunConfig
from lora_jax.train.progress import metric_lines

__all__ = ["prepare_output_dir", "output_dir", "open_output", "write_json", "saved_eval_before", "saved_first_loss"]


def prepare_output_dir(out: str, run: RunConfig, resume: bool, overwrite: bool) -> RunConfig:
    """Refuse a directory holding another run unless resuming / overwriting; returns the config to
    use (the saved one when resuming). Writes nothing."""
    _check_output_path(out)
    run_json = os.path.join(out, "run.json")
    if resume:
        if not os.path.isfile(run_json):
            raise ConfigError(f"--resume: {out} holds no run (no run.json); drop --resume to start one")
        with open(run_json) as f:
            return RunConfig.from_dict(json.load(f)["run"])
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ConfigError(
                f"output directory {out} already holds a run; pass --resume to continue "
                "it, --overwrite to replace it, or choose another --output-dir"
            )
        if not os.path.isfile(run_json):
            raise ConfigError(
                f"--overwrite: {out} is not a lora-jax run directory (no run.json); "
                "refusing to delete it. Choose another --output-dir"
            )
    return run


def _check_output_path(out: str) -> None:
    """An output directory must be a directory, or creatable: its nearest existing ancestor a
    writable directory."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output-dir {out} is a file, not a directory; choose another --output-dir")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(
            f"--output-dir {out} cannot be created: {parent} is a file, not a directory; choose another --output-dir"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out}: {parent} is not writable; choose another --output-dir")


def output_dir(value) -> str:
    """train.output_dir as an absolute path; a value YAML read as a number, a bool or null (e.g.
    `output_dir: 1.5e5` gives 150000.0) is refused rather than guessed back."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        kind = "empty" if isinstance(value, str) else f"it was read as a {type(value).__name__}"
        raise ConfigError(
            f"train.output_dir={value!r} is not a directory path ({kind}); give it as a "
            'string (in a YAML file, quote it: output_dir: "1e5")'
        )
    return os.path.abspath(os.path.expanduser(value))


def _mismatch_message(e: CheckpointMismatch, ckpt: Checkpointer, out: str, lcfg) -> str:
    """--resume into a state the checkpoint does not fit: which leaf, and which LoRA fields of the
    run's config differ from the ones the checkpoint was written with."""
    changed = ""
    try:
        saved = ckpt.restore_meta(e.step)[1]["run"]["lora"]
    except (LoraJaxError, OSError, KeyError, TypeError, ValueError):
        saved = None
    if isinstance(saved, dict):
        now = lcfg.to_dict()
        diffs = [
            f"lora.{k}={now.get(k)!r} (the checkpoint's: {saved[k]!r})"
            for k in saved
            if json.dumps(saved[k], sort_keys=True, default=str) != json.dumps(now.get(k), sort_keys=True, default=str)
        ]
        if diffs:
            changed = f"; run.json says {', '.join(diffs)}"
    more = f" (and {len(e.differences) - 1} more)" if len(e.differences) > 1 else ""
    return (
        f"--resume: the checkpoint at step {e.step} in {out} does not fit this run's config: its "
        f"adapter shapes differ ({e.differences[0]}{more}){changed}. Resume with the config the "
        "checkpoint was written with, or start again with --overwrite"
    )


def open_output(
    out: str, run: RunConfig, state, loader: DataLoader, fingerprint, model_path: str, resume: bool, overwrite: bool
):
    """`(state, Checkpointer)`: resuming, the latest checkpoint's state (and the loader's place),
    refused when it does not fit this run or its base; else a fresh state in a new (or, with
    `overwrite`, emptied) output directory."""
    ckpt_dir = os.path.join(out, "checkpoints")
    if resume:
        ckpt = Checkpointer(ckpt_dir, run.train.keep_checkpoints)
        if ckpt.latest_step() is None:
            raise ConfigError(f"--resume: {out} has no complete checkpoint yet; start again with --overwrite")
        try:
            state, meta = ckpt.restore(None, state)
        except CheckpointMismatch as e:
            raise ConfigError(_mismatch_message(e, ckpt, out, run.lora)) from None
        if not fingerprints_match(meta["fingerprint"], fingerprint):
            raise ConfigError(
                f"--resume: the base weights at {model_path} differ from the ones this run "
                "started from (fingerprint mismatch); point --model at the original base"
            )
        loader.set_state(meta["loader"])
    else:
        if os.path.isdir(out) and overwrite:
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        ckpt = Checkpointer(ckpt_dir, run.train.keep_checkpoints)
    return state, ckpt


def write_json(path: str, obj: dict, enabled: bool) -> None:
    if not enabled:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def saved_eval_before(out: str) -> dict:
    path = os.path.join(out, "eval_before.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def saved_first_loss(out: str) -> float | None:
    return next((rec["loss"] for _, rec in metric_lines(os.path.join(out, "metrics.jsonl")) if "loss" in rec), None)
