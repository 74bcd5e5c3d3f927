"""Configuration objects: one frozen dataclass per concern, validated at construction.

`LlamaConfig` owns its Hugging Face conversion (`from_hf` / `to_hf`) and refuses what it does not
implement, so a model is never run with options silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from typing import Any, Mapping

from lora_jax.errors import ConfigError

__all__ = ["ConfigError", "LlamaConfig", "LoraConfig", "ModelConfig", "OptimConfig", "TrainConfig", "MeshConfig",
           "RunConfig", "REMAT_POLICIES", "ATTENTION_IMPLS"]

# What each layer keeps for the backward pass: nothing recomputed ("none"), everything recomputed
# ("full"), q/k/v kept ("save_qkv": +3 GiB, +2.3% on the 8B shape at 4 x 2048), q/k/v and the
# attention output ("save_qkv_out"), every matmul output ("dots", "dots_no_batch")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv", "save_qkv_out")
# The attention kernel (`lora_jax.models.attention`): "auto" picks the fastest correct one for the
# platform; "xla" is the reference (materialises [t, t] scores: the CPU and tests only).
ATTENTION_IMPLS = ("auto", "cudnn", "pallas", "xla")
_SUPPORTED_ROPE = ("default", "llama3")
_DTYPES = ("float32", "bfloat16", "float16")


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    name = str(name).replace("torch.", "")
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {_DTYPES}")
    return name


def _check_int(obj, name: str, where: str, minimum: int = 1, hint: str = "", below: int = 2**63) -> None:
    """`obj.name` must be an integer in [minimum, below) (not a bool, not 1.5, not "12")."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not minimum <= value < below:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if isinstance(value, numbers.Integral) and value >= below:
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
        raise ConfigError(f"{where}{name}={value!r} must be {what}{none}"
                          + (" (a string; in YAML, quote a name that looks like a number)"
                             if not isinstance(value, str) else ""))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family model plus how to run it (scan, remat, dtypes).

    Field names follow transformers' `LlamaConfig`; `from_hf` accepts both the v5 `rope_parameters`
    form and the legacy `rope_theta` / `rope_scaling` form.
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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_type not in _SUPPORTED_ROPE:
            raise ConfigError(
                f"rope type {self.rope_type!r} is not implemented; supported: {_SUPPORTED_ROPE}. "
                "Running it as another type would give wrong logits, so it is refused.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        if self.max_segments is not None and (not isinstance(self.max_segments, int)
                                              or isinstance(self.max_segments, bool) or self.max_segments < 1):
            raise ConfigError(f"max_segments={self.max_segments!r} must be a positive integer or None")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf(cls, source: Any, **runtime) -> "LlamaConfig":
        """Build from a HF model directory, a `config.json` path, a dict or a transformers config.

        `runtime` sets the non-HF fields (`scan_layers`, `remat_policy`, `dtype`, ...).
        """
        d = _hf_dict(source)
        model_type = d.get("model_type")
        if model_type != "llama":
            raise ConfigError(
                f"model_type={model_type!r} is not supported; lora_jax implements Llama "
                "(model_type 'llama', LlamaForCausalLM) only")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not implemented; Llama uses 'silu'")
        for key in ("attention_dropout",):
            if d.get(key, 0.0):
                raise ConfigError(f"{key}={d[key]!r} is not implemented; set it to 0.0")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp={d['pretraining_tp']!r} is not implemented; set it to 1")

        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"the Llama config lacks {missing}; it is not a complete transformers "
                              "config.json (re-export the model with save_pretrained)")
        rope = d.get("rope_parameters")
        if rope is None:  # legacy form
            rope = dict(d.get("rope_scaling") or {})
            rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        rope = dict(rope)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _SUPPORTED_ROPE:
            raise ConfigError(
                f"rope type {rope_type!r} is not implemented; supported: {_SUPPORTED_ROPE}. "
                "Running it as another type would give wrong logits, so it is refused.")
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
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
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
            rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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

    def to_hf(self, dtype: str | None = None):
        """A `transformers.LlamaConfig` equal to this architecture."""
        import transformers

        d = self.to_hf_dict(dtype)
        d.pop("architectures"), d.pop("model_type")
        cfg = transformers.LlamaConfig(**d)
        cfg.architectures = ["LlamaForCausalLM"]
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        return cls(**d)


