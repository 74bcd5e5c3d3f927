"""The run configuration: one section per concern (`ModelConfig`, `LoraConfig`, `DataConfig`,
`OptimConfig`, `TrainConfig`, `MeshConfig`) gathered in `RunConfig`, read from YAML (`load_yaml`)
and edited with `--set section.field=value`.

A `--set` value is parsed by its field's annotation (`parse_field_value`): a list field takes a
YAML flow list (`[gate_proj, up_proj]`) or one bare name, a mapping field a flow mapping
(`{embed: tensor}`), bool / int / float / Literal / Optional fields what they say, and a text field
its text as it is (`train.output_dir=1e5` is the directory "1e5"); anything else is one
`ConfigError` line naming the key, the value and what the field takes. The ranges (`lr > 0`, ...)
are checked by each section's `__post_init__`, so a YAML file and `--set` are held to the same rules.
The text parsing itself (YAML, annotations) lives in `lora_jax.overrides`.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from lora_jax.data.config import DataConfig
from lora_jax.errors import ConfigError, ConfigWarning
from lora_jax.lora.config import LoraConfig
from lora_jax.models.llama_config import (
    _DTYPES,
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    AttentionImpl,
    RematPolicy,
    _check_bool,
    _check_int,
    _check_number,
    _check_str,
)
from lora_jax.overrides import describe, field_hints, load_yaml, parse_annotated, short, suggest
from lora_jax.sharding import DEFAULT_RULES, MESH_AXES

# the parser's earlier names, for callers not yet moved to `lora_jax.overrides`

__all__ = [
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "MeshConfig",
    "RunConfig",
    "load_yaml",
    "parse_field_value",
    "field_description",
    "section_classes",
]

Schedule = Literal["cosine", "linear", "constant"]
_SCHEDULES = get_args(Schedule)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which base model and how to run it. `path=None` is the built-in demonstration model."""

    path: str | None = None
    # parameters and compute: "auto" = bfloat16 on accelerators, float32 on CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    scan_layers: bool = True
    remat_policy: RematPolicy = "none"
    loss_chunk_tokens: int = 2048  # the LM-head cross-entropy runs over chunks of this many tokens
    # the MLP runs over chunks of this many tokens of a row (each recomputed in the backward pass):
    # bounds its intermediates at long context; null = the whole row at once
    mlp_chunk_tokens: int | None = None
    # "nf4" (QLoRA) | "int8": a quantised frozen base (lora_jax.quant); "fp8": e4m3 projections
    # multiplied in FP8 on Hopper/Ada GPUs, dequantised elsewhere (lora_jax.fp8)
    quantize: Literal["nf4", "int8", "fp8"] | None = None
    # the gate/up adapters inside the frozen matmul (faster; false: ~2% less peak memory, for the
    # longest context that fits)
    fuse_wide_adapters: bool = True
    # the attention kernel: "auto" (the fastest correct one for the platform), "cudnn", "pallas"
    # or "xla" (the reference; keeps [t, t] scores, so only for the CPU and tests)
    attention: AttentionImpl = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        if self.quantize not in (None, "nf4", "int8", "fp8"):
            raise ConfigError(
                f"model.quantize={self.quantize!r}; choose 'nf4', 'int8', 'fp8' or null (no quantisation)"
            )
        if self.dtype not in ("auto",) + _DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r}; choose 'auto', 'float32' or 'bfloat16'")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"model.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        _check_str(self, "path", "model.", "a Hugging Face model directory", allow_none=True)
        _check_int(self, "loss_chunk_tokens", "model.", hint=", e.g. 2048")
        if self.mlp_chunk_tokens is not None:
            _check_int(self, "mlp_chunk_tokens", "model.", hint=", e.g. 16384, or null")
        for name in ("scan_layers", "fuse_wide_adapters"):
            _check_bool(self, name, "model.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW on the trainable leaves, warmup then decay, global-norm clipping."""

    lr: float = 2e-4
    schedule: Schedule = "cosine"
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
        _check_number(
            self, "min_lr_ratio", w, "in [0, 1] (the final lr as a fraction of optim.lr)", lambda v: 0 <= v <= 1
        )
        _check_number(self, "weight_decay", w, ">= 0, e.g. 0.01", lambda v: v >= 0)
        _check_number(self, "b1", w, "in [0, 1) (Adam's beta1), e.g. 0.9", lambda v: 0 <= v < 1)
        _check_number(self, "b2", w, "in [0, 1) (Adam's beta2), e.g. 0.999", lambda v: 0 <= v < 1)
        _check_number(self, "eps", w, "> 0, e.g. 1e-8", lambda v: v > 0)
        _check_number(
            self,
            "clip_norm",
            w,
            "> 0 (the global gradient-norm clip, e.g. 1.0) or null for no clipping",
            lambda v: v > 0,
            allow_none=True,
        )
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
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "save_every",
            "keep_checkpoints",
            "max_new_tokens",
        ):
            _check_int(self, name, w)
        _check_int(self, "seed", w, minimum=0)
        _check_int(self, "eval_every", w, minimum=0, hint=" (0: evaluate at the start and the end only)")
        _check_int(self, "eval_batches", w, hint=" (batches per evaluation)")
        _check_int(self, "eval_generate", w, minimum=0, hint=" (0: no exact-match scoring)")
        _check_str(self, "output_dir", w, "a directory path")
        _check_bool(self, "export_peft", w)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be divisible by train.grad_accum={self.grad_accum}"
            )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp", "tensor"; -1 fills the remaining devices) and overrides of the
    logical-axis rules (e.g. {"mlp": "fsdp"}); see `lora_jax.sharding.DEFAULT_RULES`."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: Annotated[
        Mapping[str, str | tuple[str, ...] | None],
        "a mapping of logical axes to mesh axes, e.g. {mlp: fsdp} or {embed: [fsdp, tensor]}",
    ] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (v <= 0 and v != -1):
                raise ConfigError(f"mesh.{name}={v!r} must be a positive integer or -1 (all remaining devices)")
            object.__setattr__(self, name, int(v))
        object.__setattr__(self, "rules", _mesh_rules(self.rules))


