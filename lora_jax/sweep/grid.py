"""The sweep grid: which keys may vary in one compiled program, how `--grid` text is read, and
how a grid expands into named configurations (`SweepPoint`s) over a base `RunConfig`.

Grid values written as text (`--grid lora.r=4,8,16`, strings in a Python or YAML grid) are parsed
by the field's own annotation (`lora_jax.run_config.parse_field_value`), as `--set` parses them.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax.errors import ConfigError
from lora_jax.run_config import RunConfig, parse_field_value, section_classes

__all__ = [
    "ALLOWED_KEYS",
    "SHORT_NAMES",
    "SweepPoint",
    "split_grid_values",
    "parse_grid_value",
    "normalize_grid",
    "parse_grid_arg",
    "parse_grid_args",
    "check_grid",
    "expand_grid",
    "check_sweepable",
    "format_value",
]

# What can differ between configurations of one program (data: arrays, zero padding; never shapes
# or structure such as targets, DoRA, layers or steps, which one compile cannot share), and what
# each takes, for grid errors.
_TAKES = {
    "lora.r": "an integer",
    "lora.lora_alpha": "a number",
    "lora.use_rslora": "true or false",
    "lora.lora_dropout": "a number",
    "optim.lr": "a number",
    "optim.weight_decay": "a number",
}
ALLOWED_KEYS = tuple(_TAKES)
SHORT_NAMES = {
    "lora.r": "r",
    "lora.lora_alpha": "alpha",
    "lora.use_rslora": "rslora",
    "lora.lora_dropout": "dropout",
    "optim.lr": "lr",
    "optim.weight_decay": "wd",
}


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One configuration of the grid: its name, the values it sets, and its full RunConfig."""

    name: str
    values: dict
    run: RunConfig


def _allowed_msg() -> str:
    return ", ".join(ALLOWED_KEYS)


def format_value(v) -> str:
    """A value as it appears in a configuration's name (`r4_alpha8_lr0.0001`) and plot labels."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# ------------------------------------------------------------------------------- text of values
def split_grid_values(raw: str) -> list[str]:
    """`4,8,16` -> ["4", "8", "16"]: the values of one `--grid` axis, split at the commas outside
    brackets and quotes, so a list value stays one value (`[q_proj, v_proj],all-linear`)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(raw):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append(raw[start:i].strip())
            start = i + 1
    return parts + [raw[start:].strip()]


def parse_grid_value(key: str, text: str):
    """One grid value of `key` ("section.field"), written as text, parsed by the field's
    annotation as `--set` parses it (`parse_field_value`): `8` for lora.r, `1e-4` for optim.lr,
    `[q_proj, v_proj]` for a list field. ConfigError for an unknown key or a value of the wrong type."""
    section, _, field = key.partition(".")
    klass = section_classes().get(section)
    if klass is None or not field:
        raise ConfigError(
            f"grid key {key!r} is not a config key (section.field, e.g. lora.r); "
            f"sections are {sorted(section_classes())}"
        )
    try:
        return parse_field_value(klass, field, text, key=key)
    except ConfigError:
        if key not in _TAKES:
            raise
        raise ConfigError(f"grid {key}={text.strip()!r} must be {_TAKES[key]}") from None


def _check_value(key: str, v) -> None:
    """A value given as data (not text): the type its key needs; ranges are the config's to check."""
    if key == "lora.use_rslora":
        if not isinstance(v, bool):
            raise ConfigError(f"grid {key}={v!r} must be true or false")
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"grid {key}={v!r} must be a number")


# ------------------------------------------------------------------------------------- the grid
def normalize_grid(grid: Mapping[str, Any]) -> dict[str, list]:
    """Check a grid `{key: [values]}` (a scalar is one value; strings are parsed like `--set`).
    Raises ConfigError naming the key for an unknown key, an empty or repeated value list."""
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError(
            "the sweep grid is empty; give at least one key with values, e.g. "
            "--grid lora.r=4,8,16 (allowed keys: " + _allowed_msg() + ")"
        )
    out: dict[str, list] = {}
    for key, values in grid.items():
        if not isinstance(key, str) or key not in ALLOWED_KEYS:
            close = difflib.get_close_matches(str(key), ALLOWED_KEYS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"grid key {key!r} cannot be swept{hint}; allowed keys: {_allowed_msg()}. Settings "
                "that change shapes or targets (other than the rank) cannot share one compiled "
                "program: set them for the whole sweep with --set instead"
            )
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            values = [values]
        values = [parse_grid_value(key, v) if isinstance(v, str) else v for v in values]
        if not values:
            raise ConfigError(f"grid key {key} has no values; give at least one, e.g. {key}=1,2")
        for v in values:
            _check_value(key, v)
        if len(set(values)) != len(values):
            dup = sorted({v for v in values if values.count(v) > 1}, key=str)
            raise ConfigError(f"grid key {key} repeats the value(s) {dup}; list each value once")
        out[key] = list(values)
    return out


