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

Where things live: `grid` (allowed keys, `--grid` parsing, expansion into named configurations),
`stacking` (padding and stacking adapters on the host), `program` (the vmapped step, its mesh
placement, the training loop), `report` (rows, ranking, table, plots, files), `result`
(`SweepResult`), `run` (`sweep` itself).

Output directory (when `output_dir` is given):

    sweep.json              the base RunConfig, the grid, the configurations (written first)
    results.csv / .json     one row per configuration; results.json also holds per-step losses
    loss_curves.png         train loss per step, one line per configuration
    heatmap.png             the final metric over lora.r x lora.lora_alpha
    adapters/<name>/        each configuration as its own PEFT adapter, at its own rank
"""

from lora_jax.sweep.grid import (
    ALLOWED_KEYS,
    SweepPoint,
    check_grid,
    expand_grid,
    normalize_grid,
    parse_grid_arg,
    parse_grid_args,
    parse_grid_value,
    split_grid_values,
)
from lora_jax.sweep.program import make_sweep_eval_step, make_sweep_step, resolve_adapters_per_pass
from lora_jax.sweep.report import metric_of, plot_heatmap, plot_loss_curves, rank_rows, ranking_table
from lora_jax.sweep.result import SweepResult
from lora_jax.sweep.run import sweep
from lora_jax.sweep.stacking import init_stacked, stack_trees, unstack_tree

__all__ = [
    "sweep",
    "SweepResult",
    "SweepPoint",
    # the grid
    "ALLOWED_KEYS",
    "normalize_grid",
    "check_grid",
    "expand_grid",
    "parse_grid_arg",
    "parse_grid_args",
    "parse_grid_value",
    "split_grid_values",
    # stacking and the one program
    "stack_trees",
    "unstack_tree",
    "init_stacked",
    "make_sweep_step",
    "make_sweep_eval_step",
    "resolve_adapters_per_pass",
    # reporting
    "metric_of",
    "rank_rows",
    "ranking_table",
    "plot_loss_curves",
    "plot_heatmap",
]
