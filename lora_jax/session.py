"""The session layer: from a run config (or a run directory) to a tokenizer, data and a loaded model.

`train()`, `sweep()`, `generate` and `export` start here, so each opens a model directory, reads the
data and calls `load_pretrained` the same way:

    inputs = open_inputs(run)                     # model dir checked, tokenizer, datasets
    cfg, params = load_model(run.model, inputs.model_path, mesh=mesh, rules=rules)
    cfg = fit_to_data(cfg, inputs)                # packed rows: the segment bound of the data
    saved = load_run("runs/demo")                 # a training run's checkpoint, as a LoadedRun

`load_model` is the one place that turns a run's model options (`ModelConfig`) into a
`load_pretrained` call.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax

from lora_jax.checkpoint import Checkpointer, base_fingerprint, fingerprints_match
from lora_jax.data import DataConfig, Datasets, build_datasets
from lora_jax.demo import DEMO_MODEL, DEMO_TRAIN
from lora_jax.errors import CheckpointFormatError, ConfigError
from lora_jax.hf import load as hf_load  # through the module: tests stand in for load_pretrained
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.tree import combine, init_lora, split_trainable, unmerge
from lora_jax.models.attention import segments_per_row
from lora_jax.models.registry import FamilyConfig, config_from_hf
from lora_jax.run_config import ModelConfig, RunConfig
from lora_jax.train.step import init_state, make_schedule, make_tx

__all__ = [
    "resolve_model_path",
    "resolve_dtype",
    "open_model_dir",
    "data_config",
    "Inputs",
    "open_inputs",
    "load_model",
    "fit_to_data",
    "LoadedRun",
    "load_run",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def resolve_model_path(path: str | None) -> str:
    """`model.path`, or the built-in demonstration model when it is None."""
    if path is None:
        return DEMO_MODEL
    return os.fspath(path)


def resolve_dtype(dtype: str) -> str:
    """`model.dtype`: "auto" is float32 on a CPU, bfloat16 on an accelerator."""
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dtype


def open_model_dir(model_path: str):
    """Check a model directory (the config.json of a supported family, safetensors weights,
    tokenizer files) before anything is written, one clear error each; returns its tokenizer."""
    # imported on first use: a slow import, and `lora-jax` sets its verbosity before it
    # (lora_jax.cli._quiet_startup)
    import transformers

    if not os.path.isdir(model_path):
        raise ConfigError(
            f"model directory {model_path} does not exist; pass --model DIR (a Hugging Face "
            "model directory: config.json, *.safetensors, tokenizer files)"
        )
    config_from_hf(model_path)
    hf_load.weight_files(model_path)
    needed = (
        "tokenizer.json (or tokenizer.model, or vocab.json + merges.txt) and tokenizer_config.json; "
        "copy them from the base model's repository"
    )
    if not any(os.path.isfile(os.path.join(model_path, name)) for name in _TOKENIZER_FILES):
        raise ConfigError(f"model directory {model_path} has no tokenizer files: it needs {needed}")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as e:  # transformers' text runs to several lines
        raise ConfigError(
            f"cannot load the tokenizer in {model_path} ({type(e).__name__}); the model directory needs {needed}"
        ) from None


def data_config(run: RunConfig) -> DataConfig:
    """`run.data`, with the demonstration's training file when neither a model nor data is given."""
    if run.data.train_file is None and run.model.path is None:
        return run.data.replace(train_file=DEMO_TRAIN)
    return run.data


class Inputs(NamedTuple):
    """A run's checked model directory and data (`open_inputs`)."""

    model_path: str
    tokenizer: Any
    data: DataConfig  # `data_config(run)`
    datasets: Datasets


def open_inputs(run: RunConfig) -> Inputs:
    """The model directory (checked, its tokenizer loaded) and the datasets of `run`; writes
    nothing, and refuses bad input with one clear error before any weights load."""
    dcfg = data_config(run)
    model_path = resolve_model_path(run.model.path)
    tokenizer = open_model_dir(model_path)
    _check_positions(config_from_hf(model_path), dcfg)
    return Inputs(model_path, tokenizer, dcfg, build_datasets(dcfg, tokenizer))


def _check_positions(cfg: FamilyConfig, dcfg: DataConfig) -> None:
    """GPT-2's positions are a learned table of `n_positions` rows: a longer row would index past
    it (JAX clamps the index, silently), so it is refused. RoPE families extrapolate: not checked."""
    if cfg.model_type == "gpt2" and dcfg.seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={dcfg.seq_len} exceeds this gpt2 model's n_positions={cfg.max_position_embeddings} "
            f"(its learned position table); set data.seq_len to at most {cfg.max_position_embeddings}"
        )


