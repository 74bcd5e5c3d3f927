"""What every family's model config shares (`LlamaConfig`, `GPT2Config`, `Gemma3Config`), so that each
family file holds only what is particular to its family.

- The run options' choices (`REMAT_POLICIES`, `ATTENTION_IMPLS`, the dtypes) and `FamilyConfig`, the
  base of every family's frozen dataclass: `replace` / `to_dict` / `from_dict`, the run-option checks,
  the HF fields every family writes alike, and `to_hf` from the family's `to_hf_dict`.
- The field checks every config uses (`_check_int`, `_check_number`, ...; also the run sections in
  `lora_jax.run_config` and `lora_jax.lora.config.LoraConfig`).
- Reading a HF config (`_hf_dict`, `_auto_config`) and refusing, with a message, what is not implemented.

This module imports nothing of lora_jax but its errors: it sits at the bottom of the import graph, as
`models/` may import nothing of `lora/` or the run config, so any config can use it without a cycle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Self, get_args

from lora_jax.errors import ConfigError

__all__ = ["FamilyConfig", "REMAT_POLICIES", "ATTENTION_IMPLS", "RematPolicy", "AttentionImpl"]

# What each layer keeps for the backward pass: nothing recomputed ("none"), everything recomputed
# ("full"), q/k/v kept ("save_qkv": more memory, no recomputing them), q/k/v and the
# attention output ("save_qkv_out"), every matmul output ("dots", "dots_no_batch"), everything
# recomputed and each layer's input kept in host memory, not the device's ("offload": the least
# device memory, for the longest context; on a CPU, whose device memory is the host's, "full")
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "save_qkv", "save_qkv_out", "offload"]
REMAT_POLICIES = get_args(RematPolicy)
# The attention kernel (`lora_jax.models.attention`): "auto" picks the fastest correct one for the
# platform; "xla" is the reference (materialises [t, t] scores: the CPU and tests only).
AttentionImpl = Literal["auto", "cudnn", "pallas", "xla"]
ATTENTION_IMPLS = get_args(AttentionImpl)

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


# ---------------------------------------------------------------- the base of every family's config
@dataclasses.dataclass(frozen=True)
class _SharedRunFields:
    """Run options every family's config holds as dataclass fields, declared once here. They are
    keyword-only, so they follow each family's own fields in its `__init__`."""

    # the MLP runs over chunks of this many tokens of the sequence, each recomputed in the backward
    # pass, so its [tokens, intermediate] activations and their gradients exist for one chunk at a
    # time (the numbers are the same; a row is zero-padded to a whole number of chunks); None: the
    # whole sequence at once (fastest; for long context, e.g. 16384)
    mlp_chunk_tokens: int | None = dataclasses.field(default=None, kw_only=True)


class FamilyConfig(_SharedRunFields):
    """The machinery every family's config shares; a family's frozen dataclass derives from it and
    declares its fields (HF names first, then the run options below) and its HF conversion. The
    run options all families declare alike (`_SharedRunFields`) are inherited as fields."""

    # How to run the model (not part of the HF architecture), declared by every family's dataclass.
    scan_layers: bool
    remat_policy: str
    dtype: str  # compute dtype
    param_dtype: str
    attention: str  # one of ATTENTION_IMPLS
    # the most segments (documents, and the padding run) one row holds: cuDNN's packed attention
    # sizes its buffers by it; None = unknown (training sets it from the data)
    max_segments: int | None
    bos_token_id: int | None
    eos_token_id: Any
    pad_token_id: int | None

    def _check_positive(self, names: Iterable[str]) -> None:
        for name in names:
            _check_int(self, name, "")

    def _check_kv_heads(self, heads: int, kv_heads: int) -> None:
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}")

    def _check_run_options(self) -> None:
        """The run options' checks and the dtype names; an eos list becomes a tuple (hashable)."""
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        if self.max_segments is not None:
            _check_int(self, "max_segments", "", hint=" or None")
        if self.mlp_chunk_tokens is not None:
            _check_int(self, "mlp_chunk_tokens", "", hint=" or None (no chunking), e.g. 16384")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    def replace(self, **changes) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict:
        """The fields as plain JSON values (a tuple, e.g. several eos ids, as a list)."""
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        return cls(**d)

    # ----------------------------------------------------------------------------- HF conversion
    def to_hf_dict(self, dtype: str | None = None) -> dict:
        raise NotImplementedError

    def _hf_fields(self, names: Iterable[str]) -> dict:
        """`{name: value}` of fields written to `config.json` under their own names."""
        return {name: getattr(self, name) for name in names}

    def _hf_tail(self, dtype: str | None) -> dict:
        """The `config.json` entries every family writes alike: token ids, init, cache, dtype."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": dtype or self.param_dtype,
        }

    def to_hf(self, dtype: str | None = None):
        """A transformers config of this family (`transformers.LlamaConfig`, `Qwen2Config`,
        `GPT2Config`, `Gemma3TextConfig`, ...) equal to this architecture."""
        import transformers

        d = self.to_hf_dict(dtype)
        architectures, model_type = d.pop("architectures"), d.pop("model_type")
        cfg = transformers.AutoConfig.for_model(model_type, **d)
        cfg.architectures = architectures
        return cfg


# ---------------------------------------------------------------- reading a HF config
# the sizes the Llama-like configs (Llama, Qwen2, Qwen3, Mistral, Gemma 3) name alike and require
HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _hf_sizes(d: Mapping[str, Any]) -> dict:
    """`HF_SIZES` of a HF config, and its kv heads (as many as the heads when it names none)."""
    kv_heads = d.get("num_key_value_heads") or d["num_attention_heads"]
    return {**{k: d[k] for k in HF_SIZES}, "num_key_value_heads": kv_heads}


def _hf_token_ids(d: Mapping[str, Any]) -> dict:
    return {k: d.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _require_hf(d: Mapping[str, Any], keys: Iterable[str], family: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ConfigError(
            f"the {family} config lacks {missing}; it is not a complete transformers "
            "config.json (re-export the model with save_pretrained)"
        )


def _refuse_hf(d: Mapping[str, Any], key: str, fix: Any, ok: Callable[[Any], bool] = lambda v: not v, what="") -> None:
    """Refuses `d[key]` (when present) unless `ok(d[key])`: it is not implemented; `fix` is the
    value to set, `what` says what the option does."""
    if key in d and not ok(d[key]):
        detail = f" ({what})" if what else ""
        raise ConfigError(f"{key}={d[key]!r}{detail} is not implemented; set it to {fix}")


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
    """The raw HF config of a model directory, a `config.json` path, a dict or a transformers config."""
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