def _mesh_rules(rules) -> tuple:
    """mesh.rules as sorted (logical axis, mesh axis | tuple of mesh axes | None) pairs."""
    example = "e.g. {mlp: fsdp} or {embed: [fsdp, tensor]}"
    if rules is None or (isinstance(rules, (list, tuple)) and not rules):
        return ()
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, (list, tuple)) and all(isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in rules):
        items = [tuple(kv) for kv in rules]
    else:
        raise ConfigError(f"mesh.rules={rules!r} must map logical axes to mesh axes, {example}")
    pairs = []
    for k, v in items:
        if not isinstance(k, str) or k not in DEFAULT_RULES:
            raise ConfigError(f"mesh.rules key {k!r} is not a logical axis; known: {sorted(DEFAULT_RULES)}")
        targets = [v] if isinstance(v, str) else v if isinstance(v, (list, tuple)) else None
        if v is not None and (targets is None or not all(isinstance(t, str) and t in MESH_AXES for t in targets)):
            raise ConfigError(
                f"mesh.rules {k}: {v!r} must name mesh axes {list(MESH_AXES)} (a name, "
                f"a list of names or null), {example}"
            )
        pairs.append((k, tuple(v) if isinstance(v, list) else v))
    return tuple(sorted(pairs, key=lambda kv: kv[0]))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, one section per concern; `--set section.field=value` edits it."""

    model: ModelConfig = ModelConfig()
    lora: LoraConfig = None  # type: ignore[assignment]
    data: DataConfig = None  # type: ignore[assignment]
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        sections = section_classes()
        if self.lora is None:
            object.__setattr__(self, "lora", sections["lora"](r=16, lora_alpha=32, target_modules="all-linear"))
        if self.data is None:
            object.__setattr__(self, "data", sections["data"]())
        for name, klass in sections.items():
            value = getattr(self, name)
            if not isinstance(value, klass):
                raise ConfigError(
                    f"RunConfig {name}={value!r} must be a {klass.__name__}; build it with "
                    f"RunConfig.from_dict for plain mappings"
                )

    def warn_unusual(self) -> list[str]:
        """Warn (`ConfigWarning`) about settings that run but probably not as meant; returns the
        messages. Not done at construction: a config is often built in steps (--set, sweep files)."""
        import warnings

        notes = []
        warmup, steps = self.optim.warmup_steps, self.train.steps
        if warmup > steps:
            if self.optim.truncate_warmup:
                notes.append(
                    f"optim.warmup_steps={warmup} exceeds train.steps={steps}: the warmup is cut "
                    f"to {max(steps - 1, 0)} steps, so the schedule is not the one configured; "
                    "lower optim.warmup_steps or raise train.steps"
                )
            else:
                notes.append(
                    f"optim.warmup_steps={warmup} exceeds train.steps={steps}: the run ends "
                    f"still warming up, at {(steps - 1) / warmup:.0%} of optim.lr (as "
                    "transformers would); lower optim.warmup_steps, raise train.steps, or set "
                    "optim.truncate_warmup=true to end the warmup within the run"
                )
        for note in notes:
            warnings.warn(ConfigWarning(note), stacklevel=2)
        return notes

    def to_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.model),
            "lora": self.lora.to_dict(),
            "data": dataclasses.asdict(self.data),
            "optim": dataclasses.asdict(self.optim),
            "train": dataclasses.asdict(self.train),
            "mesh": {**dataclasses.asdict(self.mesh), "rules": dict(self.mesh.rules)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        sections = section_classes()
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"a run config is a mapping of sections {sorted(sections)}, not a {type(d).__name__} ({short(d)})"
            )
        unknown = sorted(set(map(str, d)) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; sections are {sorted(sections)}")
        out = {}
        for name, klass in sections.items():
            values = d.get(name)
            if values is None:
                values = {}
            if not isinstance(values, Mapping):
                raise ConfigError(
                    f"config section {name}: {short(values)} must be a mapping of fields, "
                    f"e.g. {name}: {{{next(iter(field_hints(klass)))}: ...}}"
                )
            values = {str(k): v for k, v in values.items()}
            fields = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(values) - fields)
            if bad:
                raise ConfigError(f"unknown key(s) {[f'{name}.{b}' for b in bad]}{suggest(bad[0], fields, name)}")
            try:
                out[name] = klass(**values)
            except TypeError as e:  # e.g. a string where a number belongs
                raise ConfigError(f"bad value in section {name!r}: {e}") from None
        return cls(**out)

    def with_overrides(self, pairs: list[str]) -> RunConfig:
        """Apply `section.field=value` strings, each value parsed and checked by its field's
        annotation (`parse_field_value`: 1e-4, true, [q_proj, v_proj], {mlp: fsdp}, text as it is)."""
        d = self.to_dict()
        sections = section_classes()
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"--set {pair!r} is not key=value; e.g. --set lora.r=8")
            key, raw = pair.split("=", 1)
            section, _, field = key.strip().partition(".")
            if section not in d or not field:
                raise ConfigError(
                    f"--set key {key!r} is unknown; keys look like lora.r, optim.lr, "
                    f"train.steps{suggest(key, _all_keys(d), None)}"
                )
            if field not in d[section]:
                raise ConfigError(f"--set key {key!r} is unknown{suggest(key, _all_keys(d), None)}")
            d[section][field] = parse_field_value(sections[section], field, raw, key=f"{section}.{field}")
        return RunConfig.from_dict(d)


def section_classes() -> dict[str, type]:
    """Section name -> its config class (`{"model": ModelConfig, "lora": LoraConfig, ...}`): the
    class a `section.field` key names (a sweep grid or sweep file), for `parse_field_value`."""
    return {
        "model": ModelConfig,
        "lora": LoraConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "mesh": MeshConfig,
    }


def parse_field_value(section: type, name: str, text: str, key: str | None = None):
    """The value of field `name` of the config class `section`, written as `text` (a `--set` or
    sweep-grid value), parsed and checked by the field's annotation (`lora_jax.overrides.parse_annotated`
    says how each kind of field is read):

        >>> parse_field_value(LoraConfig, "target_modules", "[gate_proj, up_proj]")
        ['gate_proj', 'up_proj']

    A value of the wrong type is one ConfigError line: `key=value; use <what the field takes>`
    (`key` defaults to "section.name"). Ranges (`r > 0`) are the section's `__post_init__`'s to check.
    """
    hints = field_hints(section)
    key = key or f"{_section_name(section)}.{name}"
    if name not in hints:
        raise ConfigError(f"{key} is not a field of {section.__name__}; fields: {sorted(hints)}")
    return parse_annotated(hints[name], text, key)


def field_description(section: type, name: str) -> str:
    """What field `name` of the config class `section` takes, in words ("an integer", "'nf4',
    'int8' or null", ...), as `parse_field_value`'s errors say it."""
    hints = field_hints(section)
    if name not in hints:
        raise ConfigError(
            f"{_section_name(section)}.{name} is not a field of {section.__name__}; fields: {sorted(hints)}"
        )
    return describe(hints[name])


def _section_name(section: type) -> str:
    return next((n for n, k in section_classes().items() if k is section), section.__name__)


def _all_keys(d: dict) -> list[str]:
    return [f"{s}.{k}" for s, fields in d.items() for k in fields]
