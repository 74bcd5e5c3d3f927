"""Export a training run's checkpoint to a PEFT adapter or a merged Hugging Face model.

Everything needed is in the run directory (configs, model path, base fingerprint), so nothing is
re-typed; a base that no longer matches the fingerprint is refused.
"""

from __future__ import annotations

import os

import jax

from lora_jax.checkpoint import Checkpointer, base_fingerprint, fingerprints_match
from lora_jax.config import RunConfig
from lora_jax.errors import CheckpointFormatError, ConfigError

__all__ = ["load_run", "export_checkpoint"]


def load_run(run_dir: str, step: int | None = None):
    """(cfg, params, lora, lcfg, run, step) restored from a run directory's checkpoint."""
    from lora_jax.hf.load import load_pretrained
    from lora_jax.lora.tree import combine, init_lora, split_trainable, unmerge
    from lora_jax.train.loop import resolve_dtype
    from lora_jax.train.step import init_state, make_schedule, make_tx

    run_json = os.path.join(run_dir, "run.json")
    if not os.path.isfile(run_json):
        raise CheckpointFormatError(f"{run_dir} is not a lora-jax run directory (no run.json); pass the "
                                    "--output-dir of a `lora-jax train` run")
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=10**6, async_save=False)
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
                      max_shard_size: str = "5GB") -> dict:
    from lora_jax.hf.peft import save_peft
    from lora_jax.hf.save import save_pretrained

    if not peft_dir and not merged_dir:
        raise ConfigError("nothing to export: pass --peft OUT_DIR and/or --merged OUT_DIR")
    cfg, params, lora, lcfg, run, step, model_path = load_run(run_dir, step)
    written = {"step": step}
    if peft_dir:
        save_peft(peft_dir, lora, lcfg, cfg, base_model_name_or_path=model_path, params=params,
                  **({"dtype": dtype} if dtype else {}))
        written["peft"] = os.path.abspath(peft_dir)
    if merged_dir:
        save_pretrained(merged_dir, params, cfg, lora=lora, lcfg=lcfg, dtype=dtype,
                        max_shard_size=max_shard_size, tokenizer_dir=model_path)
        written["merged"] = os.path.abspath(merged_dir)
    return written
