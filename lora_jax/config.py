"""The configuration names, gathered from where each lives (one frozen dataclass per concern):

- `LlamaConfig` (+ `from_hf` / `to_hf`): `lora_jax.models.llama_config`; `REMAT_POLICIES`,
  `ATTENTION_IMPLS`: `lora_jax.models.config_base`
- `LoraConfig`, `ALL_LINEAR`: `lora_jax.lora.config`
- `ModelConfig`, `OptimConfig`, `TrainConfig`, `MeshConfig`, `RunConfig`, the typed `--set` parser
  `parse_field_value`: `lora_jax.run_config`; `load_yaml`: `lora_jax.overrides`
- `DataConfig`: `lora_jax.data.config`; `ConfigError`: `lora_jax.errors`

The package's own modules import from those; this one keeps `from lora_jax.config import ...` working.
"""

from __future__ import annotations

from lora_jax.data.config import DataConfig
from lora_jax.errors import ConfigError
from lora_jax.lora.config import ALL_LINEAR, LoraConfig
from lora_jax.models.config_base import ATTENTION_IMPLS, REMAT_POLICIES
from lora_jax.models.llama_config import LlamaConfig
from lora_jax.overrides import load_yaml
from lora_jax.run_config import MeshConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, parse_field_value

__all__ = [
    "ConfigError",
    "LlamaConfig",
    "LoraConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "MeshConfig",
    "RunConfig",
    "REMAT_POLICIES",
    "ATTENTION_IMPLS",
    "ALL_LINEAR",
    "load_yaml",
    "parse_field_value",
]