def _hf_dict(source: Any) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json at {os.fspath(source)!r}; point at a Hugging Face model "
                              "directory (config.json + *.safetensors)")
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-export the model config") from None
    if hasattr(source, "to_dict"):
        return source.to_dict()
    raise ConfigError(f"cannot read a Llama config from {type(source).__name__}; pass a directory, "
                      "a config.json path, a dict or a transformers config")


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_INIT_CHOICES = (True, False, "gaussian", "pissa")


def _as_tuple(value, name: str, kind=str) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, kind) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (Mapping, bytes)):
        raise ConfigError(f"{name}={value!r} must be a list of {kind.__name__}")
    try:
        out = tuple(value)
    except TypeError:
        raise ConfigError(f"{name}={value!r} must be a list of {kind.__name__}") from None
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in out):
        raise ConfigError(f"{name}={value!r} must be a list of {kind.__name__}")
    return out


def _as_pairs(value, name: str, kind) -> tuple[tuple[str, Any], ...]:
    """Patterns are stored as sorted (key, value) pairs so the config stays hashable (jit-static)."""
    if value is None or (isinstance(value, (Mapping, list, tuple)) and not value):
        return ()
    what = kind.__name__ if isinstance(kind, type) else "number"
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(kv, (list, tuple)) and len(kv) == 2
                                                  for kv in value):
        items = list(value)
    else:
        raise ConfigError(f"{name}={value!r} must map module patterns to a positive {what}, "
                          f"e.g. {{q_proj: 8}}")
    out = []
    for k, v in items:
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, kind) or not v > 0 \
                or not math.isfinite(v):
            raise ConfigError(f"{name} entry {k!r}: {v!r} must map a module pattern to a positive "
                              f"{what}")
        out.append((k, v))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings with PEFT's field names and meanings (see `peft.LoraConfig`).

    `target_modules`: module names (matched as PEFT does: equal to, or a dotted suffix of, the HF
    module name such as `model.layers.3.self_attn.q_proj`), a string regex (full match), or
    `"all-linear"` for the seven projections. Patterns (`rank_pattern`, `alpha_pattern`) are keyed
    by regexes matched against the end of the HF module name, as in PEFT.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Any = ("q_proj", "v_proj")
    exclude_modules: Any = None
    layers_to_transform: Any = None
    rank_pattern: Any = ()
    alpha_pattern: Any = ()
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    modules_to_save: Any = ()
    loraplus_lr_ratio: float | None = None
    bias: str = "none"

    def __post_init__(self):
        _check_int(self, "r", "", hint=" (the adapter rank), e.g. r=16")
        _check_number(self, "lora_alpha", "", "> 0, e.g. 2*r", lambda v: v > 0)
        _check_number(self, "lora_dropout", "", "in [0, 1), e.g. 0.05", lambda v: 0 <= v < 1)
        targets = self.target_modules
        if targets == "all-linear":
            targets = ALL_LINEAR
        elif isinstance(targets, str):
            if not targets.strip():
                raise ConfigError(f"target_modules={targets!r} is empty; name modules such as "
                                  "[q_proj, v_proj] or pass 'all-linear'")
            _check_regex(targets, "target_modules")
        else:
            targets = _as_tuple(targets, "target_modules")
            if not targets:
                raise ConfigError(f"target_modules is empty ({self.target_modules!r}); name modules such "
                                  "as ('q_proj', 'v_proj') or pass 'all-linear'")
        object.__setattr__(self, "target_modules", targets)
        excl = self.exclude_modules
        if isinstance(excl, str):
            if not excl:
                raise ConfigError("exclude_modules='' excludes nothing; name modules or use null")
            _check_regex(excl, "exclude_modules")
        else:
            object.__setattr__(self, "exclude_modules", _as_tuple(excl, "exclude_modules"))
        layers = self.layers_to_transform
        if layers is not None:
            layers = _as_tuple(layers, "layers_to_transform", int)
            if any(i < 0 for i in layers):
                raise ConfigError(f"layers_to_transform={list(layers)} has a negative index; "
                                  "layers are numbered from 0")
        object.__setattr__(self, "layers_to_transform", layers)
        object.__setattr__(self, "rank_pattern", _as_pairs(self.rank_pattern, "rank_pattern", int))
        object.__setattr__(self, "alpha_pattern",
                           _as_pairs(self.alpha_pattern, "alpha_pattern", (int, float)))
        for key, _ in self.rank_pattern + self.alpha_pattern:
            _check_regex(key, "pattern key")
        if self.init_lora_weights not in _INIT_CHOICES or isinstance(self.init_lora_weights, int) \
                and not isinstance(self.init_lora_weights, bool):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r}; choose one of "
                              f"{_INIT_CHOICES}")
        object.__setattr__(self, "modules_to_save", _as_tuple(self.modules_to_save, "modules_to_save") or ())
        _check_bool(self, "use_rslora", "")
        _check_bool(self, "use_dora", "")
        _check_number(self, "loraplus_lr_ratio", "", "> 0 (the learning-rate ratio of b to a), e.g. 16, "
                      "or null", lambda v: v > 0, allow_none=True)
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r} is not supported; lora_jax trains no biases, use 'none'")
        if self.use_dora and self.init_lora_weights == "pissa":
            raise ConfigError("use_dora=True with init_lora_weights='pissa' is not supported (PEFT "
                              "does not define it either); use one or the other")

    def replace(self, **changes) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rank_pattern"] = dict(self.rank_pattern)
        d["alpha_pattern"] = dict(self.alpha_pattern)
        for k in ("target_modules", "exclude_modules", "layers_to_transform", "modules_to_save"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        return cls(**d)


def _check_regex(pattern: str, name: str) -> None:
    import re

    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{name} {pattern!r} is not a valid regular expression ({e})") from None


_SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which base model and how to run it. `path=None` is the built-in demonstration model."""

    path: str | None = None
    dtype: str = "auto"  # parameters and compute: "auto" = bfloat16 on accelerators, float32 on CPU
    scan_layers: bool = True
    remat_policy: str = "none"
    loss_chunk_tokens: int = 2048  # the LM-head cross-entropy runs over chunks of this many tokens
    quantize: str | None = None  # "nf4" (QLoRA) | "int8": a quantised frozen base (lora_jax.quant)
    # the gate/up adapters inside the frozen matmul (faster; false: ~2% less peak memory, for the
    # longest context that fits)
    fuse_wide_adapters: bool = True
    # the attention kernel: "auto" (the fastest correct one for the platform), "cudnn", "pallas"
    # or "xla" (the reference; keeps [t, t] scores, so only for the CPU and tests)
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        if self.quantize not in (None, "nf4", "int8"):
            raise ConfigError(f"model.quantize={self.quantize!r}; choose 'nf4', 'int8' or null (no quantisation)")
        if self.dtype not in ("auto",) + _DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r}; choose 'auto', 'float32' or 'bfloat16'")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"model.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        _check_str(self, "path", "model.", "a Hugging Face model directory", allow_none=True)
        _check_int(self, "loss_chunk_tokens", "model.", hint=", e.g. 2048")
        for name in ("scan_layers", "fuse_wide_adapters"):
            _check_bool(self, name, "model.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW on the trainable leaves, warmup then decay, global-norm clipping."""

    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    # a warmup longer than train.steps is cut to end within the run (true), or kept, so the rate
    # never reaches lr, as transformers' schedulers do (false)
    truncate_warmup: bool = False

    def __post_init__(self):
        w = "optim."
        _check_number(self, "lr", w, "> 0, e.g. 2e-4", lambda v: v > 0)
        if self.schedule not in _SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r}; choose one of {_SCHEDULES}")
        _check_int(self, "warmup_steps", w, minimum=0, hint=" (0: no warmup)")
        _check_number(self, "min_lr_ratio", w, "in [0, 1] (the final lr as a fraction of optim.lr)",
                      lambda v: 0 <= v <= 1)
        _check_number(self, "weight_decay", w, ">= 0, e.g. 0.01", lambda v: v >= 0)
        _check_number(self, "b1", w, "in [0, 1) (Adam's beta1), e.g. 0.9", lambda v: 0 <= v < 1)
        _check_number(self, "b2", w, "in [0, 1) (Adam's beta2), e.g. 0.999", lambda v: 0 <= v < 1)
        _check_number(self, "eps", w, "> 0, e.g. 1e-8", lambda v: v > 0)
        _check_number(self, "clip_norm", w, "> 0 (the global gradient-norm clip, e.g. 1.0) or null "
                      "for no clipping", lambda v: v > 0, allow_none=True)
        _check_bool(self, "truncate_warmup", w)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: how long, how big, how often to log, evaluate and checkpoint."""

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the start and the end only
    eval_batches: int = 8
    eval_generate: int = 64  # held-out prompts scored by exact match (prompt/completion, messages)
    max_new_tokens: int = 48
    save_every: int = 100
    keep_checkpoints: int = 3
    output_dir: str = "runs/demo"
    export_peft: bool = True

    def __post_init__(self):
        w = "train."
        for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_checkpoints",
                     "max_new_tokens"):
            _check_int(self, name, w)
        _check_int(self, "seed", w, minimum=0)
        _check_int(self, "eval_every", w, minimum=0, hint=" (0: evaluate at the start and the end only)")
        _check_int(self, "eval_batches", w, hint=" (batches per evaluation)")
        _check_int(self, "eval_generate", w, minimum=0, hint=" (0: no exact-match scoring)")
        _check_str(self, "output_dir", w, "a directory path")
        _check_bool(self, "export_peft", w)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by "
                              f"train.grad_accum={self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp", "tensor"; -1 fills the remaining devices) and overrides of the
    logical-axis rules (e.g. {"mlp": "fsdp"}); see `lora_jax.sharding.DEFAULT_RULES`."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: Any = ()

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (v <= 0 and v != -1):
                raise ConfigError(f"mesh.{name}={v!r} must be a positive integer or -1 (all remaining devices)")
            object.__setattr__(self, name, int(v))
        object.__setattr__(self, "rules", _mesh_rules(self.rules))


def _mesh_rules(rules) -> tuple:
    """mesh.rules as sorted (logical axis, mesh axis | tuple of mesh axes | None) pairs."""
    from lora_jax.sharding import DEFAULT_RULES, MESH_AXES

    example = "e.g. {mlp: fsdp} or {embed: [fsdp, tensor]}"
    if rules is None or (isinstance(rules, (list, tuple)) and not rules):
        return ()
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, (list, tuple)) and all(isinstance(kv, (list, tuple)) and len(kv) == 2
                                                  for kv in rules):
        items = [tuple(kv) for kv in rules]
    else:
        raise ConfigError(f"mesh.rules={rules!r} must map logical axes to mesh axes, {example}")
    pairs = []
    for k, v in items:
        if not isinstance(k, str) or k not in DEFAULT_RULES:
            raise ConfigError(f"mesh.rules key {k!r} is not a logical axis; known: {sorted(DEFAULT_RULES)}")
        targets = [v] if isinstance(v, str) else v if isinstance(v, (list, tuple)) else None
        if v is not None and (targets is None or not all(isinstance(t, str) and t in MESH_AXES
                                                         for t in targets)):
            raise ConfigError(f"mesh.rules {k}: {v!r} must name mesh axes {list(MESH_AXES)} (a name, "
                              f"a list of names or null), {example}")
        pairs.append((k, tuple(v) if isinstance(v, list) else v))
    return tuple(sorted(pairs, key=lambda kv: kv[0]))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, one section per concern; `--set section.field=value` edits it."""

    model: ModelConfig = ModelConfig()
    lora: "LoraConfig" = None  # type: ignore[assignment]
    data: Any = None
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        from lora_jax.data.config import DataConfig

        if self.lora is None:
            object.__setattr__(self, "lora", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        if self.data is None:
            object.__setattr__(self, "data", DataConfig())
        for name, klass in _sections().items():
            value = getattr(self, name)
            if not isinstance(value, klass):
                raise ConfigError(f"RunConfig {name}={value!r} must be a {klass.__name__}; build it with "
                                  f"RunConfig.from_dict for plain mappings")

    def warn_unusual(self) -> list[str]:
        """Warn (`ConfigWarning`) about settings that run but probably not as meant; returns the
        messages. Not done at construction: a config is often built in steps (--set, sweep files)."""
        import warnings

        from lora_jax.errors import ConfigWarning

        notes = []
        warmup, steps = self.optim.warmup_steps, self.train.steps
        if warmup > steps:
            if self.optim.truncate_warmup:
                notes.append(f"optim.warmup_steps={warmup} exceeds train.steps={steps}: the warmup is cut "
                             f"to {max(steps - 1, 0)} steps, so the schedule is not the one configured; "
                             "lower optim.warmup_steps or raise train.steps")
            else:
                notes.append(f"optim.warmup_steps={warmup} exceeds train.steps={steps}: the run ends "
                             f"still warming up, at {(steps - 1) / warmup:.0%} of optim.lr (as "
                             "transformers would); lower optim.warmup_steps, raise train.steps, or set "
                             "optim.truncate_warmup=true to end the warmup within the run")
        for note in notes:
            warnings.warn(ConfigWarning(note), stacklevel=2)
        return notes

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "lora": self.lora.to_dict(),
                "data": dataclasses.asdict(self.data), "optim": dataclasses.asdict(self.optim),
                "train": dataclasses.asdict(self.train),
                "mesh": {**dataclasses.asdict(self.mesh), "rules": dict(self.mesh.rules)}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        sections = _sections()
        if not isinstance(d, Mapping):
            raise ConfigError(f"a run config is a mapping of sections {sorted(sections)}, not a "
                              f"{type(d).__name__} ({_short(d)})")
        unknown = sorted(set(map(str, d)) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; sections are {sorted(sections)}")
        out = {}
        for name, klass in sections.items():
            values = d.get(name)
            if values is None:
                values = {}
            if not isinstance(values, Mapping):
                raise ConfigError(f"config section {name}: {_short(values)} must be a mapping of fields, "
                                  f"e.g. {name}: {{{next(iter(_field_types(klass)))}: ...}}")
            values = {str(k): v for k, v in values.items()}
            fields = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(values) - fields)
            if bad:
                raise ConfigError(f"unknown key(s) {[f'{name}.{b}' for b in bad]}{_suggest(bad[0], fields, name)}")
            try:
                out[name] = klass(**values)
            except TypeError as e:  # e.g. a string where a number belongs
                raise ConfigError(f"bad value in section {name!r}: {e}") from None
        return cls(**out)

    def with_overrides(self, pairs: list[str]) -> "RunConfig":
        """Apply `section.field=value` strings (values parsed as YAML: 1e-4, true, [q_proj, v_proj])."""
        d = self.to_dict()
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"--set {pair!r} is not key=value; e.g. --set lora.r=8")
            key, raw = pair.split("=", 1)
            section, _, field = key.strip().partition(".")
            if section not in d or not field:
                raise ConfigError(f"--set key {key!r} is unknown; keys look like lora.r, optim.lr, "
                                  f"train.steps{_suggest(key, _all_keys(d), None)}")
            if field not in d[section]:
                raise ConfigError(f"--set key {key!r} is unknown"
                                  f"{_suggest(key, _all_keys(d), None)}")
            kind = _field_types(_sections()[section])[field]
            d[section][field] = _parse_value(raw, key=key, kind=kind)
        return RunConfig.from_dict(d)


