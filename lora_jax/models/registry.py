"""The model families in one table: a model directory's config (`config_from_hf(path)`, dispatched
on its `model_type`) and a config's Flax module (`build_model(cfg)`).

Each family is a model file and a layout record; adding one is a new row here.
"""

from __future__ import annotations

import flax.linen as nn

from lora_jax.errors import ConfigError
from lora_jax.models.gemma3 import Gemma3
from lora_jax.models.gemma3_config import Gemma3Config
from lora_jax.models.gpt2 import GPT2
from lora_jax.models.gpt2_config import GPT2Config
from lora_jax.models.llama import Llama
from lora_jax.models.llama_config import LlamaConfig, _hf_dict

__all__ = ["build_model", "config_from_hf", "FamilyConfig"]

FamilyConfig = LlamaConfig | GPT2Config | Gemma3Config  # any family's model config

# config class -> the module class that takes it
_FAMILIES: dict[type, type[nn.Module]] = {LlamaConfig: Llama, GPT2Config: GPT2}
_FAMILIES[Gemma3Config] = Gemma3


def config_from_hf(source) -> FamilyConfig:
    """The family's model config of a HF model directory (or config.json path, dict, transformers
    config), by its `model_type`; an unsupported one is refused naming the supported families."""
    model_type = _hf_dict(source).get("model_type")
    if model_type == "gpt2":
        return GPT2Config.from_hf(source)
    if model_type == "gemma3_text":
        return Gemma3Config.from_hf(source)
    return LlamaConfig.from_hf(source)  # the Llama-like families; it refuses any other model_type


def build_model(cfg) -> nn.Module:
    """The family's `flax.linen.Module` for the model config `cfg` (a `LlamaConfig` -> `Llama(cfg)`).

    cfg, params = lj.load_pretrained(path)
    logits = lj.build_model(cfg).apply({"params": params}, input_ids)
    """
    for config_class, module_class in _FAMILIES.items():
        if isinstance(cfg, config_class):
            return module_class(cfg)
    known = ", ".join(c.__name__ for c in _FAMILIES)
    raise ConfigError(
        f"build_model: no model family takes a {type(cfg).__name__} ({cfg!r:.60}); pass one "
        f"of {known}, e.g. the config lj.load_pretrained(path) returns"
    )
