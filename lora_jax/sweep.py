"""Hyper-parameter sweeps: K LoRA configurations trained by ONE compiled program over one base.

    import lora_jax as lj
    from lora_jax.demo import demo_run_config
    res = lj.sweep(demo_run_config(), {"lora.r": [4, 16], "lora.lora_alpha": [8, 32]},
                   output_dir="runs/sweep")
    res.rows            # one dict per configuration (hyper-parameters, losses, exact match)
    lora, lcfg = res.adapter(0)   # configuration 0 alone, at its own rank

How it works. Each configuration's adapter is initialised exactly as its single run would be
(`init_lora` with its own LoraConfig and the run's seed), zero-padded to the largest rank of the
grid and stacked on a leading axis K, and so is its AdamW state. The train step of a single run
(`lora_jax.train.step.train_step`) is `jax.vmap`ped over that stacked state with the frozen base
and the batch shared (or, with `adapters_per_pass=N`, run N configurations at a time in a
`jax.lax.map` loop inside the same program: the default on a CPU): the base is held once, every
configuration sees the same batch, and there is one trace and one compile for all K. What
differs between configurations is data, never a Python constant of the program:

    scale (lora_alpha / r, or / sqrt(r) with rsLoRA)   the adapter tree's own `scale` leaves
    optim.lr, optim.weight_decay                        [K] arrays; the schedule and AdamW of a
                                                        single run (`make_schedule`, `make_tx`)
                                                        are built from them inside the vmap
    lora.lora_dropout                                   a [K] array (only when it varies)
    lora.r                                              zero padding to the largest rank

Padded rank entries stay exactly zero: their gradients are exactly zero (a padded column of A
meets a zero row of B and vice versa), so AdamW's moments, the update and weight decay are zero.

Only these keys can vary (`ALLOWED_KEYS`); anything else (target modules, DoRA, layers, the model,
the data, the schedule's shape, steps) changes the program's shapes or structure, so it is set
once for the whole sweep from the base RunConfig.

Sharding: with `mesh=`, the K axis of the stacked state is split over the mesh's "data" x "fsdp"
axes (K must divide by their product), the base is replicated over them (and split over "tensor"
as in training), and the batch is replicated: each device trains its share of the configurations.

Output directory (when `output_dir` is given):

    sweep.json              the base RunConfig, the grid, the configurations (written first)
    results.csv / .json     one row per configuration; results.json also holds per-step losses
    loss_curves.png         train loss per step, one line per configuration
    heatmap.png             the final metric over lora.r x lora.lora_alpha
    adapters/<name>/        each configuration as its own PEFT adapter, at its own rank
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import itertools
import json
import math
import os
import shutil
import time
import types
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lora_jax.config import RunConfig, _parse_value
from lora_jax.data import DataLoader
from lora_jax.errors import ConfigError
from lora_jax.evaluate import eval_loss as _eval_loss, exact_match
from lora_jax.hf.peft import save_peft
from lora_jax.lora.tree import combine, init_lora, split_trainable
from lora_jax.models.attention import check_attention
from lora_jax.models.llama import Llama
from lora_jax.session import fit_to_data, load_model, open_inputs
from lora_jax.sharding import DEFAULT_RULES, tree_shardings
from lora_jax.train.step import TrainState, eval_step as single_eval, make_schedule, make_tx, train_step

__all__ = ["sweep", "SweepResult", "SweepPoint", "ALLOWED_KEYS", "normalize_grid", "expand_grid",
           "parse_grid_arg", "parse_grid_args", "stack_trees", "unstack_tree", "make_sweep_step",
           "make_sweep_eval_step", "resolve_adapters_per_pass", "ranking_table", "plot_loss_curves",
           "plot_heatmap"]

ALLOWED_KEYS = ("lora.r", "lora.lora_alpha", "lora.use_rslora", "lora.lora_dropout", "optim.lr",
                "optim.weight_decay")
_SHORT = {"lora.r": "r", "lora.lora_alpha": "alpha", "lora.use_rslora": "rslora",
          "lora.lora_dropout": "dropout", "optim.lr": "lr", "optim.weight_decay": "wd"}
_SWEEP_MESH_AXES = ("data", "fsdp")


# ============================================================================================ grid
@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One configuration of the grid: its name, the values it sets, and its full RunConfig."""

    name: str
    values: dict
    run: RunConfig


def _allowed_msg() -> str:
    return ", ".join(ALLOWED_KEYS)


def _check_value(key: str, v) -> None:
    if key == "lora.use_rslora":
        if not isinstance(v, bool):
            raise ConfigError(f"grid {key}={v!r} must be true or false")
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"grid {key}={v!r} must be a number")


