"""`LlamaConfig`: the architecture of a Llama-family model, how to run it, and its Hugging Face
conversion (`from_hf` / `to_hf`), which refuses what it does not implement so a model is never run
with options silently ignored. It serves four families (Llama, Qwen2, Qwen3, Mistral), whose
differences in fields and conversion live here together.

What every family's config shares (the base class `FamilyConfig`, the field checks `_check_int`,
`_check_number`, ..., reading a HF config) lives in `lora_jax.models.config_base`; the names it held
before are imported here again for the modules that still read them from this one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from lora_jax.errors import ConfigError

# What every family shares; the private names are imported here again (`as` marks them re-exported)
# for `lora_jax.run_config`, `lora_jax.lora.config` and `lora_jax.hf.load`, which read them from here.
from lora_jax.models.config_base import _DTYPES as _DTYPES
from lora_jax.models.config_base import (
    ATTENTION_IMPLS,
    HF_SIZES,
    REMAT_POLICIES,
    AttentionImpl,
    FamilyConfig,
    RematPolicy,
    _auto_config,
    _check_int,
    _hf_dict,
    _hf_sizes,
    _hf_token_ids,
    _refuse_hf,
    _require_hf,
)
from lora_jax.models.config_base import _check_bool as _check_bool
from lora_jax.models.config_base import _check_number as _check_number
from lora_jax.models.config_base import _check_str as _check_str
from lora_jax.models.layout import LAYOUTS

__all__ = [
    "LlamaConfig",
    "REMAT_POLICIES",
    "ATTENTION_IMPLS",
    "RematPolicy",
    "AttentionImpl",
    "ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
]
_SUPPORTED_ROPE = ("default", "llama3")
# The Llama-like families this config and `lora_jax.models.llama.Llama` run: HF model_type ->
# architecture. Each has a layout (`lora_jax.models.layout.LAYOUTS`) saying how it differs.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
assert set(SUPPORTED_MODEL_TYPES) <= set(LAYOUTS)


# the families with a config class of their own (`models/gpt2_config.py`, `models/gemma3_config.py`),
# named here so that the refusal lists every family
_OTHER_FAMILIES = {"gpt2": "GPT2LMHeadModel", "gemma3_text": "Gemma3ForCausalLM"}


def _unsupported_model_type(model_type: Any) -> ConfigError:
    known = ", ".join(f"{t!r} ({a})" for t, a in {**ARCHITECTURES, **_OTHER_FAMILIES}.items())
    return ConfigError(f"model_type={model_type!r} is not supported; lora_jax implements {known}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(FamilyConfig):
    """Architecture of a Llama-family model plus how to run it (scan, remat, dtypes).

    Field names follow transformers' `LlamaConfig`; `from_hf` accepts both the v5 `rope_parameters`
    form and the legacy `rope_theta` / `rope_scaling` form.

    `model_type` picks the family among the Llama-like ones (`SUPPORTED_MODEL_TYPES`): its layout
    (`lora_jax.models.layout.layout_of`) says which projections carry biases (Qwen2: q/k/v) and
    whether q and k are RMS-normed per head (Qwen3). `sliding_window` (Mistral only): each token
    attends to itself and the `sliding_window - 1` tokens before it; None for full causal attention.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    sliding_window: int | None = None
    # How to run the model (not part of the HF architecture).
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention: str = "auto"  # one of ATTENTION_IMPLS
    # the most segments (documents, and the padding run) one row holds: cuDNN's packed attention
    # sizes its buffers by it; None = unknown (training sets it from the data)
    max_segments: int | None = None
    # gate/up adapters ride inside the frozen matmul (`lora_jax.lora.kernel`): faster, but a little
    # more peak memory at very long context; False for the longest sequence that fits
    fuse_wide_adapters: bool = True

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise _unsupported_model_type(self.model_type)
        if self.sliding_window is not None:
            if self.model_type != "mistral":
                raise ConfigError(
                    f"sliding_window={self.sliding_window!r} is implemented for model_type 'mistral' only "
                    f"(this is {self.model_type!r}); set it to None"
                )
            _check_int(self, "sliding_window", "")
        self._check_positive(
            ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
            + ("num_attention_heads", "num_key_value_heads")
        )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self._check_kv_heads(self.num_attention_heads, self.num_key_value_heads)
        _check_rope_type(self.rope_type)
        self._check_run_options()

    # ----------------------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf(cls, source: Any, **runtime) -> LlamaConfig:
        """Build from a HF model directory, a `config.json` path, a dict or a transformers config.

        `runtime` sets the non-HF fields (`scan_layers`, `remat_policy`, `dtype`, ...).
        """
        d = _hf_dict(source)
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise _unsupported_model_type(model_type)
        _rope_of(d)  # refuses an unimplemented rope type before transformers sees it
        if isinstance(source, (str, os.PathLike)):
            d = _auto_config(source, d)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not implemented; {ARCHITECTURES[model_type]} uses 'silu'")
        sliding = [t for t in d.get("layer_types") or () if t != "full_attention"]
        if model_type in ("qwen2", "qwen3") and (sliding or (d.get("use_sliding_window") and not d.get("layer_types"))):
            raise ConfigError(
                f"{model_type} with use_sliding_window=true (sliding attention on layers from "
                f"max_window_layers={d.get('max_window_layers')!r} on) is not implemented; set use_sliding_window "
                "to false (the released checkpoints do)"
            )
        _refuse_hf(d, "attention_dropout", 0.0)
        _refuse_hf(d, "pretraining_tp", 1, ok=lambda v: v in (1, None))
        _require_hf(d, HF_SIZES, "Llama")
        rope, rope_type = _rope_of(d)
        fields = dict(
            **_hf_sizes(d),
            head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) and model_type in ("llama", "qwen3"),
            mlp_bias=bool(d.get("mlp_bias", False)) and model_type == "llama",
            **_hf_token_ids(d),
            model_type=model_type,
            sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
        )
        if rope_type == "llama3":
            fields.update(
                rope_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        fields.update(runtime)
        return cls(**fields)

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        """The transformers v5 `config.json` contents (`rope_parameters` form)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "llama3":
            rope.update(
                factor=self.rope_factor,
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        d = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            **self._hf_fields(HF_SIZES + ("num_key_value_heads", "head_dim")),
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            # legacy readers (transformers < 5) look for these two
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_type == "default" else rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            **self._hf_tail(dtype),
        }
        n = self.num_hidden_layers
        if self.model_type != "llama":  # fields transformers' other families do not have
            for key in ("mlp_bias", "rope_scaling") + (("attention_bias",) if self.model_type != "qwen3" else ()):
                d.pop(key)
        if self.model_type in ("qwen2", "qwen3"):
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=n)
            d["layer_types"] = ["full_attention"] * n
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


def _rope_of(d: Mapping[str, Any]) -> tuple[dict, str]:
    """(rope parameters, rope type) of a HF config dict (v5 `rope_parameters` or legacy form);
    refuses a type not implemented."""
    rope = d.get("rope_parameters")
    if rope is None:  # legacy form
        rope = dict(d.get("rope_scaling") or {})
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope = dict(rope)
    return rope, _check_rope_type(rope.get("rope_type", rope.get("type", "default")))


def _check_rope_type(rope_type: Any) -> str:
    if rope_type not in _SUPPORTED_ROPE:
        raise ConfigError(
            f"rope type {rope_type!r} is not implemented; supported: {_SUPPORTED_ROPE}. "
            "Running it as another type would give wrong logits, so it is refused."
        )
    return rope_type