def _sections() -> dict:
    from lora_jax.data.config import DataConfig

    return {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "mesh": MeshConfig}


def _field_types(klass) -> dict[str, str]:
    """Field name -> its annotation as written ("str", "str | None", "int", "Any", ...)."""
    return {f.name: str(f.type) for f in dataclasses.fields(klass)}


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_NULLS = ("", "~", "null", "Null", "NULL")


def _yaml_loader():
    """yaml.SafeLoader that also reads `1e-4` (no dot; YAML 1.1 makes it a string) as a float, in
    plain (unquoted) scalars only, as YAML 1.2 does."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return Loader


def _parse_value(raw: str, key: str | None = None, kind: str = "Any"):
    """A `--set` / `--grid` value: YAML (1e-4, true, null, [q_proj, v_proj], {mlp: fsdp}), with
    YAML 1.1's gap filled (`1e-4`, without a dot, is a float, also inside lists and maps). For a
    string field (`kind` "str" / "str | None") the text is taken as it is (`train.output_dir=1e5` is
    the directory "1e5"), null aside; quote it to use YAML."""
    import yaml

    text = raw.strip()
    if kind in ("str", "str | None") and not (text[:1] in "'\"" and text):
        return None if kind == "str | None" and text in _NULLS else text
    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        if text[:1] in "[{'\"":
            where = f"--set {key}={raw}" if key else repr(raw)
            raise ConfigError(f"{where} is not valid YAML ({_yaml_problem(e)}); e.g. [q_proj, v_proj] "
                              "or {mlp: fsdp}") from None
        return text


def _yaml_problem(e) -> str:
    """One line from a YAML error: "line L, column C: problem (context)"."""
    def at(mark):
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark, cmark = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    context = getattr(e, "context", None)
    out = (f"{at(mark)}: " if mark is not None else "") + problem
    if context:
        out += f" ({context}" + (f" started at {at(cmark)}" if cmark is not None else "") + ")"
    return out


def load_yaml(path: str, flag: str):
    """The contents of a YAML file given as `flag` (--config, --sweep); ConfigError, one line, on a
    missing file, undecodable bytes or invalid YAML (with the line and column)."""
    import yaml

    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a directory; pass a YAML file")
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_yaml_loader())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {path} is not a UTF-8 text file (byte {e.start}); pass a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag} {path}: invalid YAML at {_yaml_problem(e)}") from None


def _all_keys(d: dict) -> list[str]:
    return [f"{s}.{k}" for s, fields in d.items() for k in fields]


def _suggest(key: str, options, section: str | None) -> str:
    import difflib

    opts = [f"{section}.{o}" if section else o for o in options]
    close = difflib.get_close_matches(key if not section else f"{section}.{key}", opts, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""