def normalize_grid(grid: Mapping[str, Any]) -> dict[str, list]:
    """Check a grid `{key: [values]}` (a scalar is one value; strings are parsed like `--set`).
    Raises ConfigError naming the key for an unknown key, an empty or repeated value list."""
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("the sweep grid is empty; give at least one key with values, e.g. "
                          "--grid lora.r=4,8,16 (allowed keys: " + _allowed_msg() + ")")
    out: dict[str, list] = {}
    for key, values in grid.items():
        if not isinstance(key, str) or key not in ALLOWED_KEYS:
            close = difflib.get_close_matches(str(key), ALLOWED_KEYS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"grid key {key!r} cannot be swept{hint}; allowed keys: {_allowed_msg()}. Settings "
                "that change shapes or targets (other than the rank) cannot share one compiled "
                "program: set them for the whole sweep with --set instead")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            values = [values]
        values = [_parse_value(v.strip()) if isinstance(v, str) else v for v in values]
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
    parts = [p.strip() for p in raw.split(",")]
    if not raw.strip() or any(not p for p in parts):
        raise ConfigError(f"--grid {text!r} has an empty value; separate values by commas, "
                          f"e.g. --grid {key}=4,8,16")
    grid = normalize_grid({key: parts})
    return key, grid[key]


def parse_grid_args(texts: Sequence[str]) -> dict[str, list]:
    """Repeated `--grid` options -> one grid (a key given twice is refused)."""
    grid: dict[str, list] = {}
    for text in texts:
        key, values = parse_grid_arg(text)
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid "
                              f"{key}=...")
        grid[key] = values
    return grid


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _normalize_points(points: Sequence[Mapping[str, Any]]) -> list[dict]:
    """An explicit list of configurations `[{key: value}, ...]` (no product)."""
    if not points:
        raise ConfigError("the sweep's list of configurations is empty; give at least one")
    out = []
    for i, point in enumerate(points):
        if not isinstance(point, Mapping) or not point:
            raise ConfigError(f"sweep configuration #{i} is {point!r}; each one maps grid keys to one "
                              "value, e.g. {'lora.r': 8, 'optim.lr': 1e-4}")
        one = {}
        for key, value in point.items():
            if isinstance(value, (list, tuple)):
                raise ConfigError(f"sweep configuration #{i}: {key}={value!r} must be one value (a "
                                  "list of configurations is not a product grid)")
            one.update({k: v[0] for k, v in normalize_grid({key: [value]}).items()})
        out.append(one)
    return out


def _combos(grid) -> list[dict]:
    if isinstance(grid, Mapping):
        grid = normalize_grid(grid)
        keys = list(grid)
        return [dict(zip(keys, c)) for c in itertools.product(*(grid[k] for k in keys))]
    if isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)):
        return _normalize_points(grid)
    raise ConfigError(f"the sweep grid must be a mapping {{key: [values]}} (a product) or a list of "
                      f"configurations [{{key: value}}, ...], not {type(grid).__name__}")


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
        name = "_".join(f"{_SHORT[k]}{_fmt(value(p, k))}" for k in varied)
        if name in seen:
            raise ConfigError(f"sweep configuration {name} appears twice; list each configuration once")
        seen.add(name)
        points[i] = dataclasses.replace(p, name=name)
    return points


def _check_sweepable(run: RunConfig) -> None:
    if run.lora.init_lora_weights == "pissa":
        raise ConfigError("lora.init_lora_weights='pissa' cannot be swept in one program: each "
                          "configuration would train against its own residual base; use the "
                          "default init (or run the configurations one by one with lora-jax train)")


# ==================================================================================== stack/unstack
def _shapes(trees) -> list[list[tuple]]:
    return [[tuple(x.shape) for x in jax.tree.leaves(t)] for t in trees]


def stack_trees(trees: Sequence[Any]):
    """Stack trees of equal structure on a new leading axis, zero-padding every leaf to the
    largest shape along each axis (only rank axes differ between LoRA configurations).
    Returns (stacked, shapes): shapes[k] lists tree k's leaf shapes, for `unstack_tree`."""
    return _stack_host(trees), _shapes(trees)


def unstack_tree(stacked, k: int, shapes: Sequence[Sequence[tuple]]):
    """Configuration k of a stacked tree, each leaf sliced back to its own (unpadded) shape."""
    leaves, treedef = jax.tree.flatten(stacked)
    own = shapes[k]
    return treedef.unflatten([x[k][tuple(slice(0, d) for d in s)] for x, s in zip(leaves, own)])


def init_stacked(params, lcfgs: Sequence, seed: int):
    """The K adapters, each made by `init_lora(params, lcfg_k, key(seed))` and `split_trainable`
    exactly as its single run makes it, zero-padded and stacked on a leading axis (on the host,
    so no padding/stacking op is compiled per shape). Configurations that differ only in dropout
    share one initialisation (dropout does not enter it).

    Returns (trainable, frozen_lora, shapes, base): base is the frozen part of `params` (shared by
    all K, not copied); shapes = {"trainable": ..., "frozen_lora": ...} for `unstack_tree`.
    """
    made: dict = {}
    trainables, frozen_loras = [], []
    for lc in lcfgs:
        key = lc.replace(lora_dropout=0.0)
        if key not in made:
            split = split_trainable(params, init_lora(params, lc, jax.random.key(seed)), lc)
            made[key] = jax.device_get((split.trainable, split.frozen["lora"]))
        trainables.append(made[key][0])
        frozen_loras.append(made[key][1])
    shapes = {"trainable": _shapes(trainables), "frozen_lora": _shapes(frozen_loras)}
    trainable = _stack_host(trainables)
    frozen_lora = _stack_host(frozen_loras)
    base = split_trainable(params, {}, lcfgs[0]).frozen["params"]
    return trainable, frozen_lora, shapes, base


