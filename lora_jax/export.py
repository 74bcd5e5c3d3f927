"""Export a training run's checkpoint to a PEFT adapter or a merged Hugging Face model.

Everything needed is in the run directory (configs, model path, base fingerprint), so nothing is
re-typed (`lora_jax.session.load_run` restores it); a base that no longer matches the fingerprint
is refused.

Exports never destroy what they did not write: a non-empty target is refused unless `overwrite`,
and even then only a previous export of the same kind is replaced (`lora_jax.hf.save.atomic_dir`);
the targets and options are checked before the checkpoint is restored, so a refusal costs nothing.
"""

from __future__ import annotations

from lora_jax.errors import ConfigError
from lora_jax.hf.peft import save_peft
from lora_jax.hf.save import check_export_target, parse_size, save_pretrained
from lora_jax.session import load_run

__all__ = ["export_checkpoint"]

_DTYPES = ("float32", "bfloat16", "float16")


def export_checkpoint(
    run_dir: str,
    *,
    step: int | None = None,
    peft_dir: str | None = None,
    merged_dir: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> dict:
    """Write a run's checkpoint (`step`, default the latest) as a PEFT adapter (`peft_dir`) and/or a
    merged Hugging Face model (`merged_dir`); returns {"step", "peft", "merged"} (absolute paths).

    overwrite: replace a target that holds a previous export of the same kind; without it a
        non-empty target is refused. Anything else (a file, a directory with other contents) is
        refused either way, and nothing is written then.
    """
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
    written: dict[str, int | str] = {"step": step}
    if peft_dir:
        written["peft"] = save_peft(
            peft_dir,
            lora,
            lcfg,
            cfg,
            base_model_name_or_path=model_path,
            params=params,
            overwrite=overwrite,
            **({"dtype": dtype} if dtype else {}),
        )
    if merged_dir:
        written["merged"] = save_pretrained(
            merged_dir,
            params,
            cfg,
            lora=lora,
            lcfg=lcfg,
            dtype=dtype,
            max_shard_size=max_shard_size,
            tokenizer_dir=model_path,
            overwrite=overwrite,
        )
    return written
