"""`GPT2Config`: the architecture of a GPT-2 (`GPT2LMHeadModel`), how to run it, and its Hugging Face
conversion (`from_hf` / `to_hf`), which refuses what `lora_jax.models.gpt2.GPT2` does not implement.

Field names follow transformers' `GPT2Config` (`n_embd`, `n_layer`, `n_head`, ...); the names the
rest of lora_jax reads (`hidden_size`, `num_hidden_layers`, ...) are properties over them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from lora_jax.errors import ConfigError
from lora_jax.models.llama_config import ATTENTION_IMPLS, REMAT_POLICIES, _auto_config, _dtype_name, _hf_dict

__all__ = ["GPT2Config", "GPT2_ARCHITECTURE"]

GPT2_ARCHITECTURE = "GPT2LMHeadModel"
# tanh-approximated GELU under its transformers names
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 plus how to run it (scan, remat, dtypes, attention kernel)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    model_type: str = "gpt2"
    # How to run the model (not part of the HF architecture).
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    max_segments: int | None = None
    fuse_wide_adapters: bool = True

    def __post_init__(self):
        if self.model_type != "gpt2":
            raise ConfigError(f"GPT2Config got model_type={self.model_type!r}; it is 'gpt2'")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is None:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        if self.activation_function not in _ACTIVATIONS:
            raise ConfigError(
                f"activation_function={self.activation_function!r} is not implemented; GPT-2 uses 'gelu_new'"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))

    # the names the rest of lora_jax reads
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return int(self.n_inner or 4 * self.n_embd)

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def tie_word_embeddings(self) -> bool:
        return True

    @property
    def sliding_window(self) -> None:
        return None

    def replace(self, **changes) -> GPT2Config:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf(cls, source: Any, **runtime) -> GPT2Config:
        """Build from a HF model directory (read through `AutoConfig`), a `config.json` path, a dict or
        a transformers config; refuses options GPT2 does not implement."""
        d = _hf_dict(source)
        if d.get("model_type") != "gpt2":
            raise ConfigError(f"model_type={d.get('model_type')!r} is not 'gpt2'")
        if isinstance(source, (str, os.PathLike)):
            d = _auto_config(source, d)
        refused = {
            "scale_attn_weights": (True, "unscaled attention scores"),
            "scale_attn_by_inverse_layer_idx": (False, "scaling attention by 1 / (layer + 1)"),
            "reorder_and_upcast_attn": (False, "the reordered, upcast attention"),
            "add_cross_attention": (False, "cross-attention"),
        }
        for key, (ok, what) in refused.items():
            if key in d and bool(d[key]) != ok:
                raise ConfigError(f"{key}={d[key]!r} ({what}) is not implemented; set it to {ok}")
        if d.get("tie_word_embeddings", True) is False:
            raise ConfigError("tie_word_embeddings=False is not implemented for gpt2 (GPT2LMHeadModel ties lm_head)")
        required = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"the GPT-2 config lacks {missing}; re-export the model with save_pretrained")
        fields: dict[str, Any] = dict(
            vocab_size=d["vocab_size"],
            n_positions=d["n_positions"],
            n_embd=d["n_embd"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_inner=d.get("n_inner"),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
            activation_function=d.get("activation_function", "gelu_new"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
        fields.update(runtime)
        return cls(**fields)

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        """transformers' `config.json` contents for `GPT2LMHeadModel`."""
        return {
            "architectures": [GPT2_ARCHITECTURE],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": self.activation_function,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": dtype or self.param_dtype,
        }

    def to_hf(self, dtype: str | None = None):
        """transformers' `GPT2Config` of this architecture."""
        import transformers

        d = self.to_hf_dict(dtype)
        d.pop("architectures"), d.pop("model_type")
        cfg = transformers.GPT2Config(**d)
        cfg.architectures = [GPT2_ARCHITECTURE]
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPT2Config:
        return cls(**d)