def _stack_host(trees):
    """`stack_trees` on numpy arrays (host), then one transfer per leaf."""
    flat = [jax.tree.flatten(t) for t in trees]
    treedef = flat[0][1]
    if any(td != treedef for _, td in flat[1:]):
        raise ConfigError("the configurations' adapter trees differ in structure (targets); a "
                          "sweep can only vary " + _allowed_msg())
    out = []
    for i in range(len(flat[0][0])):
        leaves = [np.asarray(f[0][i]) for f in flat]
        target = tuple(max(d) for d in zip(*(x.shape for x in leaves)))
        out.append(jnp.asarray(np.stack([
            np.pad(x, [(0, t - d) for d, t in zip(x.shape, target)]) if x.ndim else x
            for x in leaves])))
    return treedef.unflatten(out)


# ============================================================================= the vmapped program
def _optim_with(ocfg, lr, weight_decay):
    """An OptimConfig look-alike whose lr / weight_decay are (traced) arrays, for `make_schedule`
    and `make_tx`, which only do arithmetic with them."""
    fields = {f.name: getattr(ocfg, f.name) for f in dataclasses.fields(ocfg)}
    fields.update(lr=lr, weight_decay=weight_decay)
    return types.SimpleNamespace(**fields)


def resolve_adapters_per_pass(value, mesh=None) -> int | None:
    """How many configurations one pass of the step trains: None = all K at once (`jax.vmap`:
    K-times larger matmuls, what a GPU or TPU wants, and what a mesh splitting K needs); an int =
    that many at a time in a loop inside the one program. "auto" picks 1 on a CPU without a
    mesh, where the step is already compute-bound and K-fold activations only miss the caches
    (demo model, 2 cores: one K=8 step 0.42 s looped vs 0.65 s vmapped; 0.56 s for the 8 single
    runs' steps, `experiments/sweeps/measure_speedup.py --per-step`, 2026-11-24)."""
    if value == "auto":
        return 1 if mesh is None and jax.default_backend() == "cpu" else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"adapters_per_pass={value!r}; use a positive integer, None (all at once) "
                          "or 'auto'")
    return value


def _over_adapters(fn, stacked, adapters_per_pass: int | None):
    """`fn` over the leading K axis of `stacked`: all K at once (`jax.vmap`), or
    `adapters_per_pass` at a time in a loop inside the program (`jax.lax.map`), which keeps the
    working set of one pass small where the hardware is already busy (a CPU)."""
    k = jax.tree.leaves(stacked)[0].shape[0]
    if adapters_per_pass is None or adapters_per_pass >= k:
        return jax.vmap(fn)(*stacked)
    return jax.lax.map(lambda xs: fn(*xs), stacked, batch_size=adapters_per_pass)


class _Counted:
    """A jitted function plus how many times JAX traced it (one trace = one compile here)."""

    def __init__(self, fn, traces: list):
        self.fn, self._traces = fn, traces

    def __call__(self, *args):
        return self.fn(*args)

    @property
    def traces(self) -> int:
        return self._traces[0]


def make_sweep_step(model, cfg, lcfg, ocfg, total_steps: int, *, grad_accum: int = 1,
                    chunk_tokens: int = 8192, use_segments: bool = True,
                    traced_dropout: bool = False, adapters_per_pass: int | None = None,
                    jit_kwargs: dict | None = None) -> _Counted:
    """`step(state, frozen_params, frozen_lora, hyper, batch) -> (state, metrics)`, jitted.

    state: a `TrainState` whose every leaf has a leading K axis (adapters, AdamW moments, step,
    rng); frozen_lora: the stacked frozen adapter leaves (`scale`); hyper: {"lr", "weight_decay",
    "lora_dropout"} [K] arrays; frozen_params, batch: shared by all K. metrics: [K] arrays.
    Per adapter this is a single run's `lora_jax.train.step.train_step`, with `make_schedule` and
    `make_tx` built from the adapter's own (traced) lr and weight decay.
    """
    traces = [0]

    def one(state, frozen_lora, hyper, frozen_params, batch):
        ocfg_k = _optim_with(ocfg, hyper["lr"], hyper["weight_decay"])
        schedule = make_schedule(ocfg_k, total_steps)
        return train_step(state, {"params": frozen_params, "lora": frozen_lora}, batch, model=model,
                          cfg=cfg, lcfg=lcfg, tx=make_tx(lcfg, ocfg_k, schedule), schedule=schedule,
                          grad_accum=grad_accum, chunk_tokens=chunk_tokens, use_segments=use_segments,
                          dropout_rate=hyper["lora_dropout"] if traced_dropout else None)

    def step(state, frozen_params, frozen_lora, hyper, batch):
        traces[0] += 1
        return _over_adapters(lambda s, fl, h: one(s, fl, h, frozen_params, batch),
                              (state, frozen_lora, hyper), adapters_per_pass)

    return _Counted(jax.jit(step, donate_argnums=(0,), **(jit_kwargs or {})), traces)


