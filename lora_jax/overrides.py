"""Reading config values from text: `--set section.field=value`, sweep-grid values and YAML files.

The parsing is typed by the field's annotation (`parse_annotated`, behind
`lora_jax.run_config.parse_field_value`): a list field takes a YAML flow list (`[gate_proj,
up_proj]`) or one bare name, a mapping field a flow mapping (`{embed: tensor}`), bool / int / float
/ Literal / Optional fields what they say, and a text field its text as it is (`train.output_dir=1e5`
is the directory "1e5"); anything else is one `ConfigError` line naming the key, the value and what
the field takes. `load_yaml` reads a config file with the same YAML rules (`1e-4` is a float).

This module knows no config section: the sections and their names live in `lora_jax.run_config`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml

from lora_jax.errors import ConfigError

__all__ = ["parse_annotated", "parse_value", "describe", "field_hints", "field_types", "load_yaml", "suggest", "short"]


def field_types(klass) -> dict[str, str]:
    """Field name -> the `kind` of `parse_value`: "str" or "str | None" for a text field (a str
    or Literal of strs: its value is taken as it is), else "Any" (YAML). Kept for callers of
    `parse_value`; `parse_annotated` reads the full annotation."""
    out = {}
    for name, hint in field_hints(klass).items():
        options = _options(hint)
        if options and all(_is_text(o) for o in options if o is not type(None)):
            out[name] = "str | None" if type(None) in options else "str"
        else:
            out[name] = "Any"
    return out


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_NULLS = ("", "~", "null", "Null", "NULL")


def _yaml_loader():
    """yaml.SafeLoader that also reads `1e-4` (no dot; YAML 1.1 makes it a string) as a float, in
    plain (unquoted) scalars only, as YAML 1.2 does."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return Loader


def parse_value(raw: str, key: str | None = None, kind: str = "Any"):
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
    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        if text[:1] in "[{'\"":
            raise ConfigError(
                f"{where} is not valid YAML ({_yaml_problem(e)}); e.g. [q_proj, v_proj] or {{mlp: fsdp}}"
            ) from None
        return text


# ---------------------------------------------------------------- values typed by the annotation
_NAME = re.compile(r"[\w.]+")  # a bare module name (or dotted suffix), not a regex
_REJECT = object()


def parse_annotated(hint, text: str, key: str):
    """`text` (a `--set` or sweep-grid value for the field `key`) parsed and checked by the
    field's annotation `hint`:

    - `tuple[X, ...]`: a YAML flow list (`[gate_proj, up_proj]`) or one bare X (`q_proj`, `3`);
      returned as a list. A bare text that is not a plain name (`.*proj`) is not a list of one:
      where the field also takes a regex (`lora.target_modules`) it is that regex.
    - `Mapping[K, V]`: a YAML flow mapping (`{embed: tensor}`); null is `{}`.
    - `bool`, `int`, `float`: YAML (`true`, `8`, `1e-4`; an int is a float, a float never an int).
    - `str` and `Literal` of strs: the text as it is (`1e5` is the text "1e5"); quote it to use
      YAML; a Literal must be one of its choices. `X | None`: null (`null`, `~`, nothing) is None.

    A value of the wrong type is one ConfigError line: `key=value; use <what the field takes>`.
    """
    text = text.strip()
    options = _options(hint)
    if options and all(_is_text(o) for o in options if o is not type(None)) and not _quoted(text):
        value = None if type(None) in options and text in _NULLS else text
    else:
        value = _yaml_value(text, f"{key}={text}")
    out = _accept(value, hint)
    if out is _REJECT:
        raise ConfigError(f"{key}={short(value, 100)}; use {describe(hint)}")
    return out


@functools.cache
def field_hints(section: type) -> dict[str, Any]:
    """Field name -> its resolved annotation, `Annotated` descriptions kept."""
    hints = typing.get_type_hints(section, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


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
    raise TypeError(
        f"parse_field_value cannot read a field annotated {hint!r}; give it a type it "
        "knows (bool, int, float, str, Literal, X | None, tuple[X, ...], Mapping[K, V])"
    )


def describe(hint) -> str:
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
        return [f"a list of {describe(args[0])}, e.g. [a, b]"]
    if origin in (collections.abc.Mapping, dict):
        return [f"a mapping of {describe(args[0])} to {describe(args[1])}, e.g. {{a: b}}"]
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


def suggest(key: str, options, section: str | None) -> str:
    """ "; did you mean a, b?" naming the options closest to `key` (each `section.`-prefixed when a
    section is given), or "" when none is close."""
    opts = [f"{section}.{o}" if section else o for o in options]
    close = difflib.get_close_matches(key if not section else f"{section}.{key}", opts, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""
