"""The configuration names, gathered from where each lives (one frozen dataclass per concern):

- `LlamaConfig` (+ `from_hf` / `to_hf`), `REMAT_POLICIES`, `ATTENTION_IMPLS`: `lora_jax.models.llama_config`
- `LoraConfig`, `ALL_LINEAR`: `lora_jax.lora.config`
- `ModelConfig`, `OptimConfig`, `TrainConfig`, `MeshConfig`, `RunConfig`, `load_yaml`, the typed
  `--set` parser `parse_field_value`: `lora_jax.run_config` (`DataConfig`: `lora_jax.data.config`)
- `ConfigError`: `lora_jax.errors`

New code should import from those modules; this one keeps `from lora_jax.config import ...` working.
"""

from __future__ import annotations

from lora_jax.errors import ConfigError
from lora_jax.models.llama_config import ATTENTION_IMPLS, REMAT_POLICIES, LlamaConfig
from lora_jax.run_config import (MeshConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, load_yaml,
                                 parse_field_value)
from lora_jax.run_config import _field_types, _parse_value, _sections  # noqa: F401  (sweep, sweep_cli)

__all__ = ["ConfigError", "LlamaConfig", "LoraConfig", "ModelConfig", "OptimConfig", "TrainConfig", "MeshConfig",
           "RunConfig", "REMAT_POLICIES", "ATTENTION_IMPLS", "ALL_LINEAR", "load_yaml", "parse_field_value"]


def __getattr__(name: str):
    # `LoraConfig` and `ALL_LINEAR` are looked up on first use, not imported above: importing
    # `lora_jax.lora.config` runs `lora_jax/lora/__init__.py`, whose modules still import
    # `LoraConfig` from here, a cycle while this module is half loaded. Once they import
    # `lora_jax.lora.config` directly, this becomes a plain import.
    if name in ("LoraConfig", "ALL_LINEAR"):
        from lora_jax.lora import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