def make_sweep_eval_step(model, cfg, lcfg, *, chunk_tokens: int = 8192, use_segments: bool = True,
                         adapters_per_pass: int | None = None,
                         jit_kwargs: dict | None = None) -> _Counted:
    """`eval(trainable, frozen_params, frozen_lora, batch) -> (loss sums [K], token counts [K])`."""
    traces = [0]

    def one(trainable, frozen_lora, frozen_params, batch):
        return single_eval(trainable, {"params": frozen_params, "lora": frozen_lora}, batch,
                           model=model, cfg=cfg, lcfg=lcfg, chunk_tokens=chunk_tokens,
                           use_segments=use_segments)

    def eval_step(trainable, frozen_params, frozen_lora, batch):
        traces[0] += 1
        return _over_adapters(lambda tr, fl: one(tr, fl, frozen_params, batch),
                              (trainable, frozen_lora), adapters_per_pass)

    return _Counted(jax.jit(eval_step, **(jit_kwargs or {})), traces)


# ========================================================================================= results
@dataclasses.dataclass
class SweepResult:
    """What `sweep` returns. rows: one dict per configuration (the table of results.csv);
    train_loss: [steps, K] per-step train losses; compiles: traces of the train / eval programs."""

    points: list[SweepPoint]
    rows: list[dict]
    train_loss: np.ndarray
    metric: str
    compiles: dict
    timing: dict
    output_dir: str | None
    state: Any = dataclasses.field(repr=False, default=None)  # stacked TrainState
    frozen_lora: Any = dataclasses.field(repr=False, default=None)  # stacked scales
    base_params: Any = dataclasses.field(repr=False, default=None)  # the frozen base, once
    model_config: Any = dataclasses.field(repr=False, default=None)
    shapes: Any = dataclasses.field(repr=False, default=None)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def adapter(self, k: int):
        """(lora, lcfg) of configuration k alone: the adapter tree at its own rank (no padding),
        the same layout a single `lora-jax train` run of that configuration produces."""
        host_trainable, host_frozen = self._host_adapters
        trainable = unstack_tree(host_trainable, k, self.shapes["trainable"])
        frozen_lora = unstack_tree(host_frozen, k, self.shapes["frozen_lora"])
        _, lora = combine(trainable, {"params": {}, "lora": frozen_lora})
        return jax.tree.map(jnp.asarray, lora), self.points[k].run.lora

    def params(self, k: int):
        """The base parameters of configuration k (its own copy of `modules_to_save`, if any)."""
        trainable = unstack_tree(self._host_adapters[0], k, self.shapes["trainable"])
        params, _ = combine({"params": jax.tree.map(jnp.asarray, trainable["params"])},
                            {"params": self.base_params})
        return params

    @functools.cached_property
    def _host_adapters(self):
        """(trainable, frozen_lora), stacked, fetched to the host once: a configuration is then a
        numpy slice (slicing on the device, eagerly, compiled one small program per leaf shape:
        ~1 s of a CPU sweep)."""
        return jax.device_get((self.state.trainable, self.frozen_lora))

    def ranked(self) -> list[dict]:
        return _rank(self.rows, self.metric)


def _metric_of(rows: list[dict]) -> str:
    """What ranks the configurations and fills the heatmap: exact match where it tells them apart
    (a short sweep often leaves every configuration at 0), else eval loss, else final train loss."""
    matches = {r["exact_match"] for r in rows if r.get("exact_match") is not None}
    if len(matches) > 1:
        return "exact_match"
    if any(r.get("eval_loss") is not None for r in rows):
        return "eval_loss"
    return "exact_match" if matches else "train_loss_final"


def _higher_is_better(metric: str) -> bool:
    return metric == "exact_match"


def _rank(rows: list[dict], metric: str) -> list[dict]:
    def key(r):
        v = r.get(metric)
        bad = v is None or (isinstance(v, float) and not math.isfinite(v)) or r.get("diverged")
        tie = r.get("eval_loss")
        tie = tie if tie is not None and math.isfinite(tie) else math.inf
        return (bad, -v if (not bad and _higher_is_better(metric)) else (v if not bad else 0), tie)

    return sorted(rows, key=key)


