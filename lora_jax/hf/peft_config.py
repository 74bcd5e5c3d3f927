"""PEFT's `adapter_config.json` <-> `LoraConfig`: what lora_jax writes for PEFT to read, and what it
accepts from PEFT, refusing every option it does not implement (naming it) rather than loading an
adapter that would run differently.

PiSSA: an adapter initialised with `init_lora_weights="pissa"` is exported relative to the residual
base, so it is written as plain LoRA (`init_lora_weights: true`; see `lora_jax.hf.peft`). PEFT
adapters saved as PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA are relative to a base PEFT rewrites at load time,
so `read_peft_config` refuses them.
"""

from __future__ import annotations

import json
import os
from typing import cast

from lora_jax.errors import CheckpointFormatError, ConfigError
from lora_jax.lora.config import LoraConfig

__all__ = ["read_peft_config", "peft_config_dict", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# init_lora_weights values whose saved adapter is relative to a base PEFT rewrites when it loads.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Initialisations that only affect the starting point: once trained, the adapter is plain LoRA.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")

# PEFT options lora_jax does not implement: (field, value that means "off", what it is).
_UNSUPPORTED = (
    ("fan_in_fan_out", False, "the transposed Conv1D layout (GPT-2); Llama projections are nn.Linear"),
    ("lora_bias", False, "a trainable bias on lora_B"),
    ("target_parameters", None, "LoRA on bare nn.Parameters (MoE experts)"),
    ("layer_replication", None, "layer replication"),
    ("trainable_token_indices", None, "trainable token embeddings"),
    ("alora_invocation_tokens", None, "activated LoRA (aLoRA)"),
    ("use_qalora", False, "QALoRA"),
    ("megatron_config", None, "Megatron parallel layers"),
    ("velora_config", None, "the VeLoRA variant"),
    ("monteclora_config", None, "the MonteCLoRA variant"),
    ("use_bdlora", None, "block-diagonal LoRA (BD-LoRA)"),
    ("arrow_config", None, "Arrow routing"),
    ("kasa_config", None, "the KaSA variant"),
)


def peft_config_dict(lcfg: LoraConfig, base_model_name_or_path: str | None, adapted: list[str] | None = None) -> dict:
    """adapter_config.json as PEFT's LoraConfig reads it (only fields PEFT >= 0.17 knows; PEFT fills
    the rest with its defaults).

    adapted: the HF names of the modules adapted (`plan_targets`). Given, a regex `target_modules` is
    written as that explicit list, so PEFT adapts exactly those modules whatever else its pattern
    would match in the model (and so is `all-linear` with `layers_to_transform`, a pair PEFT
    refuses); names and `all-linear` are written as given (PEFT resolves them as
    lora_jax does)."""
    targets: str | list[str] = (
        lcfg.target_modules if isinstance(lcfg.target_modules, str) else list(lcfg.target_modules)
    )
    layers = lcfg.layers_to_transform
    if isinstance(targets, str) and (targets != "all-linear" or layers is not None) and adapted is not None:
        targets = list(adapted)
    excl = lcfg.exclude_modules
    init = lcfg.init_lora_weights
    if init == "pissa":  # exported relative to the residual base: plain LoRA (module docstring)
        init = True
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "r": lcfg.r,
        "lora_alpha": lcfg.lora_alpha,
        "lora_dropout": lcfg.lora_dropout,
        "target_modules": targets,
        "exclude_modules": excl if excl is None or isinstance(excl, str) else list(excl),
        "layers_to_transform": None if layers is None else list(layers),
        "layers_pattern": None,
        "rank_pattern": dict(lcfg.rank_pattern),
        "alpha_pattern": dict(lcfg.alpha_pattern),
        "use_rslora": lcfg.use_rslora,
        "use_dora": lcfg.use_dora,
        "init_lora_weights": init,
        "modules_to_save": list(lcfg.modules_to_save) or None,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "target_parameters": None,
        "layer_replication": None,
        "trainable_token_indices": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "use_qalora": False,
        "qalora_group_size": 16,
    }


