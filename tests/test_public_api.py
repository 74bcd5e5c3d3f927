"""The public face of `import lora_jax as lj`: every name in `__all__` resolves, the training,
generation and model-building entry points are there, and the config shim still re-exports."""

import subprocess
import sys

import pytest

import lora_jax as lj
from lora_jax.errors import ConfigError
from lora_jax.generate import generate
from lora_jax.models.llama import Llama
from lora_jax.models.llama_config import LlamaConfig
from lora_jax.train.loop import train


def test_all_names_resolve():
    missing = [name for name in lj.__all__ if not hasattr(lj, name)]
    assert not missing, missing
    assert len(set(lj.__all__)) == len(lj.__all__)


def test_entry_points():
    assert lj.train is train and lj.generate is generate
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = lj.build_model(cfg)
    assert isinstance(model, Llama) and model.config is cfg


def test_build_model_refuses_what_is_no_model_config():
    with pytest.raises(ConfigError, match="build_model: no model family takes a LoraConfig"):
        lj.build_model(lj.LoraConfig(r=4, lora_alpha=8))


def test_config_shim_reexports_every_name():
    import lora_jax.config as config

    assert all(hasattr(config, name) for name in config.__all__)
    assert config.LoraConfig is lj.LoraConfig and config.RunConfig is lj.RunConfig


def test_import_leaves_out_plotting_and_torch():
    code = "import sys, lora_jax; print(' '.join(m for m in ('matplotlib', 'torch', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