def ranking_table(rows: list[dict], metric: str, title: str = "lora-jax sweep: ranking"):
    """A rich Table of the configurations, best first."""
    from rich.table import Table

    varied = [k for k in ALLOWED_KEYS if len({r[k] for r in rows}) > 1]
    table = Table(title=f"{title}, best first (by {metric}, "
                        f"{'higher' if _higher_is_better(metric) else 'lower'} is better)")
    table.add_column("#", justify="right")
    table.add_column("configuration", overflow="fold")
    for k in varied:
        table.add_column(_SHORT[k], justify="right")
    results = (("train_loss_final", "train loss"), ("eval_loss", "eval loss"),
               ("exact_match", "exact match"))
    for _, header in results:
        table.add_column(header, justify="right")

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float):
            return f"{v:.4g}" if (abs(v) < 1e-2 and v != 0) else f"{v:.4f}"
        return str(v)

    for i, r in enumerate(_rank(rows, metric), 1):
        name = r["name"] + (" (diverged)" if r.get("diverged") else "")
        table.add_row(str(i), name, *(cell(r[k]) for k in varied),
                      *(cell(r.get(k)) for k, _ in results))
    return table


# =========================================================================================== plots
def plot_loss_curves(names: Sequence[str], train_loss: np.ndarray, path: str,
                     title: str = "train loss per configuration") -> str:
    """One line per configuration: the per-step train loss (faint) and its moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, train_loss.shape[0] + 1)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    window = max(1, min(10, train_loss.shape[0] // 10))
    for k, name in enumerate(names):
        y = train_loss[:, k]
        color = cmap(k % cmap.N)
        if window > 1:
            ax.plot(steps, y, color=color, alpha=0.25, linewidth=0.8)
            csum = np.cumsum(np.insert(y, 0, 0.0))  # trailing mean, shorter windows at the start
            lo = np.maximum(np.arange(1, len(y) + 1) - window, 0)
            smooth = (csum[1:] - csum[lo]) / (np.arange(1, len(y) + 1) - lo)
            ax.plot(steps, smooth, color=color, linewidth=1.8, label=name)
        else:
            ax.plot(steps, y, color=color, linewidth=1.8, label=name)
    finite = train_loss[np.isfinite(train_loss)]
    if finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title(title + (f"\n(faint: per step; bold: trailing {window}-step mean)" if window > 1 else ""),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(names) > 8 else 1, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_heatmap(rows: list[dict], metric: str, path: str, max_facets: int = 6) -> tuple[str, str]:
    """The final `metric` over lora.r (rows) x lora.lora_alpha (columns). When other keys vary too,
    one panel per combination of them (up to `max_facets`), else the mean over them. Returns
    (path, a sentence saying which)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted({r["lora.r"] for r in rows})
    alphas = sorted({r["lora.lora_alpha"] for r in rows})
    others = [k for k in ALLOWED_KEYS if k not in ("lora.r", "lora.lora_alpha")
              and len({r[k] for r in rows}) > 1]
    combos = sorted({tuple(r[k] for k in others) for r in rows}, key=lambda c: tuple(map(float, c)))
    if len(combos) <= max_facets:
        facets = [(c, [r for r in rows if tuple(r[k] for k in others) == c]) for c in combos]
        how = ("one panel per value of " + ", ".join(others)) if others else "one configuration per cell"
    else:
        facets = [(None, rows)]
        how = "mean over " + ", ".join(f"{k} in {sorted({r[k] for r in rows})}" for k in others)
    higher = _higher_is_better(metric)
    grids = []
    for _, subset in facets:
        grid = np.full((len(rs), len(alphas)), np.nan)
        for i, rv in enumerate(rs):
            for j, av in enumerate(alphas):
                vals = [r[metric] for r in subset if r["lora.r"] == rv and r["lora.lora_alpha"] == av
                        and r.get(metric) is not None and math.isfinite(r[metric])]
                if vals:
                    grid[i, j] = float(np.mean(vals))
        grids.append(grid)
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if metric == "exact_match":
        vmin, vmax = 0.0, 1.0
    n = len(facets)
    fig, axes = plt.subplots(1, n, figsize=(2.2 + (1.0 * len(alphas) + 0.9) * n, 1.9 + 0.7 * len(rs)),
                             dpi=110, squeeze=False, layout="constrained", sharey=True)
    im = None
    for i_ax, (ax, (combo, _), grid) in enumerate(zip(axes[0], facets, grids)):
        im = ax.imshow(grid, cmap="viridis" if higher else "viridis_r", vmin=vmin, vmax=vmax,
                       aspect="auto", origin="lower")
        ax.set_xticks(range(len(alphas)), [_fmt(a) for a in alphas])
        ax.set_yticks(range(len(rs)), [str(r) for r in rs])
        ax.set_xlabel("lora_alpha")
        if i_ax == 0:
            ax.set_ylabel("r")
        if combo is not None and others:
            ax.set_title(", ".join(f"{_SHORT[k]}={_fmt(v)}" for k, v in zip(others, combo)),
                         fontsize=9)
        for i in range(len(rs)):
            for j in range(len(alphas)):
                v = grid[i, j]
                text = "n/a" if np.isnan(v) else (f"{v:.2f}" if abs(v) < 100 else f"{v:.3g}")
                shade = 0.5 if np.isnan(v) else (v - vmin) / ((vmax - vmin) or 1.0)
                light = shade < 0.5 if higher else shade > 0.5
                ax.text(j, i, text, ha="center", va="center", fontsize=9,
                        color="white" if light else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label=metric)
    import textwrap

    fig.suptitle(f"final {metric} ({'higher' if higher else 'lower'} is better)\n"
                 + textwrap.fill(how, 30 + 35 * n), fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return path, how


# ===================================================================================== output files
def _prepare_sweep_dir(out: str, overwrite: bool) -> None:
    """Refuse a non-empty directory unless --overwrite and it holds a sweep. Writes nothing."""
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ConfigError(f"output directory {out} is not empty; pass --overwrite to replace the "
                              "sweep there, or choose another --output-dir")
        if not os.path.isfile(os.path.join(out, "sweep.json")):
            raise ConfigError(f"--overwrite: {out} is not a lora-jax sweep directory (no sweep.json); "
                              "refusing to delete it. Choose another --output-dir")
    elif os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output directory {out} is a file; choose another --output-dir")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _write_outputs(out: str, result: SweepResult, grid: dict, run: RunConfig, plots: bool = True) -> dict:
    columns = ["name", *ALLOWED_KEYS, "scale", "steps", "train_loss_first", "train_loss_final",
               "train_loss_last10", "eval_loss_before", "eval_loss", "exact_match", "diverged",
               "adapter_dir"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in result.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    heat = curves = how = None
    if plots:
        heat, how = plot_heatmap(result.rows, result.metric, os.path.join(out, "heatmap.png"))
        curves = plot_loss_curves(result.names, result.train_loss,
                                  os.path.join(out, "loss_curves.png"),
                                  title=f"train loss, {len(result.names)} configurations in one program")
    record = {
        "metric": result.metric,
        "heatmap": how,
        "grid": grid,
        "base_run": run.to_dict(),
        "rows": [{k: _clean(v) for k, v in r.items()} for r in result.rows],
        "train_loss": {n: [_clean(float(x)) for x in result.train_loss[:, k]]
                       for k, n in enumerate(result.names)},
        "compiles": result.compiles,
        "timing": result.timing,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(record, f, indent=2, default=_json_default)
    return {"results_csv": os.path.join(out, "results.csv"),
            "results_json": os.path.join(out, "results.json"), "heatmap": heat, "loss_curves": curves}


# ========================================================================================== sweep
def _sweep_shardings(mesh, k: int):
    """(state sharding fn, base rules, replicated) for a sweep over `mesh`: the K axis over the
    mesh's data x fsdp axes, everything else as training places it minus data/fsdp."""
    axes = tuple(a for a in _SWEEP_MESH_AXES if mesh.shape.get(a, 1) > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if k % size:
        raise ConfigError(f"the sweep has {k} configurations, which do not divide over the mesh's "
                          f"{' x '.join(axes)} = {size} devices; use a grid of a multiple of {size} "
                          "configurations or a mesh whose data x fsdp size divides it")
    lead = (axes if len(axes) > 1 else axes[0]) if axes else None

    def stacked(x):
        return NamedSharding(mesh, P(lead, *([None] * (x.ndim - 1))))

    rules = dict(DEFAULT_RULES, embed=None, batch=None)
    return stacked, rules, NamedSharding(mesh, P())


def sweep(run: RunConfig, grid, *, output_dir: str | None = None,
          progress: bool = True, overwrite: bool = False, mesh=None, export: bool = True,
          plots: bool = True, adapters_per_pass: int | str | None = "auto") -> SweepResult:
    """Train every configuration of `grid` on top of `run` in one compiled program; evaluate,
    export and plot each (see the module docstring). Returns a `SweepResult`.

    grid: `{key: [values]}`, the Cartesian product over keys of `ALLOWED_KEYS`, e.g.
        {"lora.r": [4, 16], "lora.lora_alpha": [8, 32]}; or an explicit list of configurations
        [{"lora.r": 4, "optim.lr": 1e-3}, {"lora.r": 16, "lora.lora_alpha": 32}].

    output_dir: where to write results, plots and adapters (None: write nothing, return only).
    mesh: a `jax.sharding.Mesh` to split the K configurations over (its data x fsdp axes).
    adapters_per_pass: configurations per pass of the one compiled step (`resolve_adapters_per_pass`;
        "auto": all at once on a GPU / TPU or with a mesh, one at a time on a CPU).
    """
    t_start = time.perf_counter()
    grid = normalize_grid(grid) if isinstance(grid, Mapping) else _normalize_points(grid)
    _check_sweepable(run)
    per_pass = resolve_adapters_per_pass(adapters_per_pass, mesh)
    points = expand_grid(run, grid)
    K = len(points)
    out = os.path.abspath(output_dir) if output_dir is not None else None
    if out is not None:
        _prepare_sweep_dir(out, overwrite)

    # ---- everything that validates input, before anything is written (as `train()` does)
    check_attention(run.model.attention)
    inputs = open_inputs(run)  # the model directory, its tokenizer, the data
    tcfg, dcfg = run.train, inputs.data
    model_path, tokenizer, datasets = inputs.model_path, inputs.tokenizer, inputs.datasets
    loader = DataLoader(datasets.train_rows, tcfg.batch_size, dcfg.seed)
    cfg, params = load_model(run.model, model_path)
    cfg = fit_to_data(cfg, inputs)
    shardings = _sweep_shardings(mesh, K) if mesh is not None else None

    # ---- K adapters, each initialised as its single run would be, padded and stacked
    trainable, frozen_lora, shapes, base = init_stacked(params, [p.run.lora for p in points],
                                                        tcfg.seed)
    del params
    hyper = {"lr": jnp.asarray([p.run.optim.lr for p in points], jnp.float32),
             "weight_decay": jnp.asarray([p.run.optim.weight_decay for p in points], jnp.float32),
             "lora_dropout": jnp.asarray([p.run.lora.lora_dropout for p in points], jnp.float32)}
    dropouts = {p.run.lora.lora_dropout for p in points}
    traced_dropout = len(dropouts) > 1
    # The program's static LoraConfig: what every point shares (targets, DoRA, LoRA+, modules to
    # save, and the dropout rate when it does not vary); r / alpha live in the arrays.
    lcfg_static = points[0].run.lora
    # the optimizer state's structure; its values and the lr / wd arrays come per adapter
    tx0 = make_tx(lcfg_static, run.optim, make_schedule(run.optim, tcfg.steps))
    opt_state = jax.jit(jax.vmap(tx0.init))(trainable)  # one compile, not one per eager op
    key = jax.random.key_data(jax.random.key(tcfg.seed))  # every adapter: the single run's rng
    state = TrainState(jnp.zeros((K,), jnp.int32), trainable, opt_state,
                       jnp.array(jnp.broadcast_to(key, (K,) + key.shape)))

    jit_kwargs = eval_kwargs = None
    replicated = None
    if shardings is not None:
        stacked, rules, replicated = shardings
        state_sh = jax.tree.map(stacked, state)
        fl_sh = jax.tree.map(stacked, frozen_lora)
        hyper_sh = jax.tree.map(stacked, hyper)
        base_sh = tree_shardings(base, mesh, rules)
        state = jax.device_put(state, state_sh)
        frozen_lora = jax.device_put(frozen_lora, fl_sh)
        hyper = jax.device_put(hyper, hyper_sh)
        base = jax.device_put(base, base_sh)
        metric_sh = stacked(jnp.zeros((K,)))
        jit_kwargs = {"in_shardings": (state_sh, base_sh, fl_sh, hyper_sh, replicated),
                      "out_shardings": (state_sh, metric_sh)}
        eval_kwargs = {"in_shardings": (state_sh.trainable, base_sh, fl_sh, replicated),
                       "out_shardings": (metric_sh, metric_sh)}

    model = Llama(cfg)
    step_fn = make_sweep_step(model, cfg, lcfg_static, run.optim, tcfg.steps,
                              grad_accum=tcfg.grad_accum, chunk_tokens=run.model.loss_chunk_tokens,
                              use_segments=dcfg.packing, traced_dropout=traced_dropout,
                              adapters_per_pass=per_pass, jit_kwargs=jit_kwargs)
    eval_fn = make_sweep_eval_step(model, cfg, lcfg_static, chunk_tokens=run.model.loss_chunk_tokens,
                                   use_segments=dcfg.packing, adapters_per_pass=per_pass,
                                   jit_kwargs=eval_kwargs)

    def put(batch):
        return batch if replicated is None else jax.device_put(batch, replicated)

    def eval_loss(tr) -> np.ndarray | None:
        """Per-configuration eval loss over the first `train.eval_batches` held-out batches, as
        `train()` computes it (token-weighted); None without held-out rows."""
        if not datasets.eval_rows or not tcfg.eval_batches:
            return None
        return _eval_loss(lambda batch: eval_fn(tr, base, frozen_lora, put(batch)), datasets.eval_rows,
                          tcfg.batch_size, tcfg.eval_batches, shape=(K,))

    if out is not None:
        if os.path.isdir(out) and overwrite:
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump({"grid": grid, "base_run": run.to_dict(), "model_path": model_path,
                       "configurations": [{"name": p.name, **p.values} for p in points]}, f, indent=2)
    setup_s = time.perf_counter() - t_start

    t0 = time.perf_counter()
    loss_before = eval_loss(state.trainable)
    eval_s = time.perf_counter() - t0

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.steps, desc=f"sweep x{K}", unit="step", dynamic_ncols=True)
    losses = np.full((tcfg.steps, K), np.nan)
    compile_s = None
    t_train = time.perf_counter()
    pending = None
    try:
        for step in range(tcfg.steps):
            batch = put(next(loader))
            t0 = time.perf_counter()
            state, metrics = step_fn(state, base, frozen_lora, hyper, batch)
            if step == 0:
                jax.block_until_ready(state.step)
                compile_s = time.perf_counter() - t0
            if pending is not None:  # read one step late so the device never waits on the host
                losses[pending[0]] = np.asarray(pending[1]["loss"])
                if bar is not None:
                    row = losses[pending[0]]
                    ok = row[np.isfinite(row)]
                    bar.set_postfix(best=f"{ok.min():.4f}" if ok.size else "nan",
                                    worst=f"{ok.max():.4f}" if ok.size else "nan")
                    bar.update(1)
            pending = (step, metrics)
        if pending is not None:
            losses[pending[0]] = np.asarray(pending[1]["loss"])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    jax.block_until_ready(state.trainable)
    train_s = time.perf_counter() - t_train

    # ---- evaluation: eval loss vmapped (one program); exact match per adapter with the padded
    # slice, so every adapter runs the same compiled decoder (padding adds exact zeros)
    t0 = time.perf_counter()
    result = SweepResult(points=points, rows=[], train_loss=losses, metric="", compiles={},
                         timing={}, output_dir=out, state=state, frozen_lora=frozen_lora,
                         base_params=base, model_config=cfg,
                         shapes=shapes)
    loss_after = eval_loss(state.trainable)
    diverged = [not bool(np.all(np.isfinite(losses[:, k]))) for k in range(K)]
    matches: list[float | None] = [None] * K
    if tcfg.eval_generate and datasets.eval_records:
        host_tr, host_fl = result._host_adapters  # one transfer, also used by the export below
        for k in range(K):
            if diverged[k]:
                continue
            tr_k = jax.tree.map(lambda x: jnp.asarray(x[k]), host_tr)
            fl_k = jax.tree.map(lambda x: jnp.asarray(x[k]), host_fl)
            p_k, lo_k = combine(tr_k, {"params": base, "lora": fl_k})
            matches[k] = exact_match(datasets.eval_records, cfg, p_k, lo_k, lcfg_static, tokenizer,
                                     tcfg.max_new_tokens, tcfg.eval_generate)
    eval_s += time.perf_counter() - t0

    rows = []
    for k, p in enumerate(points):
        lc, oc = p.run.lora, p.run.optim
        lk = losses[:, k]
        rows.append({
            "name": p.name,
            "lora.r": lc.r, "lora.lora_alpha": lc.lora_alpha, "lora.use_rslora": lc.use_rslora,
            "lora.lora_dropout": lc.lora_dropout, "optim.lr": oc.lr,
            "optim.weight_decay": oc.weight_decay,
            "scale": lc.lora_alpha / (math.sqrt(lc.r) if lc.use_rslora else lc.r),
            "steps": tcfg.steps,
            "train_loss_first": float(lk[0]) if len(lk) else None,
            "train_loss_final": float(lk[-1]) if len(lk) else None,
            "train_loss_last10": float(np.mean(lk[-10:])) if len(lk) else None,
            "eval_loss_before": None if loss_before is None else float(loss_before[k]),
            "eval_loss": None if loss_after is None else float(loss_after[k]),
            "exact_match": matches[k],
            "diverged": diverged[k],
            "adapter_dir": None,
        })
    result.rows = rows
    result.metric = _metric_of(rows)
    result.compiles = {"train_step": step_fn.traces, "eval_step": eval_fn.traces}

    t0 = time.perf_counter()
    if out is not None and export:
        for k, p in enumerate(points):
            if diverged[k]:
                continue
            lora_k, lcfg_k = result.adapter(k)
            d = os.path.join(out, "adapters", p.name)
            save_peft(d, lora_k, lcfg_k, cfg, base_model_name_or_path=model_path,
                      params=result.params(k) if lcfg_k.modules_to_save else None)
            rows[k]["adapter_dir"] = d
    export_s = time.perf_counter() - t0
    result.timing = {"setup_s": setup_s, "compile_s": compile_s, "train_s": train_s,
                     "eval_s": eval_s, "export_s": export_s,
                     "total_s": time.perf_counter() - t_start}
    if out is not None:
        t0 = time.perf_counter()
        _write_outputs(out, result, grid, run, plots=plots)
        result.timing["outputs_s"] = time.perf_counter() - t0  # csv/json + plots
        result.timing["total_s"] = time.perf_counter() - t_start
        with open(os.path.join(out, "results.json")) as f:
            record = json.load(f)
        record["timing"] = result.timing
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(record, f, indent=2, default=_json_default)
    return result
