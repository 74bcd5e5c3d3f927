"""`GPT2Config`: the architecture of a GPT-2 (`GPT2LMHeadModel`), how to run it, and its Hugging Face
conversion (`from_hf` / `to_hf`), which refuses what `lora_jax.models.gpt2.GPT2` does not implement.

Field names follow transformers' `GPT2Config` (`n_embd`, `n_layer`, `n_head`, ...); the names the
rest of lora_jax reads (`hidden_size`, `num_hidden_layers`, ...) are properties over them. What every
family's config shares (`replace` / `to_dict` / `from_dict`, the run options' checks, `to_hf`, reading
a HF config) is `lora_jax.models.config_base`; this file holds only what is GPT-2's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lora_jax.errors import ConfigError
from lora_jax.models.config_base import (
    FamilyConfig,
    _auto_config,
    _hf_dict,
    _hf_token_ids,
    _refuse_hf,
    _require_hf,
)

__all__ = ["GPT2Config", "GPT2_ARCHITECTURE"]

GPT2_ARCHITECTURE = "GPT2LMHeadModel"
# tanh-approximated GELU under its transformers names
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# the sizes a GPT-2 config must name
_HF_REQUIRED = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


@dataclasses.dataclass(frozen=True)
class GPT2Config(FamilyConfig):
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
        self._check_positive(_HF_REQUIRED)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is None:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        if self.activation_function not in _ACTIVATIONS:
            raise ConfigError(
                f"activation_function={self.activation_function!r} is not implemented; GPT-2 uses 'gelu_new'"
            )
        self._check_run_options()

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
        for key, (want, what) in refused.items():
            _refuse_hf(d, key, want, ok=bool if want else (lambda v: not v), what=what)
        if d.get("tie_word_embeddings", True) is False:
            raise ConfigError("tie_word_embeddings=False is not implemented for gpt2 (GPT2LMHeadModel ties lm_head)")
        _require_hf(d, _HF_REQUIRED, "GPT-2")
        fields: dict[str, Any] = dict(
            **{k: d[k] for k in _HF_REQUIRED},
            n_inner=d.get("n_inner"),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
            activation_function=d.get("activation_function", "gelu_new"),
            **_hf_token_ids(d),
        )
        fields.update(runtime)
        return cls(**fields)

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        """transformers' `config.json` contents for `GPT2LMHeadModel`."""
        return {
            "architectures": [GPT2_ARCHITECTURE],
            "model_type": "gpt2",
            **self._hf_fields(_HF_REQUIRED + ("n_inner", "layer_norm_epsilon", "activation_function")),
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            **self._hf_tail(dtype),
        }