def parse_grid_arg(text: str) -> tuple[str, list]:
    """`lora.r=4,8,16` -> ("lora.r", [4, 8, 16]). Raises ConfigError if malformed."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"--grid {text!r} is not KEY=V1,V2,...; e.g. --grid lora.r=4,8,16")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--grid {text!r} has no key; e.g. --grid lora.r=4,8,16")
    parts = split_grid_values(raw)
    if not raw.strip() or any(not p for p in parts):
        raise ConfigError(f"--grid {text!r} has an empty value; separate values by commas, e.g. --grid {key}=4,8,16")
    grid = normalize_grid({key: parts})
    return key, grid[key]


def parse_grid_args(texts: Sequence[str]) -> dict[str, list]:
    """Repeated `--grid` options -> one grid (a key given twice is refused)."""
    grid: dict[str, list] = {}
    for text in texts:
        key, values = parse_grid_arg(text)
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid {key}=...")
        grid[key] = values
    return grid


def _normalize_points(points: Sequence[Mapping[str, Any]]) -> list[dict]:
    """An explicit list of configurations `[{key: value}, ...]` (no product)."""
    if not points:
        raise ConfigError("the sweep's list of configurations is empty; give at least one")
    out = []
    for i, point in enumerate(points):
        if not isinstance(point, Mapping) or not point:
            raise ConfigError(
                f"sweep configuration #{i} is {point!r}; each one maps grid keys to one "
                "value, e.g. {'lora.r': 8, 'optim.lr': 1e-4}"
            )
        one = {}
        for key, value in point.items():
            if isinstance(value, (list, tuple)):
                raise ConfigError(
                    f"sweep configuration #{i}: {key}={value!r} must be one value (a "
                    "list of configurations is not a product grid)"
                )
            one.update({k: v[0] for k, v in normalize_grid({key: [value]}).items()})
        out.append(one)
    return out


def check_grid(grid) -> dict[str, list] | list[dict]:
    """A grid checked and its text values parsed: a mapping `{key: [values]}` (a product) or a
    list of configurations `[{key: value}, ...]`; ConfigError for anything else."""
    if isinstance(grid, Mapping):
        return normalize_grid(grid)
    if isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)):
        return _normalize_points(grid)
    raise ConfigError(
        f"the sweep grid must be a mapping {{key: [values]}} (a product) or a list of "
        f"configurations [{{key: value}}, ...], not {type(grid).__name__}"
    )


def _combos(grid) -> list[dict]:
    grid = check_grid(grid)
    if isinstance(grid, dict):
        keys = list(grid)
        return [dict(zip(keys, c)) for c in itertools.product(*(grid[k] for k in keys))]
    return grid


def expand_grid(run: RunConfig, grid) -> list[SweepPoint]:
    """The configurations of `grid` applied to `run`: a mapping `{key: [values]}` is a Cartesian
    product (keys in the given order); a list `[{key: value}, ...]` is taken as is."""
    combos = _combos(grid)
    points: list[SweepPoint] = []
    for values in combos:
        sections: dict[str, dict] = {"lora": {}, "optim": {}}
        for key, v in values.items():
            section, field = key.split(".", 1)
            sections[section][field] = v
        try:
            lcfg = run.lora.replace(**sections["lora"])
            ocfg = dataclasses.replace(run.optim, **sections["optim"])
        except (ConfigError, TypeError) as e:
            where = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"grid point {where}: {e}") from None
        points.append(SweepPoint("", values, dataclasses.replace(run, lora=lcfg, optim=ocfg)))

    def value(p, key):
        section, field = key.split(".", 1)
        return getattr(getattr(p.run, section), field)

    keys = [k for k in ALLOWED_KEYS if any(k in c for c in combos)]
    varied = [k for k in keys if len({value(p, k) for p in points}) > 1] or keys
    seen = set()
    for i, p in enumerate(points):
        name = "_".join(f"{SHORT_NAMES[k]}{format_value(value(p, k))}" for k in varied)
        if name in seen:
            raise ConfigError(f"sweep configuration {name} appears twice; list each configuration once")
        seen.add(name)
        points[i] = dataclasses.replace(p, name=name)
    return points


def check_sweepable(run: RunConfig) -> None:
    """Refuse what the base run sets that one program cannot train for K configurations."""
    if run.lora.init_lora_weights == "pissa":
        raise ConfigError(
            "lora.init_lora_weights='pissa' cannot be swept in one program: each "
            "configuration would train against its own residual base; use the "
            "default init (or run the configurations one by one with lora-jax train)"
        )
