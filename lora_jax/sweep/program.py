"""The one compiled program of a sweep: a single run's train / eval step over K stacked adapters
(`jax.vmap`, or N per pass in a `jax.lax.map` loop), its placement on a mesh, and the loop that
drives it. What differs between configurations enters as arrays, never as Python constants, so
all K share one trace and one compile.
"""

from __future__ import annotations

import dataclasses
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.errors import ConfigError
from lora_jax.evaluate import eval_loss
from lora_jax.models.registry import build_model
from lora_jax.sharding import DEFAULT_RULES, tree_shardings
from lora_jax.sweep.stacking import init_stacked
from lora_jax.train.step import TrainState, make_schedule, make_tx, train_step
from lora_jax.train.step import eval_step as single_eval

__all__ = [
    "resolve_adapters_per_pass",
    "make_sweep_step",
    "make_sweep_eval_step",
    "Program",
    "build_program",
    "train_loop",
    "eval_losses",
]

_SWEEP_MESH_AXES = ("data", "fsdp")


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
    (figures in docs/performance.md)."""
    if value == "auto":
        return 1 if mesh is None and jax.default_backend() == "cpu" else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"adapters_per_pass={value!r}; use a positive integer, None (all at once) or 'auto'")
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


def make_sweep_step(
    model,
    cfg,
    lcfg,
    ocfg,
    total_steps: int,
    *,
    grad_accum: int = 1,
    chunk_tokens: int = 8192,
    use_segments: bool = True,
    traced_dropout: bool = False,
    adapters_per_pass: int | None = None,
    jit_kwargs: dict | None = None,
) -> _Counted:
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
        return train_step(
            state,
            {"params": frozen_params, "lora": frozen_lora},
            batch,
            model=model,
            cfg=cfg,
            lcfg=lcfg,
            tx=make_tx(lcfg, ocfg_k, schedule),
            schedule=schedule,
            grad_accum=grad_accum,
            chunk_tokens=chunk_tokens,
            use_segments=use_segments,
            dropout_rate=hyper["lora_dropout"] if traced_dropout else None,
        )

    def step(state, frozen_params, frozen_lora, hyper, batch):
        traces[0] += 1
        return _over_adapters(
            lambda s, fl, h: one(s, fl, h, frozen_params, batch), (state, frozen_lora, hyper), adapters_per_pass
        )

    return _Counted(jax.jit(step, donate_argnums=(0,), **(jit_kwargs or {})), traces)


def make_sweep_eval_step(
    model,
    cfg,
    lcfg,
    *,
    chunk_tokens: int = 8192,
    use_segments: bool = True,
    adapters_per_pass: int | None = None,
    jit_kwargs: dict | None = None,
) -> _Counted:
    """`eval(trainable, frozen_params, frozen_lora, batch) -> (loss sums [K], token counts [K])`."""
    traces = [0]

    def one(trainable, frozen_lora, frozen_params, batch):
        return single_eval(
            trainable,
            {"params": frozen_params, "lora": frozen_lora},
            batch,
            model=model,
            cfg=cfg,
            lcfg=lcfg,
            chunk_tokens=chunk_tokens,
            use_segments=use_segments,
        )

    def eval_step(trainable, frozen_params, frozen_lora, batch):
        traces[0] += 1
        return _over_adapters(
            lambda tr, fl: one(tr, fl, frozen_params, batch), (trainable, frozen_lora), adapters_per_pass
        )

    return _Counted(jax.jit(eval_step, **(jit_kwargs or {})), traces)


def _sweep_shardings(mesh, k: int):
    """(state sharding fn, base rules, replicated) for a sweep over `mesh`: the K axis over the
    mesh's data x fsdp axes, everything else as training places it minus data/fsdp."""
    axes = tuple(a for a in _SWEEP_MESH_AXES if mesh.shape.get(a, 1) > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if k % size:
        raise ConfigError(
            f"the sweep has {k} configurations, which do not divide over the mesh's "
            f"{' x '.join(axes)} = {size} devices; use a grid of a multiple of {size} "
            "configurations or a mesh whose data x fsdp size divides it"
        )
    lead = (axes if len(axes) > 1 else axes[0]) if axes else None

    def stacked(x):
        return NamedSharding(mesh, P(lead, *([None] * (x.ndim - 1))))

    rules = dict(DEFAULT_RULES, embed=None, batch=None)
    return stacked, rules, NamedSharding(mesh, P())


class Program(NamedTuple):
    """A sweep ready to run: the stacked state and what it shares, placed, and its two programs."""

    state: TrainState  # every leaf [K, ...]; the first step consumes it (donated)
    base: Any  # the frozen base, once
    frozen_lora: Any  # stacked frozen adapter leaves (scales)
    hyper: dict  # {"lr", "weight_decay", "lora_dropout"}: [K] arrays
    shapes: dict  # each configuration's own leaf shapes, for `unstack_tree`
    lcfg: Any  # the static LoraConfig every configuration shares (targets, DoRA, ...)
    step: _Counted
    eval: _Counted
    put: Callable  # a batch placed as the programs take it
    k: int


def build_program(
    run, points, cfg, params, *, mesh=None, adapters_per_pass: int | None = None, use_segments: bool = True
) -> Program:
    """The K configurations of `points` initialised as their single runs would be, padded and
    stacked (with their AdamW states), placed on `mesh` when given, and the jitted step / eval
    programs over them (not yet compiled). ConfigError when K does not divide over the mesh."""
    k, tcfg = len(points), run.train
    shardings = _sweep_shardings(mesh, k) if mesh is not None else None
    trainable, frozen_lora, shapes, base = init_stacked(params, [p.run.lora for p in points], tcfg.seed)
    hyper = {
        "lr": jnp.asarray([p.run.optim.lr for p in points], jnp.float32),
        "weight_decay": jnp.asarray([p.run.optim.weight_decay for p in points], jnp.float32),
        "lora_dropout": jnp.asarray([p.run.lora.lora_dropout for p in points], jnp.float32),
    }
    traced_dropout = len({p.run.lora.lora_dropout for p in points}) > 1
    # What every point shares (targets, DoRA, LoRA+, modules to save, and the dropout rate when it
    # does not vary) is static; r / alpha live in the arrays.
    lcfg = points[0].run.lora
    # the optimizer state's structure; its values and the lr / wd arrays come per adapter
    tx0 = make_tx(lcfg, run.optim, make_schedule(run.optim, tcfg.steps))
    opt_state = jax.jit(jax.vmap(tx0.init))(trainable)  # one compile, not one per eager op
    key = jax.random.key_data(jax.random.key(tcfg.seed))  # every adapter: the single run's rng
    state = TrainState(
        jnp.zeros((k,), jnp.int32), trainable, opt_state, jnp.array(jnp.broadcast_to(key, (k,) + key.shape))
    )

    jit_kwargs = eval_kwargs = replicated = None
    if shardings is not None:
        stacked, rules, replicated = shardings
        state_sh, fl_sh, hyper_sh = (jax.tree.map(stacked, t) for t in (state, frozen_lora, hyper))
        base_sh = tree_shardings(base, mesh, rules)
        state, frozen_lora, hyper, base = jax.device_put(
            (state, frozen_lora, hyper, base), (state_sh, fl_sh, hyper_sh, base_sh)
        )
        metric_sh = stacked(jnp.zeros((k,)))
        jit_kwargs = {
            "in_shardings": (state_sh, base_sh, fl_sh, hyper_sh, replicated),
            "out_shardings": (state_sh, metric_sh),
        }
        eval_kwargs = {
            "in_shardings": (state_sh.trainable, base_sh, fl_sh, replicated),
            "out_shardings": (metric_sh, metric_sh),
        }

    model = build_model(cfg)
    chunk = run.model.loss_chunk_tokens
    step = make_sweep_step(
        model,
        cfg,
        lcfg,
        run.optim,
        tcfg.steps,
        grad_accum=tcfg.grad_accum,
        chunk_tokens=chunk,
        use_segments=use_segments,
        traced_dropout=traced_dropout,
        adapters_per_pass=adapters_per_pass,
        jit_kwargs=jit_kwargs,
    )
    evaluate = make_sweep_eval_step(
        model,
        cfg,
        lcfg,
        chunk_tokens=chunk,
        use_segments=use_segments,
        adapters_per_pass=adapters_per_pass,
        jit_kwargs=eval_kwargs,
    )

    def put(batch):
        return batch if replicated is None else jax.device_put(batch, replicated)

    return Program(state, base, frozen_lora, hyper, shapes, lcfg, step, evaluate, put, k)


def eval_losses(program: Program, trainable, datasets, tcfg) -> np.ndarray | None:
    """Per-configuration eval loss [K] over the first `train.eval_batches` held-out batches, as
    `train()` computes it (token-weighted); None without held-out rows."""
    if not datasets.eval_rows or not tcfg.eval_batches:
        return None
    return eval_loss(
        lambda batch: program.eval(trainable, program.base, program.frozen_lora, program.put(batch)),
        datasets.eval_rows,
        tcfg.batch_size,
        tcfg.eval_batches,
        shape=(program.k,),
    )


def train_loop(program: Program, loader, steps: int, progress: bool = True):
    """`steps` steps of the program on the loader's batches (the same batch for all K).
    Returns (final state, train losses [steps, K], seconds of the first step: the compile)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"sweep x{program.k}", unit="step", dynamic_ncols=True)
    losses = np.full((steps, program.k), np.nan)
    state, compile_s, pending = program.state, None, None
    try:
        for step in range(steps):
            batch = program.put(next(loader))
            t0 = time.perf_counter()
            state, metrics = program.step(state, program.base, program.frozen_lora, program.hyper, batch)
            if step == 0:
                jax.block_until_ready(state.step)
                compile_s = time.perf_counter() - t0
            if pending is not None:  # read one step late so the device never waits on the host
                losses[pending[0]] = np.asarray(pending[1]["loss"])
                if bar is not None:
                    row = losses[pending[0]]
                    ok = row[np.isfinite(row)]
                    bar.set_postfix(
                        best=f"{ok.min():.4f}" if ok.size else "nan", worst=f"{ok.max():.4f}" if ok.size else "nan"
                    )
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
    return state, losses, compile_s
