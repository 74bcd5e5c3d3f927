"""`Gemma3Config`: the architecture of a Gemma 3 text model (`Gemma3ForCausalLM`, model_type
`gemma3_text`), how to run it, and its Hugging Face conversion (`from_hf` / `to_hf`), which refuses
what `lora_jax.models.gemma3.Gemma3` does not implement, so a model never runs with an option ignored.

Field names follow transformers' `Gemma3TextConfig`. Its two RoPE bases live, in transformers 5, in
`rope_parameters["full_attention"]` (global layers; `rope_theta`, optionally linear scaling) and
`rope_parameters["sliding_attention"]` (local layers; the legacy `rope_local_base_freq`); here they
are `rope_theta` and `rope_local_base_freq`. `layer_types` names each layer's attention
("sliding_attention" or "full_attention"; transformers derives it from the legacy
`sliding_window_pattern`).

What every family's config shares (`replace` / `to_dict` / `from_dict`, the run options' checks, `to_hf`,
reading a HF config) is `lora_jax.models.config_base`; this file holds only what is Gemma 3's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lora_jax.errors import ConfigError
from lora_jax.models.config_base import (
    HF_SIZES,
    FamilyConfig,
    _auto_config,
    _hf_dict,
    _hf_sizes,
    _hf_token_ids,
    _refuse_hf,
    _require_hf,
)
from lora_jax.models.layout import LAYOUTS

__all__ = ["Gemma3Config", "GEMMA3_MODEL_TYPE", "GEMMA3_ARCHITECTURE", "LAYER_TYPES"]

GEMMA3_MODEL_TYPE = "gemma3_text"
GEMMA3_ARCHITECTURE = "Gemma3ForCausalLM"
LAYER_TYPES = ("sliding_attention", "full_attention")
_GLOBAL_ROPE = ("default", "linear")
assert GEMMA3_MODEL_TYPE in LAYOUTS


@dataclasses.dataclass(frozen=True)
class Gemma3Config(FamilyConfig):
    """Architecture of a Gemma 3 text model plus how to run it (scan, remat, dtypes, kernel).

    `sliding_window`: on "sliding_attention" layers each token attends to itself and the
    `sliding_window - 1` tokens before it (transformers' count). `query_pre_attn_scalar`: the
    attention scale is its inverse square root. `final_logit_softcapping`: logits become
    `c * tanh(logits / c)`, or None.
    """

    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0  # global ("full_attention") layers
    rope_type: str = "default"  # global layers: "default" or "linear"
    rope_factor: float = 1.0  # linear scaling of the global layers
    rope_local_base_freq: float = 10_000.0  # local ("sliding_attention") layers
    query_pre_attn_scalar: int | float = 256
    sliding_window: int = 4096
    layer_types: tuple[str, ...] = ()  # () -> every sixth layer global, as transformers' default
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0
    model_type: str = GEMMA3_MODEL_TYPE
    # How to run the model (not part of the HF architecture); as `LlamaConfig`.
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    max_segments: int | None = None
    fuse_wide_adapters: bool = True

    def __post_init__(self):
        if self.model_type != GEMMA3_MODEL_TYPE:
            raise ConfigError(f"Gemma3Config is model_type {GEMMA3_MODEL_TYPE!r}, not {self.model_type!r}")
        self._check_positive(
            ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
            + ("num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window")
        )
        self._check_kv_heads(self.num_attention_heads, self.num_key_value_heads)
        types = tuple(self.layer_types or ()) or tuple(
            "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(self.num_hidden_layers)
        )
        bad = sorted(set(types) - set(LAYER_TYPES))
        if bad or len(types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types={list(types)!r} must name one of {LAYER_TYPES} for each of the "
                f"{self.num_hidden_layers} layers"
            )
        object.__setattr__(self, "layer_types", types)
        if self.rope_type not in _GLOBAL_ROPE:
            raise ConfigError(
                f"rope type {self.rope_type!r} (global layers) is not implemented for gemma3_text; supported: "
                f"{_GLOBAL_ROPE}. Running it as another type would give wrong logits, so it is refused."
            )
        for name in ("rope_theta", "rope_factor", "rope_local_base_freq", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}={value!r} must be a positive number")
            if name != "query_pre_attn_scalar":  # transformers types that one an int
                object.__setattr__(self, name, float(value))
        if self.final_logit_softcapping is not None:
            if not isinstance(self.final_logit_softcapping, (int, float)) or not self.final_logit_softcapping > 0:
                raise ConfigError(f"final_logit_softcapping={self.final_logit_softcapping!r} must be positive or None")
            object.__setattr__(self, "final_logit_softcapping", float(self.final_logit_softcapping))
        self._check_run_options()

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it is a local (sliding-window) layer."""
        return tuple(t == "sliding_attention" for t in self.layer_types)

    # ----------------------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf(cls, source: Any, **runtime) -> Gemma3Config:
        """Build from a HF model directory, a `config.json` path, a dict or a transformers config
        (read through transformers' `Gemma3TextConfig`, so legacy fields are normalised as there)."""
        d = _hf_dict(source)
        if d.get("model_type") != GEMMA3_MODEL_TYPE:
            raise ConfigError(
                f"model_type={d.get('model_type')!r} is not {GEMMA3_MODEL_TYPE!r} "
                f"(a multimodal 'gemma3' checkpoint is not supported; only {GEMMA3_ARCHITECTURE})"
            )
        if isinstance(source, (str, os.PathLike)):
            d = _auto_config(source, d)
        else:
            import transformers

            kwargs = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version")}
            try:
                d = transformers.AutoConfig.for_model(GEMMA3_MODEL_TYPE, **kwargs).to_dict()
            except (ValueError, KeyError, TypeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"transformers cannot read this gemma3_text config: {first}") from None
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"hidden_activation={act!r} is not implemented; Gemma 3 uses 'gelu_pytorch_tanh'")
        if d.get("attn_logit_softcapping") is not None:
            raise ConfigError(
                f"attn_logit_softcapping={d['attn_logit_softcapping']!r} is not implemented (transformers' "
                "Gemma3 attention does not apply it either); set it to null"
            )
        if d.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention=true is not implemented; lora_jax runs causal attention")
        _refuse_hf(d, "attention_dropout", 0.0)
        rope = d.get("rope_parameters") or {}
        full = dict(rope.get("full_attention") or {})
        local = dict(rope.get("sliding_attention") or {})
        full_type = full.get("rope_type", full.get("type", "default"))
        local_type = local.get("rope_type", local.get("type", "default"))
        if full_type not in _GLOBAL_ROPE or local_type != "default":
            raise ConfigError(
                f"rope types full_attention={full_type!r}, sliding_attention={local_type!r} are not implemented "
                f"for gemma3_text (global: {_GLOBAL_ROPE}, local: 'default'); running them as another type "
                "would give wrong logits, so they are refused"
            )
        _require_hf(d, HF_SIZES, GEMMA3_MODEL_TYPE)
        fields = dict(
            **_hf_sizes(d),
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            rope_theta=float(full.get("rope_theta", d.get("rope_theta", 1_000_000.0))),
            rope_type=full_type,
            rope_factor=float(full.get("factor", 1.0)) if full_type == "linear" else 1.0,
            rope_local_base_freq=float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
            sliding_window=d.get("sliding_window") or 4096,
            layer_types=tuple(d.get("layer_types") or ()),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            attention_bias=bool(d.get("attention_bias", False)),
            **_hf_token_ids(d),
        )
        fields.update(runtime)
        return cls(**fields)

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        """The transformers v5 `config.json` contents of a `Gemma3ForCausalLM`."""
        full: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "linear":
            full["factor"] = self.rope_factor
        return {
            "architectures": [GEMMA3_ARCHITECTURE],
            "model_type": GEMMA3_MODEL_TYPE,
            **self._hf_fields(HF_SIZES + ("num_key_value_heads", "head_dim")),
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
                "full_attention": full,
            },
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": None,
            "use_bidirectional_attention": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            **self._hf_tail(dtype),
        }
