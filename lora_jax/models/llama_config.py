"""`LlamaConfig`: the architecture of a Llama-family model, how to run it, and its Hugging Face
conversion (`from_hf` / `to_hf`), which refuses what it does not implement so a model is never run
with options silently ignored.

Also the field checks every config shares (`_check_int`, `_check_number`, ...): this module imports
nothing of lora_jax but its errors, so any config can use them without an import cycle.
It serves four families (Llama, Qwen2, Qwen3, Mistral), whose field checks and conversions live
here together: a little over 400 lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, Literal, get_args

from lora_jax.errors import ConfigError
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

# What each layer keeps for the backward pass: nothing recomputed ("none"), everything recomputed
# ("full"), q/k/v kept ("save_qkv": more memory, no recomputing them), q/k/v and the
# attention output ("save_qkv_out"), every matmul output ("dots", "dots_no_batch")
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "save_qkv", "save_qkv_out"]
REMAT_POLICIES = get_args(RematPolicy)
# The attention kernel (`lora_jax.models.attention`): "auto" picks the fastest correct one for the
# platform; "xla" is the reference (materialises [t, t] scores: the CPU and tests only).
AttentionImpl = Literal["auto", "cudnn", "pallas", "xla"]
ATTENTION_IMPLS = get_args(AttentionImpl)
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


Dtype = Literal["float32", "bfloat16", "float16"]
_DTYPES = get_args(Dtype)


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    name = str(name).replace("torch.", "")
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {_DTYPES}")
    return name


# ---------------------------------------------------------------- field checks shared by every config
# (the run sections in `lora_jax.run_config`, `lora_jax.lora.config.LoraConfig`): they live here, at
# the bottom of the import graph, because `models/` may import nothing of `lora/` or the run config.


def _check_int(obj, name: str, where: str, minimum: int = 1, hint: str = "", below: int = 2**63) -> None:
    """`obj.name` must be an integer in [minimum, below) (not a bool, not 1.5, not "12")."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not minimum <= int(value) < below:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if isinstance(value, numbers.Integral) and int(value) >= below:
            rule += f" below {below}"
        raise ConfigError(f"{where}{name}={value!r} must be {rule}{hint}")
    object.__setattr__(obj, name, int(value))


def _check_number(obj, name: str, where: str, rule: str, ok, allow_none: bool = False) -> None:
    """`obj.name` must be a finite number with `ok(value)`; `rule` says so in the error. A numeric
    string is read as a number: YAML 1.1 reads `1e-4` (no dot) as a string."""
    value = getattr(obj, name)
    if value is None and allow_none:
        return
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        number = None
    if number is None:
        raise ConfigError(f"{where}{name}={value!r} is not a number; it must be {rule}")
    if not math.isfinite(number):
        raise ConfigError(f"{where}{name}={value!r} is not finite; it must be {rule}")
    if not ok(number):
        raise ConfigError(f"{where}{name}={value!r} must be {rule}")
    if isinstance(value, str):
        object.__setattr__(obj, name, number)


def _check_bool(obj, name: str, where: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{name}={value!r}; use true or false")


def _check_str(obj, name: str, where: str, what: str, allow_none: bool = False) -> None:
    """`obj.name` must be a non-empty string (a path-like is converted), or None when allowed."""
    value = getattr(obj, name)
    if value is None and allow_none:
        return
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
        object.__setattr__(obj, name, value)
    if not isinstance(value, str) or not value:
        none = " or null" if allow_none else ""
        raise ConfigError(
            f"{where}{name}={value!r} must be {what}{none}"
            + (" (a string; in YAML, quote a name that looks like a number)" if not isinstance(value, str) else "")
        )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_type not in _SUPPORTED_ROPE:
            raise ConfigError(
                f"rope type {self.rope_type!r} is not implemented; supported: {_SUPPORTED_ROPE}. "
                "Running it as another type would give wrong logits, so it is refused."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        if self.max_segments is not None and (
            not isinstance(self.max_segments, int) or isinstance(self.max_segments, bool) or self.max_segments < 1
        ):
            raise ConfigError(f"max_segments={self.max_segments!r} must be a positive integer or None")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

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
        for key in ("attention_dropout",):
            if d.get(key, 0.0):
                raise ConfigError(f"{key}={d[key]!r} is not implemented; set it to 0.0")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp={d['pretraining_tp']!r} is not implemented; set it to 1")

        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(
                f"the Llama config lacks {missing}; it is not a complete transformers "
                "config.json (re-export the model with save_pretrained)"
            )
        rope, rope_type = _rope_of(d)
        fields = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) and model_type in ("llama", "qwen3"),
            mlp_bias=bool(d.get("mlp_bias", False)) and model_type == "llama",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
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
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
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
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": dtype or self.param_dtype,
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

    def to_hf(self, dtype: str | None = None):
        """A transformers config of this family (`transformers.LlamaConfig`, `Qwen2Config`, ...) equal
        to this architecture."""
        import transformers

        d = self.to_hf_dict(dtype)
        d.pop("architectures"), d.pop("model_type")
        cfg = transformers.AutoConfig.for_model(self.model_type, **d)
        cfg.architectures = [ARCHITECTURES[self.model_type]]
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        return cls(**d)


def _rope_of(d: Mapping[str, Any]) -> tuple[dict, str]:
    """(rope parameters, rope type) of a HF config dict (v5 `rope_parameters` or legacy form);
    refuses a type not implemented."""
    rope = d.get("rope_parameters")
    if rope is None:  # legacy form
        rope = dict(d.get("rope_scaling") or {})
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope = dict(rope)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE:
        raise ConfigError(
            f"rope type {rope_type!r} is not implemented; supported: {_SUPPORTED_ROPE}. "
            "Running it as another type would give wrong logits, so it is refused."
        )
    return rope, rope_type


def _auto_config(source: Any, raw: dict) -> dict:
    """The config of a model directory as transformers reads it (`AutoConfig`, its defaults filled
    in; never remote code)."""
    import transformers

    path = os.fspath(source)
    if os.path.isfile(path):
        path = os.path.dirname(path) or "."
    try:
        cfg = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"transformers cannot read the {raw.get('model_type')!r} config in {path}: {first}") from None
    return cfg.to_dict()


def _hf_dict(source: Any) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(
                f"no config.json at {os.fspath(source)!r}; point at a Hugging Face model "
                "directory (config.json + *.safetensors)"
            )
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-export the model config") from None
    if hasattr(source, "to_dict"):
        return source.to_dict()
    raise ConfigError(
        f"cannot read a Llama config from {type(source).__name__}; pass a directory, "
        "a config.json path, a dict or a transformers config"
    )