def load_model(model: ModelConfig, path: str | None = None, *, mesh=None, rules=None):
    """`(model config, params)` of the base model (its family's config: `LlamaConfig`, `GPT2Config`,
    ...), loaded as the run's model options say (dtype, layer scan, remat, quantisation, adapter
    fusion, attention kernel); `path` (default `model.path`, or the demonstration model) overrides
    where from. With `mesh`, each leaf goes to its sharding under the logical-axis `rules`."""
    path = resolve_model_path(model.path) if path is None else path
    return hf_load.load_pretrained(
        path,
        dtype=resolve_dtype(model.dtype),
        mesh=mesh,
        rules=rules,
        scan_layers=model.scan_layers,
        remat_policy=model.remat_policy,
        mlp_chunk_tokens=model.mlp_chunk_tokens,
        quantize=model.quantize,
        fuse_wide_adapters=model.fuse_wide_adapters,
        attention=model.attention,
    )


def fit_to_data(cfg: FamilyConfig, inputs: Inputs) -> FamilyConfig:
    """Packed rows: the bound on segments per row that cuDNN's packed attention sizes its buffers by."""
    if inputs.data.packing:
        return cfg.replace(max_segments=segments_per_row(inputs.datasets.train_rows + inputs.datasets.eval_rows))
    return cfg


class LoadedRun(NamedTuple):
    """A training run restored from its directory (`load_run`)."""

    cfg: Any  # FamilyConfig: the base's config (Any while hf.save_pretrained is typed for LlamaConfig)
    params: Any  # the base, with `modules_to_save` as trained
    lora: Any
    lcfg: LoraConfig
    run: RunConfig
    step: int
    model_path: str


def load_run(run_dir: str, step: int | None = None) -> LoadedRun:
    """The checkpoint at `step` (default: the latest) of a `lora-jax train` run directory, on its
    base model (checked against the run's fingerprint)."""
    run_dir = os.fspath(run_dir)
    ckpt = _open_checkpoints(run_dir, step)
    step, meta = ckpt.restore_meta(step)
    run = RunConfig.from_dict(meta["run"])
    cfg, params = load_model(run.model, meta["model_path"])
    lcfg = run.lora
    lora = init_lora(params, lcfg, jax.random.key(run.train.seed))
    if lcfg.init_lora_weights == "pissa":
        params = unmerge(params, lora, lcfg)
    if not fingerprints_match(base_fingerprint(params), meta["fingerprint"]):
        raise ConfigError(
            f"the base model at {meta['model_path']} is not the one this run trained on "
            "(fingerprint mismatch); restore the original base weights"
        )
    split = split_trainable(params, lora, lcfg)
    tx = make_tx(lcfg, run.optim, make_schedule(run.optim, run.train.steps))
    state, _ = ckpt.restore(step, init_state(split.trainable, tx, run.train.seed))
    ckpt.close()
    params, lora = combine(state.trainable, split.frozen)
    return LoadedRun(cfg, params, lora, lcfg, run, step, meta["model_path"])


def _open_checkpoints(run_dir: str, step: int | None) -> Checkpointer:
    """The run directory's checkpoints, refused with one clear error when there is no run, no
    checkpoint, or none at `step`."""
    if not os.path.isdir(run_dir):
        raise CheckpointFormatError(
            f"{run_dir}: no such run directory; pass the --output-dir of a `lora-jax train` run"
        )
    run_json = os.path.join(run_dir, "run.json")
    if not os.path.isfile(run_json):
        raise CheckpointFormatError(
            f"{run_dir} is not a lora-jax run directory (no run.json); pass the --output-dir of a `lora-jax train` run"
        )
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    no_checkpoint = (
        f"{run_dir} has no checkpoint yet: train it first (lora-jax train --output-dir "
        f"{run_dir} --overwrite starts it again), or, while it trains, export once it has "
        "saved one (every train.save_every steps, and at the end)"
    )
    if not os.path.isdir(ckpt_dir):  # checked here: the Checkpointer would create the directory
        raise CheckpointFormatError(no_checkpoint)
    ckpt = Checkpointer(ckpt_dir, keep=10**6, async_save=False)
    available = ckpt.all_steps()
    if not available:
        ckpt.close()
        raise CheckpointFormatError(no_checkpoint)
    if step is not None and step not in available:
        ckpt.close()
        raise CheckpointFormatError(
            f"{run_dir} has no checkpoint for step {step}; its checkpoints are at "
            f"steps {sorted(available)} (leave out --step for the latest)"
        )
    return ckpt
