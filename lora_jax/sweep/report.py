"""What a sweep reports: one row per configuration, the ranking, a rich table, matplotlib plots,
and the files of the output directory (sweep.json, results.csv / .json, plots, PEFT adapters).

rich and matplotlib are imported where they are used; a missing matplotlib is one ConfigError
naming the package to install, raised before a sweep trains (`require_plotting`).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import textwrap
import time
from collections.abc import Sequence

import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.hf.peft import save_peft
from lora_jax.sweep.grid import ALLOWED_KEYS, SHORT_NAMES, format_value

__all__ = [
    "result_rows",
    "metric_of",
    "rank_rows",
    "ranking_table",
    "plot_loss_curves",
    "plot_heatmap",
    "require_plotting",
    "prepare_sweep_dir",
    "write_sweep_json",
    "export_adapters",
    "write_outputs",
]


_NO_MATPLOTLIB = (
    "the sweep's plots (loss_curves.png, heatmap.png) need matplotlib, which is not "
    "installed; install the plots extra: pip install 'lora-jax[plots]'"
)


def require_plotting() -> None:
    """Refuse, before any training, a sweep whose plots could not be drawn (matplotlib missing)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(_NO_MATPLOTLIB)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(_NO_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ============================================================================== rows and ranking
def result_rows(points, losses: np.ndarray, loss_before, loss_after, matches, diverged) -> list[dict]:
    """One row per configuration (the columns of results.csv): its values, scale, train losses
    [steps, K], eval loss before / after (None without held-out data), exact match, divergence."""
    rows = []
    for k, p in enumerate(points):
        lc, oc = p.run.lora, p.run.optim
        lk = losses[:, k]
        rows.append(
            {
                "name": p.name,
                "lora.r": lc.r,
                "lora.lora_alpha": lc.lora_alpha,
                "lora.use_rslora": lc.use_rslora,
                "lora.lora_dropout": lc.lora_dropout,
                "optim.lr": oc.lr,
                "optim.weight_decay": oc.weight_decay,
                "scale": lc.lora_alpha / (math.sqrt(lc.r) if lc.use_rslora else lc.r),
                "steps": losses.shape[0],
                "train_loss_first": float(lk[0]) if len(lk) else None,
                "train_loss_final": float(lk[-1]) if len(lk) else None,
                "train_loss_last10": float(np.mean(lk[-10:])) if len(lk) else None,
                "eval_loss_before": None if loss_before is None else float(loss_before[k]),
                "eval_loss": None if loss_after is None else float(loss_after[k]),
                "exact_match": matches[k],
                "diverged": diverged[k],
                "adapter_dir": None,
            }
        )
    return rows


def metric_of(rows: list[dict]) -> str:
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


def rank_rows(rows: list[dict], metric: str) -> list[dict]:
    """The rows best first by `metric`; diverged or missing values last, ties broken by eval loss."""

    def key(r):
        v = r.get(metric)
        bad = v is None or (isinstance(v, float) and not math.isfinite(v)) or r.get("diverged")
        tie = r.get("eval_loss")
        tie = tie if tie is not None and math.isfinite(tie) else math.inf
        return (bad, -v if (not bad and _higher_is_better(metric)) else (v if not bad else 0), tie)

    return sorted(rows, key=key)


def ranking_table(rows: list[dict], metric: str, title: str = "lora-jax sweep: ranking"):
    """A rich Table of the configurations, best first."""
    from rich.table import Table  # no check: flax itself imports rich

    varied = [k for k in ALLOWED_KEYS if len({r[k] for r in rows}) > 1]
    table = Table(
        title=f"{title}, best first (by {metric}, {'higher' if _higher_is_better(metric) else 'lower'} is better)"
    )
    table.add_column("#", justify="right")
    table.add_column("configuration", overflow="fold")
    for k in varied:
        table.add_column(SHORT_NAMES[k], justify="right")
    results = (("train_loss_final", "train loss"), ("eval_loss", "eval loss"), ("exact_match", "exact match"))
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

    for i, r in enumerate(rank_rows(rows, metric), 1):
        name = r["name"] + (" (diverged)" if r.get("diverged") else "")
        table.add_row(str(i), name, *(cell(r[k]) for k in varied), *(cell(r.get(k)) for k, _ in results))
    return table


# ========================================================================================= plots
def plot_loss_curves(
    names: Sequence[str], train_loss: np.ndarray, path: str, title: str = "train loss per configuration"
) -> str:
    """One line per configuration: the per-step train loss (faint) and its moving average."""
    plt = _pyplot()
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
    ax.set_title(title + (f"\n(faint: per step; bold: trailing {window}-step mean)" if window > 1 else ""), fontsize=10)
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
    plt = _pyplot()
    rs = sorted({r["lora.r"] for r in rows})
    alphas = sorted({r["lora.lora_alpha"] for r in rows})
    others = [k for k in ALLOWED_KEYS if k not in ("lora.r", "lora.lora_alpha") and len({r[k] for r in rows}) > 1]
    combos = sorted({tuple(r[k] for k in others) for r in rows}, key=lambda c: tuple(map(float, c)))
    facets: list[tuple[tuple | None, list[dict]]]
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
                vals = [
                    r[metric]
                    for r in subset
                    if r["lora.r"] == rv
                    and r["lora.lora_alpha"] == av
                    and r.get(metric) is not None
                    and math.isfinite(r[metric])
                ]
                if vals:
                    grid[i, j] = float(np.mean(vals))
        grids.append(grid)
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if metric == "exact_match":
        vmin, vmax = 0.0, 1.0
    n = len(facets)
    fig, axes = plt.subplots(
        1,
        n,
        figsize=(2.2 + (1.0 * len(alphas) + 0.9) * n, 1.9 + 0.7 * len(rs)),
        dpi=110,
        squeeze=False,
        layout="constrained",
        sharey=True,
    )
    im = None
    for i_ax, (ax, (combo, _), grid) in enumerate(zip(axes[0], facets, grids)):
        im = ax.imshow(
            grid, cmap="viridis" if higher else "viridis_r", vmin=vmin, vmax=vmax, aspect="auto", origin="lower"
        )
        ax.set_xticks(range(len(alphas)), [format_value(a) for a in alphas])
        ax.set_yticks(range(len(rs)), [str(r) for r in rs])
        ax.set_xlabel("lora_alpha")
        if i_ax == 0:
            ax.set_ylabel("r")
        if combo is not None and others:
            ax.set_title(", ".join(f"{SHORT_NAMES[k]}={format_value(v)}" for k, v in zip(others, combo)), fontsize=9)
        for i in range(len(rs)):
            for j in range(len(alphas)):
                v = grid[i, j]
                text = "n/a" if np.isnan(v) else (f"{v:.2f}" if abs(v) < 100 else f"{v:.3g}")
                shade = 0.5 if np.isnan(v) else (v - vmin) / ((vmax - vmin) or 1.0)
                light = shade < 0.5 if higher else shade > 0.5
                ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if light else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label=metric)
    fig.suptitle(
        f"final {metric} ({'higher' if higher else 'lower'} is better)\n" + textwrap.fill(how, 30 + 35 * n), fontsize=10
    )
    fig.savefig(path)
    plt.close(fig)
    return path, how


