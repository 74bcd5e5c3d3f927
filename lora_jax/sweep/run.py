"""`sweep()`: the grid checked, the inputs opened as `train()` opens them (`lora_jax.session`), one
program built and trained, every configuration evaluated, exported and reported."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.data import DataLoader
from lora_jax.evaluate import exact_match
from lora_jax.lora.tree import combine
from lora_jax.models.attention import check_attention
from lora_jax.run_config import RunConfig
from lora_jax.session import fit_to_data, load_model, open_inputs
from lora_jax.sweep.grid import check_grid, check_sweepable, expand_grid
from lora_jax.sweep.program import build_program, eval_losses, resolve_adapters_per_pass, train_loop
from lora_jax.sweep.report import (
    export_adapters,
    metric_of,
    prepare_sweep_dir,
    require_plotting,
    result_rows,
    write_outputs,
    write_sweep_json,
)
from lora_jax.sweep.result import SweepResult

__all__ = ["sweep"]


def sweep(
    run: RunConfig,
    grid,
    *,
    output_dir: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    mesh=None,
    export: bool = True,
    plots: bool = True,
    adapters_per_pass: int | str | None = "auto",
) -> SweepResult:
    """Train every configuration of `grid` on top of `run` in one compiled program; evaluate,
    export and plot each (see `lora_jax.sweep`). Returns a `SweepResult`.

    grid: `{key: [values]}`, the Cartesian product over keys of `ALLOWED_KEYS`, e.g.
        {"lora.r": [4, 16], "lora.lora_alpha": [8, 32]}; or an explicit list of configurations
        [{"lora.r": 4, "optim.lr": 1e-3}, {"lora.r": 16, "lora.lora_alpha": 32}].

    output_dir: where to write results, plots and adapters (None: write nothing, return only).
    mesh: a `jax.sharding.Mesh` to split the K configurations over (its data x fsdp axes).
    adapters_per_pass: configurations per pass of the one compiled step (`resolve_adapters_per_pass`;
        "auto": all at once on a GPU / TPU or with a mesh, one at a time on a CPU).
    """
    t_start = time.perf_counter()
    grid = check_grid(grid)
    check_sweepable(run)
    per_pass = resolve_adapters_per_pass(adapters_per_pass, mesh)
    points = expand_grid(run, grid)
    out = os.path.abspath(output_dir) if output_dir is not None else None
    if out is not None:
        prepare_sweep_dir(out, overwrite)
        if plots:
            require_plotting()

    # ---- everything that validates input, before anything is written (as `train()` does)
    check_attention(run.model.attention)
    inputs = open_inputs(run)  # the model directory, its tokenizer, the data
    tcfg, datasets = run.train, inputs.datasets
    loader = DataLoader(datasets.train_rows, tcfg.batch_size, inputs.data.seed)
    cfg, params = load_model(run.model, inputs.model_path)
    cfg = fit_to_data(cfg, inputs)
    program = build_program(
        run, points, cfg, params, mesh=mesh, adapters_per_pass=per_pass, use_segments=inputs.data.packing
    )
    del params
    if out is not None:
        write_sweep_json(out, overwrite, grid, run, inputs.model_path, points)
    setup_s = time.perf_counter() - t_start

    t0 = time.perf_counter()
    loss_before = eval_losses(program, program.state.trainable, datasets, tcfg)
    eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, losses, compile_s = train_loop(program, loader, tcfg.steps, progress)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = SweepResult(
        points=points,
        rows=[],
        train_loss=losses,
        metric="",
        compiles={},
        timing={},
        output_dir=out,
        state=state,
        frozen_lora=program.frozen_lora,
        base_params=program.base,
        model_config=cfg,
        shapes=program.shapes,
    )
    loss_after = eval_losses(program, state.trainable, datasets, tcfg)
    diverged = [not bool(np.all(np.isfinite(losses[:, k]))) for k in range(program.k)]
    matches = _exact_matches(result, program.lcfg, inputs, tcfg, diverged)
    eval_s += time.perf_counter() - t0
    result.rows = result_rows(points, losses, loss_before, loss_after, matches, diverged)
    result.metric = metric_of(result.rows)
    result.compiles = {"train_step": program.step.traces, "eval_step": program.eval.traces}

    t0 = time.perf_counter()
    if out is not None and export:
        export_adapters(result, out, inputs.model_path)
    result.timing = {
        "setup_s": setup_s,
        "compile_s": compile_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "export_s": time.perf_counter() - t0,
        "total_s": time.perf_counter() - t_start,
    }
    if out is not None:
        write_outputs(out, result, grid, run, plots=plots, started=t_start)
    return result


def _exact_matches(result: SweepResult, lcfg, inputs, tcfg, diverged: list[bool]) -> list[float | None]:
    """Exact match of each configuration that did not diverge (None: not scored). Each adapter is
    its padded slice of the stack, so every one runs the same compiled decoder (padding adds
    exact zeros)."""
    records = inputs.datasets.eval_records
    matches: list[float | None] = [None] * len(diverged)
    if not (tcfg.eval_generate and records):
        return matches
    host_tr, host_fl = result.host_adapters  # one transfer, also used by the export
    for k, bad in enumerate(diverged):
        if bad:
            continue
        tr_k = jax.tree.map(lambda x: jnp.asarray(x[k]), host_tr)
        fl_k = jax.tree.map(lambda x: jnp.asarray(x[k]), host_fl)
        p_k, lo_k = combine(tr_k, {"params": result.base_params, "lora": fl_k})
        matches[k] = exact_match(
            records, result.model_config, p_k, lo_k, lcfg, inputs.tokenizer, tcfg.max_new_tokens, tcfg.eval_generate
        )
    return matches
