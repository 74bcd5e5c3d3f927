"""`Gemma3Config`: the architecture of a Gemma 3 text model (`Gemma3ForCausalLM`, model_type
`gemma3_text`), how to run it, and its Hugging Face conversion (`from_hf` / `to_hf`), which refuses
what `lora_jax.models.gemma3.Gemma3` does not implement, so a model never runs with an option ignored.

Field names follow transformers' `Gemma3TextConfig`. Its two RoPE bases live, in transformers 5, in
`rope_parameters["full_attention"]` (global layers; `rope_theta`, optionally linear scaling) and
`rope_parameters["sliding_attention"]` (local layers; the legacy `rope_local_base_freq`); here they
are `rope_theta` and `rope_local_base_freq`. `layer_types` names each layer's attention
("sliding_attention" or "full_attention"; transformers derives it from the legacy
`sliding_window_pattern`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from lora_jax.errors import ConfigError
from lora_jax.models.layout import LAYOUTS
from lora_jax.models.llama_config import (
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    _auto_config,
    _check_int,
    _dtype_name,
    _hf_dict,
)

__all__ = ["Gemma3Config", "GEMMA3_MODEL_TYPE", "GEMMA3_ARCHITECTURE", "LAYER_TYPES"]

GEMMA3_MODEL_TYPE = "gemma3_text"
GEMMA3_ARCHITECTURE = "Gemma3ForCausalLM"
LAYER_TYPES = ("sliding_attention", "full_attention")
_GLOBAL_ROPE = ("default", "linear")
assert GEMMA3_MODEL_TYPE in LAYOUTS


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
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
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
        ):
            _check_int(self, name, "")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        types = tuple(self.layer_types) or tuple(
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
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        if self.max_segments is not None:
            _check_int(self, "max_segments", "")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it is a local (sliding-window) layer."""
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def replace(self, **changes) -> Gemma3Config:
        return dataclasses.replace(self, **changes)

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
        if d.get("attention_dropout", 0.0):
            raise ConfigError(f"attention_dropout={d['attention_dropout']!r} is not implemented; set it to 0.0")
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
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"the gemma3_text config lacks {missing}; re-export the model with save_pretrained")
        fields = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
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
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
        fields.update(runtime)
        return cls(**fields)

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        """The transformers v5 `config.json` contents of a `Gemma3ForCausalLM`."""
        full: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "linear":
            full["factor"] = self.rope_factor
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": [GEMMA3_ARCHITECTURE],
            "model_type": GEMMA3_MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
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
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": dtype or self.param_dtype,
        }

    def to_hf(self, dtype: str | None = None):
        """A `transformers.Gemma3TextConfig` equal to this architecture."""
        import transformers

        d = self.to_hf_dict(dtype)
        d.pop("architectures"), d.pop("model_type")
        cfg = transformers.AutoConfig.for_model(GEMMA3_MODEL_TYPE, **d)
        cfg.architectures = [GEMMA3_ARCHITECTURE]
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(d["layer_types"])
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Gemma3Config:
        d = dict(d)
        d["layer_types"] = tuple(d.get("layer_types") or ())
        return cls(**d)