# ==================================================================================== output files
def prepare_sweep_dir(out: str, overwrite: bool) -> None:
    """Refuse a non-empty directory unless --overwrite and it holds a sweep. Writes nothing."""
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ConfigError(
                f"output directory {out} is not empty; pass --overwrite to replace the "
                "sweep there, or choose another --output-dir"
            )
        if not os.path.isfile(os.path.join(out, "sweep.json")):
            raise ConfigError(
                f"--overwrite: {out} is not a lora-jax sweep directory (no sweep.json); "
                "refusing to delete it. Choose another --output-dir"
            )
    elif os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output directory {out} is a file; choose another --output-dir")


def write_sweep_json(out: str, overwrite: bool, grid, run, model_path: str, points) -> None:
    """(Re)create `out` and write sweep.json: what is about to train, before any step runs."""
    if os.path.isdir(out) and overwrite:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(
            {
                "grid": grid,
                "base_run": run.to_dict(),
                "model_path": model_path,
                "configurations": [{"name": p.name, **p.values} for p in points],
            },
            f,
            indent=2,
        )


def export_adapters(result, out: str, model_path: str) -> None:
    """Each configuration of a `SweepResult` that did not diverge as its own PEFT adapter, at its
    own rank, in out/adapters/<name>/; its row's adapter_dir says where."""
    for k, p in enumerate(result.points):
        if result.rows[k]["diverged"]:
            continue
        lora_k, lcfg_k = result.adapter(k)
        d = os.path.join(out, "adapters", p.name)
        save_peft(
            d,
            lora_k,
            lcfg_k,
            result.model_config,
            base_model_name_or_path=model_path,
            params=result.params(k) if lcfg_k.modules_to_save else None,
        )
        result.rows[k]["adapter_dir"] = d


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_outputs(out: str, result, grid, run, plots: bool = True, started: float | None = None) -> dict:
    """results.csv, the plots and results.json of a `SweepResult`. With `started` (the sweep's
    `time.perf_counter()` at its start), the timing written includes this writing (outputs_s) and
    its total_s ends here. Returns the paths written."""
    t0 = time.perf_counter()
    columns = [
        "name",
        *ALLOWED_KEYS,
        "scale",
        "steps",
        "train_loss_first",
        "train_loss_final",
        "train_loss_last10",
        "eval_loss_before",
        "eval_loss",
        "exact_match",
        "diverged",
        "adapter_dir",
    ]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in result.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    heat = curves = how = None
    if plots:
        heat, how = plot_heatmap(result.rows, result.metric, os.path.join(out, "heatmap.png"))
        curves = plot_loss_curves(
            result.names,
            result.train_loss,
            os.path.join(out, "loss_curves.png"),
            title=f"train loss, {len(result.names)} configurations in one program",
        )
    if started is not None:
        now = time.perf_counter()
        result.timing["outputs_s"] = now - t0  # csv + plots
        result.timing["total_s"] = now - started
    record = {
        "metric": result.metric,
        "heatmap": how,
        "grid": grid,
        "base_run": run.to_dict(),
        "rows": [{k: _clean(v) for k, v in r.items()} for r in result.rows],
        "train_loss": {n: [_clean(float(x)) for x in result.train_loss[:, k]] for k, n in enumerate(result.names)},
        "compiles": result.compiles,
        "timing": result.timing,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(record, f, indent=2, default=_json_default)
    return {
        "results_csv": os.path.join(out, "results.csv"),
        "results_json": os.path.join(out, "results.json"),
        "heatmap": heat,
        "loss_curves": curves,
    }
