"""Export a training run's checkpoint to a PEFT adapter or a merged Hugging Face model.

Everything needed is in the run directory (configs, model path, base fingerprint), so nothing is
re-typed; a base that no longer matches the fingerprint is refused.

Exports never destroy what they did not write: a non-empty target is refused unless `overwrite`,
and even then only a previous export of the same kind is replaced (`lora_jax.hf.save.atomic_dir`);
the targets and options are checked before the checkpoint is restored, so a refusal costs nothing.
"""

from __future__ import annotations

import os

import jax

from lora_jax.checkpoint import Checkpointer, base_fingerprint, fingerprints_match
from lora_jax.config import RunConfig
from lora_jax.errors import CheckpointFormatError, ConfigError

__all__ = ["load_run", "export_checkpoint"]

_DTYPES = ("float32", "bfloat16", "float16")


def load_run(run_dir: str, step: int | None = None):
    """(cfg, params, lora, lcfg, run, step) restored from a run directory's checkpoint."""
    from lora_jax.hf.load import load_pretrained
    from lora_jax.lora.tree import combine, init_lora, split_trainable, unmerge
    from lora_jax.train.loop import resolve_dtype
    from lora_jax.train.step import init_state, make_schedule, make_tx

    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise CheckpointFormatError(f"{run_dir}: no such run directory; pass the --output-dir of a "
                                    "`lora-jax train` run")
    run_json = os.path.join(run_dir, "run.json")
    if not os.path.isfile(run_json):
        raise CheckpointFormatError(f"{run_dir} is not a lora-jax run directory (no run.json); pass the "
                                    "--output-dir of a `lora-jax train` run")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    no_checkpoint = (f"{run_dir} has no checkpoint yet: train it first (lora-jax train --output-dir "
                     f"{run_dir} --overwrite starts it again), or, while it trains, export once it has "
                     "saved one (every train.save_every steps, and at the end)")
    if not os.path.isdir(ckpt_dir):  # checked here: the Checkpointer would create the directory
        raise CheckpointFormatError(no_checkpoint)
    ckpt = Checkpointer(ckpt_dir, keep=10**6, async_save=False)
    available = ckpt.all_steps()
    if not available:
        ckpt.close()
        raise CheckpointFormatError(no_checkpoint)
    if step is not None and step not in available:
        ckpt.close()
        raise CheckpointFormatError(f"{run_dir} has no checkpoint for step {step}; its checkpoints are at "
                                    f"steps {sorted(available)} (leave out --step for the latest)")
    step, meta = ckpt.restore_meta(step)
    run = RunConfig.from_dict(meta["run"])
    cfg, params = load_pretrained(meta["model_path"], dtype=resolve_dtype(run.model.dtype),
                                  scan_layers=run.model.scan_layers, quantize=run.model.quantize)
    lcfg = run.lora
    lora = init_lora(params, lcfg, jax.random.key(run.train.seed))
    if lcfg.init_lora_weights == "pissa":
        params = unmerge(params, lora, lcfg)
    if not fingerprints_match(base_fingerprint(params), meta["fingerprint"]):
        raise ConfigError(f"the base model at {meta['model_path']} is not the one this run trained on "
                          "(fingerprint mismatch); restore the original base weights")
    split = split_trainable(params, lora, lcfg)
    tx = make_tx(lcfg, run.optim, make_schedule(run.optim, run.train.steps))
    state, _ = ckpt.restore(step, init_state(split.trainable, tx, run.train.seed))
    ckpt.close()
    params, lora = combine(state.trainable, split.frozen)
    return cfg, params, lora, lcfg, run, step, meta["model_path"]


def export_checkpoint(run_dir: str, *, step: int | None = None, peft_dir: str | None = None,
                      merged_dir: str | None = None, dtype: str | None = None,
                      max_shard_size: int | str = "5GB", overwrite: bool = False) -> dict:
    """Write a run's checkpoint (`step`, default the latest) as a PEFT adapter (`peft_dir`) and/or a
    merged Hugging Face model (`merged_dir`); returns {"step", "peft", "merged"} (absolute paths).

    overwrite: replace a target that holds a previous export of the same kind; without it a
        non-empty target is refused. Anything else (a file, a directory with other contents) is
        refused either way, and nothing is written then.
    """
    from lora_jax.hf.peft import save_peft
    from lora_jax.hf.save import check_export_target, parse_size, save_pretrained

    if not peft_dir and not merged_dir:
        raise ConfigError("nothing to export: pass --peft OUT_DIR and/or --merged OUT_DIR")
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}; choose one of {_DTYPES}")
    # Everything that can be refused is, before the (slow) restore and before anything is written.
    targets = {}
    if peft_dir:
        targets["peft"] = check_export_target(peft_dir, "peft", overwrite)
    if merged_dir:
        parse_size(max_shard_size, "max_shard_size (--max-shard-size)")
        targets["merged"] = check_export_target(merged_dir, "model", overwrite)
    if len(set(targets.values())) < len(targets):
        raise ConfigError(f"--peft and --merged are both {targets['peft']}; give each its own directory")
    cfg, params, lora, lcfg, run, step, model_path = load_run(run_dir, step)
    written = {"step": step}
    if peft_dir:
        written["peft"] = save_peft(peft_dir, lora, lcfg, cfg, base_model_name_or_path=model_path,
                                    params=params, overwrite=overwrite, **({"dtype": dtype} if dtype else {}))
    if merged_dir:
        written["merged"] = save_pretrained(merged_dir, params, cfg, lora=lora, lcfg=lcfg, dtype=dtype,
                                            max_shard_size=max_shard_size, tokenizer_dir=model_path,
                                            overwrite=overwrite)
    return written