def read_peft_config(adapter_dir: str, *, fan_in_fan_out: bool = False) -> LoraConfig:
    """The `LoraConfig` of a PEFT adapter directory; refuses what lora_jax does not implement.
    fan_in_fan_out: accept `fan_in_fan_out=true` (the base is a GPT-2, whose Conv1D layers PEFT
    adapts with it; its lora_A / lora_B are laid out as for nn.Linear)."""
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isdir(adapter_dir):
        raise CheckpointFormatError(
            f"adapter directory {adapter_dir!r} does not exist; pass a PEFT "
            f"adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointFormatError(
            f"no {ADAPTER_CONFIG} in {adapter_dir}; pass a directory written by "
            "peft's save_pretrained or lora_jax.save_peft"
        )
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path} is not valid JSON ({e}); export the adapter again") from None
    if not isinstance(d, dict):
        raise CheckpointFormatError(f"{path} holds a {type(d).__name__}, not a PEFT config object")

    peft_type = d.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointFormatError(
            f"{path}: peft_type={peft_type!r} is not supported; lora_jax loads "
            "LoRA adapters (peft_type 'LORA', DoRA included) only"
        )
    task = d.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise CheckpointFormatError(
            f"{path}: task_type={task!r} is not supported; lora_jax runs "
            "causal language models, so the adapter must be task_type 'CAUSAL_LM'"
        )
    for field, off, what in _UNSUPPORTED:
        if field == "fan_in_fan_out" and fan_in_fan_out:
            continue
        value = d.get(field, off)
        if value not in (off, None, False, [], {}):
            raise CheckpointFormatError(
                f"{path}: {field}={value!r} ({what}) is not supported by lora_jax; "
                f"only adapters with {field}={off!r} can be loaded"
            )
    bias = d.get("bias", "none")
    if bias != "none":
        raise CheckpointFormatError(
            f"{path}: bias={bias!r} is not supported; lora_jax trains no biases, "
            "so only adapters saved with bias='none' can be loaded"
        )
    pattern = d.get("layers_pattern")
    if pattern not in (None, "layers", ["layers"], []):
        raise CheckpointFormatError(
            f"{path}: layers_pattern={pattern!r} is not supported; a Llama's "
            "layer list is 'layers' (use null or 'layers')"
        )
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise CheckpointFormatError(
            f"{path}: init_lora_weights={init!r} means the adapter is relative to a base that PEFT "
            "rewrites when it loads (W minus the initial adapter), which lora_jax does not do. Convert it "
            "to plain LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...), "
            "or, if you load it onto the saved residual base, set init_lora_weights to true"
        )
    if init not in _PLAIN_INITS:
        raise CheckpointFormatError(
            f"{path}: init_lora_weights={init!r} is not supported; lora_jax "
            f"loads adapters initialised with one of {list(_PLAIN_INITS)}"
        )
    if init in ("eva", "orthogonal"):  # only the starting point differed; the trained adapter is plain
        init = True

    targets = d.get("target_modules")
    if targets is None:  # PEFT's default for model_type llama, qwen2, qwen3 and mistral alike
        targets = ["q_proj", "v_proj"]
    if not isinstance(targets, str):
        if not isinstance(targets, (list, tuple)):
            raise CheckpointFormatError(f"{path}: target_modules={targets!r} must be a list or a regex")
        embeds = [t for t in targets if t.split(".")[-1] in ("embed_tokens", "lm_head")]
        if embeds:
            raise CheckpointFormatError(
                f"{path}: target_modules names {embeds}; LoRA on embeddings or "
                "lm_head is not supported (use modules_to_save for them)"
            )
    try:
        return LoraConfig(
            r=d.get("r", 8),
            lora_alpha=d.get("lora_alpha", 8),
            lora_dropout=d.get("lora_dropout", 0.0),
            target_modules=cast(tuple[str, ...], targets),  # or a list, which __post_init__ stores as a tuple
            exclude_modules=d.get("exclude_modules"),
            layers_to_transform=d.get("layers_to_transform"),
            rank_pattern=d.get("rank_pattern") or {},
            alpha_pattern=d.get("alpha_pattern") or {},
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=bool(d.get("use_dora", False)),
            init_lora_weights=init,
            modules_to_save=d.get("modules_to_save") or (),
        )
    except ConfigError as e:
        raise CheckpointFormatError(f"{path}: {e}") from None
