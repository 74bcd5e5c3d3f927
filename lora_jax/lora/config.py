"""`LoraConfig`: the adapter settings, with PEFT's field names and meanings, validated at
construction. It sits beside the LoRA code that reads it and imports nothing of lora_jax but the
errors and `models/` (the layout's projection names, the shared field checks in
`lora_jax.models.config_base`), so it cannot be part of an import cycle.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from lora_jax.errors import ConfigError
from lora_jax.models.config_base import _check_bool, _check_int, _check_number
from lora_jax.models.layout import LLAMA_LAYOUT

__all__ = ["LoraConfig", "ALL_LINEAR"]

# what target_modules="all-linear" means for a Llama; for any family it is that family's projections
# (`Layout.names`: every Linear / Conv1D but lm_head, as PEFT has it), resolved when targets are planned
ALL_LINEAR = LLAMA_LAYOUT.names
_INIT_CHOICES = (True, False, "gaussian", "pissa")

# What the list-like fields take, as `--set` reads them (`lora_jax.run_config.parse_field_value`):
# a YAML list, or one bare name / index for a list of one. A bare text that is not a plain name
# (`.*proj`, `all-linear`) is a regex, matched in full as PEFT does.
Names = Annotated[tuple[str, ...], "a module name or a list of names such as [q_proj, v_proj]"]
Regex = Annotated[str, "a regex (full match)"]
Layers = Annotated[tuple[int, ...], "a layer index or a list of indices such as [0, 1]"]


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
    elif isinstance(value, (list, tuple)) and all(isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in value):
        items = list(value)
    else:
        raise ConfigError(f"{name}={value!r} must map module patterns to a positive {what}, e.g. {{q_proj: 8}}")
    out = []
    for k, v in items:
        if (
            not isinstance(k, str)
            or isinstance(v, bool)
            or not isinstance(v, kind)
            or not v > 0
            or not math.isfinite(v)
        ):
            raise ConfigError(f"{name} entry {k!r}: {v!r} must map a module pattern to a positive {what}")
        out.append((k, v))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings with PEFT's field names and meanings (see `peft.LoraConfig`).

    `target_modules`: module names (matched as PEFT does: equal to, or a dotted suffix of, the HF
    module name such as `model.layers.3.self_attn.q_proj`), a string regex (full match), or
    `"all-linear"` for every projection of the model's family. A regex or name that also matches a
    module that is not a projection (`mlp.act_fn`) is refused when targets are planned, as PEFT
    does. Patterns (`rank_pattern`, `alpha_pattern`) are keyed by regexes matched against the end
    of the HF module name, as in PEFT.

    Example:

    >>> import lora_jax as lj
    >>> lcfg = lj.LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    >>> lcfg.r, lcfg.lora_alpha, lcfg.target_modules
    (8, 16, ('q_proj', 'v_proj'))
    >>> lcfg.replace(use_dora=True).use_dora
    True
    >>> lj.LoraConfig(r=0)
    Traceback (most recent call last):
    ...
    lora_jax.errors.ConfigError: ...r=0...
    """

    # The annotations say what a field takes (`--set` parses a value by them); __post_init__ stores
    # lists as tuples and patterns as sorted (key, value) pairs so the config stays hashable.
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Names | Literal["all-linear"] | Regex = ("q_proj", "v_proj")
    exclude_modules: Names | Regex | None = None
    layers_to_transform: Layers | None = None
    rank_pattern: Annotated[Mapping[str, int], "a mapping of module regexes to ranks, e.g. {q_proj: 8}"] = (
        dataclasses.field(default_factory=dict)
    )
    alpha_pattern: Annotated[Mapping[str, float], "a mapping of module regexes to alphas, e.g. {q_proj: 16}"] = (
        dataclasses.field(default_factory=dict)
    )
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | Literal["gaussian", "pissa"] = True
    modules_to_save: Names = ()
    loraplus_lr_ratio: float | None = None
    bias: str = "none"

    def __post_init__(self):
        _check_int(self, "r", "", hint=" (the adapter rank), e.g. r=16")
        _check_number(self, "lora_alpha", "", "> 0, e.g. 2*r", lambda v: v > 0)
        _check_number(self, "lora_dropout", "", "in [0, 1), e.g. 0.05", lambda v: 0 <= v < 1)
        targets = self.target_modules
        if targets == "all-linear":
            pass  # kept as is: the family's projections, resolved by `plan_targets`
        elif isinstance(targets, str):
            if not targets.strip():
                raise ConfigError(
                    f"target_modules={targets!r} is empty; name modules such as [q_proj, v_proj] or pass 'all-linear'"
                )
            _check_regex(targets, "target_modules")
        else:
            targets = _as_tuple(targets, "target_modules")
            if not targets:
                raise ConfigError(
                    f"target_modules is empty ({self.target_modules!r}); name modules such "
                    "as ('q_proj', 'v_proj') or pass 'all-linear'"
                )
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
                raise ConfigError(
                    f"layers_to_transform={list(layers)} has a negative index; layers are numbered from 0"
                )
            if isinstance(targets, str) and targets != "all-linear":
                raise ConfigError(
                    f"layers_to_transform={list(layers)} cannot be used with target_modules={targets!r} "
                    "(a regex; PEFT refuses the pair too); name modules such as [q_proj, v_proj], or "
                    "write the layers into the regex"
                )
        object.__setattr__(self, "layers_to_transform", layers)
        object.__setattr__(self, "rank_pattern", _as_pairs(self.rank_pattern, "rank_pattern", int))
        object.__setattr__(self, "alpha_pattern", _as_pairs(self.alpha_pattern, "alpha_pattern", (int, float)))
        for key, _ in self.rank_pattern + self.alpha_pattern:
            _check_regex(key, "pattern key")
        if (
            self.init_lora_weights not in _INIT_CHOICES
            or isinstance(self.init_lora_weights, int)
            and not isinstance(self.init_lora_weights, bool)
        ):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r}; choose one of {_INIT_CHOICES}")
        object.__setattr__(self, "modules_to_save", _as_tuple(self.modules_to_save, "modules_to_save") or ())
        _check_bool(self, "use_rslora", "")
        _check_bool(self, "use_dora", "")
        _check_number(
            self,
            "loraplus_lr_ratio",
            "",
            "> 0 (the learning-rate ratio of b to a), e.g. 16, or null",
            lambda v: v > 0,
            allow_none=True,
        )
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r} is not supported; lora_jax trains no biases, use 'none'")
        if self.use_dora and self.init_lora_weights == "pissa":
            raise ConfigError(
                "use_dora=True with init_lora_weights='pissa' is not supported (PEFT "
                "does not define it either); use one or the other"
            )

    def replace(self, **changes) -> LoraConfig:
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
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        return cls(**d)


def _check_regex(pattern: str, name: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{name} {pattern!r} is not a valid regular expression ({e})") from None
