"""The run configuration: one section per concern (`ModelConfig`, `LoraConfig`, `DataConfig`,
`OptimConfig`, `TrainConfig`, `MeshConfig`) gathered in `RunConfig`, read from YAML (`load_yaml`)
and edited with `--set section.field=value`.

A `--set` value is parsed by its field's annotation (`parse_field_value`): a list field takes a
YAML flow list (`[gate_proj, up_proj]`) or one bare name, a mapping field a flow mapping
(`{embed: tensor}`), bool / int / float / Literal / Optional fields what they say, and a text field
its text as it is (`train.output_dir=1e5` is the directory "1e5"); anything else is one
`ConfigError` line naming the key, the value and what the field takes. The ranges (`lr > 0`, ...)
are checked by each section's `__post_init__`, so a YAML file and `--set` are held to the same rules.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import numbers
import os
import re
import types
import typing
from typing import Annotated, Any, Literal, Mapping, get_args, get_origin

from lora_jax.errors import ConfigError
from lora_jax.models.llama_config import (_DTYPES, ATTENTION_IMPLS, REMAT_POLICIES, AttentionImpl, RematPolicy,
                                          _check_bool, _check_int, _check_number, _check_str)

if typing.TYPE_CHECKING:
    from lora_jax.lora.config import LoraConfig

__all__ = ["ModelConfig", "OptimConfig", "TrainConfig", "MeshConfig", "RunConfig", "load_yaml",
           "parse_field_value"]

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
    # "nf4" (QLoRA) | "int8": a quantised frozen base (lora_jax.quant)
    quantize: Literal["nf4", "int8"] | None = None
    # the gate/up adapters inside the frozen matmul (faster; false: ~2% less peak memory, for the
    # longest context that fits)
    fuse_wide_adapters: bool = True
    # the attention kernel: "auto" (the fastest correct one for the platform), "cudnn", "pallas"
    # or "xla" (the reference; keeps [t, t] scores, so only for the CPU and tests)
    attention: AttentionImpl = "auto"

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
    rules: Annotated[Mapping[str, str | tuple[str, ...] | None],
                     "a mapping of logical axes to mesh axes, e.g. {mlp: fsdp} or {embed: [fsdp, tensor]}"] = ()

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
        sections = _sections()
        if self.lora is None:
            object.__setattr__(self, "lora", sections["lora"](r=16, lora_alpha=32, target_modules="all-linear"))
        if self.data is None:
            object.__setattr__(self, "data", sections["data"]())
        for name, klass in sections.items():
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
        """Apply `section.field=value` strings, each value parsed and checked by its field's
        annotation (`parse_field_value`: 1e-4, true, [q_proj, v_proj], {mlp: fsdp}, text as it is)."""
        d = self.to_dict()
        sections = _sections()
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
            d[section][field] = parse_field_value(sections[section], field, raw, key=f"{section}.{field}")
        return RunConfig.from_dict(d)


def _sections() -> dict:
    """Section name -> its config class. Imported here, not at the top: `lora_jax.data` loads the
    tokenizer stack, and `lora_jax.lora`'s package imports modules that import `lora_jax.config`
    (which imports this module), so a top-level import would be a cycle."""
    from lora_jax.data.config import DataConfig
    from lora_jax.lora.config import LoraConfig

    return {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "mesh": MeshConfig}


def _field_types(klass) -> dict[str, str]:
    """Field name -> the `kind` of `_parse_value`: "str" or "str | None" for a text field (a str
    or Literal of strs: its value is taken as it is), else "Any" (YAML). Kept for callers of
    `_parse_value`; `parse_field_value` reads the full annotation."""
    out = {}
    for name, hint in _hints(klass).items():
        options = _options(hint)
        if options and all(_is_text(o) for o in options if o is not type(None)):
            out[name] = "str | None" if type(None) in options else "str"
        else:
            out[name] = "Any"
    return out


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
    text = raw.strip()
    if kind in ("str", "str | None") and not _quoted(text):
        return None if kind == "str | None" and text in _NULLS else text
    return _yaml_value(text, f"--set {key}={raw}" if key else repr(raw))


def _quoted(text: str) -> bool:
    return text[:1] in ("'", '"')


def _yaml_value(text: str, where: str):
    """`text` read as YAML; a plain scalar YAML refuses (`a: b: c`) is the text itself, a flow
    collection or quoted scalar it refuses is a ConfigError naming `where`."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        if text[:1] in "[{'\"":
            raise ConfigError(f"{where} is not valid YAML ({_yaml_problem(e)}); e.g. [q_proj, v_proj] "
                              "or {mlp: fsdp}") from None
        return text


# ---------------------------------------------------------------- values typed by the annotation
_NAME = re.compile(r"[\w.]+")  # a bare module name (or dotted suffix), not a regex
_REJECT = object()


def parse_field_value(section: type, name: str, text: str, key: str | None = None):
    """The value of field `name` of the config class `section`, written as `text` (a `--set` or
    sweep-grid value), parsed and checked by the field's annotation:

    - `tuple[X, ...]`: a YAML flow list (`[gate_proj, up_proj]`) or one bare X (`q_proj`, `3`);
      returned as a list. A bare text that is not a plain name (`.*proj`) is not a list of one:
      where the field also takes a regex (`lora.target_modules`) it is that regex.
    - `Mapping[K, V]`: a YAML flow mapping (`{embed: tensor}`); null is `{}`.
    - `bool`, `int`, `float`: YAML (`true`, `8`, `1e-4`; an int is a float, a float never an int).
    - `str` and `Literal` of strs: the text as it is (`1e5` is the text "1e5"); quote it to use
      YAML; a Literal must be one of its choices. `X | None`: null (`null`, `~`, nothing) is None.

        >>> parse_field_value(LoraConfig, "target_modules", "[gate_proj, up_proj]")
        ['gate_proj', 'up_proj']

    A value of the wrong type is one ConfigError line: `key=value; use <what the field takes>`
    (`key` defaults to "section.name"). Ranges (`r > 0`) are the section's `__post_init__`'s to check.
    """
    hints = _hints(section)
    key = key or f"{_section_name(section)}.{name}"
    if name not in hints:
        raise ConfigError(f"{key} is not a field of {section.__name__}; fields: {sorted(hints)}")
    hint = hints[name]
    text = text.strip()
    options = _options(hint)
    if options and all(_is_text(o) for o in options if o is not type(None)) and not _quoted(text):
        value = None if type(None) in options and text in _NULLS else text
    else:
        value = _yaml_value(text, f"{key}={text}")
    out = _accept(value, hint)
    if out is _REJECT:
        raise ConfigError(f"{key}={_short(value, 100)}; use {_describe(hint)}")
    return out


@functools.lru_cache(maxsize=None)
def _hints(section: type) -> dict[str, Any]:
    """Field name -> its resolved annotation, `Annotated` descriptions kept."""
    hints = typing.get_type_hints(section, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _section_name(section: type) -> str:
    return next((n for n, k in _sections().items() if k is section), section.__name__)


def _strip(hint):
    """`Annotated[X, "description"]` -> X."""
    return get_args(hint)[0] if get_origin(hint) is Annotated else hint


def _options(hint) -> tuple:
    """The alternatives of a union (`X | Y | None`), else the annotation alone."""
    hint = _strip(hint)
    if get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(_strip(o) for o in get_args(hint))
    return (hint,)


def _is_text(hint) -> bool:
    """A str, or a Literal of strs: a text field, whose value is taken as it is."""
    hint = _strip(hint)
    return hint is str or (get_origin(hint) is Literal and all(isinstance(a, str) for a in get_args(hint)))


def _accept(value, hint):
    """`value` (from YAML) as the annotation `hint` takes it (a list for a tuple, a dict for a
    mapping), or `_REJECT`."""
    hint = _strip(hint)
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        return value if value is None else _REJECT
    if hint is bool:
        return value if isinstance(value, bool) else _REJECT
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _REJECT
    if hint is float:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _REJECT
    if hint is str:
        return value if isinstance(value, str) else _REJECT
    if origin is Literal:  # `type(...) is`: True == 1, and 1 is no choice of Literal[True]
        return value if any(type(value) is type(a) and value == a for a in args) else _REJECT
    if origin in (typing.Union, types.UnionType):
        for option in args:
            out = _accept(value, option)
            if out is not _REJECT:
                return out
        return _REJECT
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = args[0]
        if isinstance(value, (list, tuple)):
            items = [_accept(v, item) for v in value]
            return _REJECT if any(v is _REJECT for v in items) else items
        if value is None or isinstance(value, Mapping) or (isinstance(value, str) and not _NAME.fullmatch(value)):
            return _REJECT
        one = _accept(value, item)  # one bare name or index: a list of one
        return _REJECT if one is _REJECT else [one]
    if origin in (collections.abc.Mapping, dict):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            return _REJECT
        out = {}
        for k, v in value.items():
            k, v = _accept(k, args[0]), _accept(v, args[1])
            if k is _REJECT or v is _REJECT:
                return _REJECT
            out[k] = v
        return out
    raise TypeError(f"parse_field_value cannot read a field annotated {hint!r}; give it a type it "
                    "knows (bool, int, float, str, Literal, X | None, tuple[X, ...], Mapping[K, V])")


def _describe(hint) -> str:
    """What an annotation takes, in words: "an integer", "'nf4', 'int8' or null", ..."""
    return _join(_atoms(hint))


def _atoms(hint) -> list[str]:
    if get_origin(hint) is Annotated:
        return [str(hint.__metadata__[0])]
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return [atom for option in args for atom in _atoms(option)]
    if origin is Literal:
        return [str(a).lower() if isinstance(a, bool) else repr(a) for a in args]
    if origin is tuple:
        return [f"a list of {_describe(args[0])}, e.g. [a, b]"]
    if origin in (collections.abc.Mapping, dict):
        return [f"a mapping of {_describe(args[0])} to {_describe(args[1])}, e.g. {{a: b}}"]
    if hint is bool:
        return ["true", "false"]
    return [{type(None): "null", int: "an integer", float: "a number", str: "text"}.get(hint, repr(hint))]


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]



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
