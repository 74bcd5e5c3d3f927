"""Wall clock of one K-configuration sweep against K sequential single runs, on the demo model.

    python experiments/sweeps/measure_speedup.py --steps 30 100 --out /tmp/speedup.json

For each step count S it runs, each as its own fresh process (nothing cached between them, no
persistent compilation cache, exactly what a user types):

    sweep:      lora-jax sweep --grid lora.r=4,8,16,32 --grid lora.lora_alpha=16,32 --set train.steps=S
    sequential: lora-jax train --set lora.r=R --set lora.lora_alpha=A --set train.steps=S   (x 8)

Everything else is the built-in demonstration's settings for both (batch 32, seq_len 64, warmup 20,
cosine, lr 2e-3, all-linear targets, eval loss on 8 batches, exact match on 64 held-out prompts
before/after... the sweep evaluates exact match only after training). Single runs also write
checkpoints and TensorBoard logs, as `lora-jax train` always does. `--baseline inprocess` instead
runs the 8 single runs as 8 `train()` calls in one Python process (imports paid once; each run still
compiles its own step), a stricter baseline.

Prints and writes: wall clock of each, the ratio, the sweep's own breakdown (setup, compile, train,
eval), the single runs' compile / step times, and each configuration's final eval loss and exact
match from both, to show they trained the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RANKS = (4, 8, 16, 32)
ALPHAS = (16, 32)


def _env():
    env = dict(os.environ)
    for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(key, None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _load() -> float:
    return os.getloadavg()[0]


def run_sweep(steps: int, work: str) -> dict:
    out = os.path.join(work, f"sweep-{steps}")
    cmd = [
        sys.executable,
        "-m",
        "lora_jax.cli",
        "sweep",
        "--grid",
        "lora.r=" + ",".join(map(str, RANKS)),
        "--grid",
        "lora.lora_alpha=" + ",".join(map(str, ALPHAS)),
        "--set",
        f"train.steps={steps}",
        "--output-dir",
        out,
        "--no-progress",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "results.json")) as f:
        rec = json.load(f)
    rows = {(r["lora.r"], r["lora.lora_alpha"]): r for r in rec["rows"]}
    return {
        "wall_s": wall,
        "timing": rec["timing"],
        "compiles": rec["compiles"],
        "cmd": " ".join(cmd),
        "rows": {
            f"r{r}_alpha{a}": {"eval_loss": rows[(r, a)]["eval_loss"], "exact_match": rows[(r, a)]["exact_match"]}
            for r in RANKS
            for a in ALPHAS
        },
    }


def run_sequential(steps: int, work: str, baseline: str) -> dict:
    out = {}
    t_all = time.perf_counter()
    if baseline == "inprocess":
        code = (
            "import json, sys; from lora_jax.demo import demo_run_config; "
            "from lora_jax.train.loop import train; runs = json.loads(sys.argv[1]); "
            "[train(demo_run_config().with_overrides(r), progress=False) for r in runs]"
        )
        runs = [
            [
                f"lora.r={r}",
                f"lora.lora_alpha={a}",
                f"train.steps={steps}",
                f"train.output_dir={os.path.join(work, f'single-{steps}-r{r}-a{a}')}",
            ]
            for r in RANKS
            for a in ALPHAS
        ]
        subprocess.run(
            [sys.executable, "-c", code, json.dumps(runs)],
            check=True,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    for r in RANKS:
        for a in ALPHAS:
            d = os.path.join(work, f"single-{steps}-r{r}-a{a}")
            t0 = time.perf_counter()
            if baseline == "processes":
                cmd = [
                    sys.executable,
                    "-m",
                    "lora_jax.cli",
                    "train",
                    "--set",
                    f"lora.r={r}",
                    "--set",
                    f"lora.lora_alpha={a}",
                    "--set",
                    f"train.steps={steps}",
                    "--output-dir",
                    d,
                    "--no-progress",
                ]
                subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            with open(os.path.join(d, "summary.json")) as f:
                s = json.load(f)
            step_s = (2048 / s["tokens_per_s"]) if s.get("tokens_per_s") else None
            out[f"r{r}_alpha{a}"] = {
                "wall_s": wall if baseline == "processes" else None,
                "compile_s": s["compile_s"],
                "setup_s": s["setup_s"],
                "step_s": step_s,
                "eval_loss": s["eval_loss_after"],
                "exact_match": s["eval_after"],
            }
    return {
        "wall_s": time.perf_counter() - t_all,
        "runs": out,
        "baseline": baseline,
        "cmd_example": (
            f"{sys.executable} -m lora_jax.cli train --set lora.r=R --set lora.lora_alpha=A "
            f"--set train.steps={steps} --output-dir DIR --no-progress"
            if baseline == "processes"
            else "8 x train(RunConfig) in one process"
        ),
    }


def per_step(repeats: int = 12) -> dict:
    """Steady-state seconds per step, measured back to back in this process (same load): the
    K=8 program, vmapped and looped (`adapters_per_pass` None and 1), against each single run's
    program (`make_train_step`), batch 32."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers

    from lora_jax.data import DataLoader, build_datasets
    from lora_jax.demo import DEMO_MODEL, demo_run_config
    from lora_jax.hf.load import load_pretrained
    from lora_jax.lora.tree import init_lora, split_trainable
    from lora_jax.models.llama import Llama
    from lora_jax.sweep import expand_grid, init_stacked, make_sweep_step
    from lora_jax.train.step import TrainState, init_state, make_schedule, make_train_step, make_tx

    run = demo_run_config()
    tok = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    rows = build_datasets(run.data, tok).train_rows
    cfg, params = load_pretrained(DEMO_MODEL, dtype="float32")
    model = Llama(cfg)
    loader = DataLoader(rows, run.train.batch_size, 0)
    batches = [next(loader) for _ in range(4)]

    def bench(f):
        f(0), f(1)  # compile, warm up
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            f(i)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    points = expand_grid(run, {"lora.r": list(RANKS), "lora.lora_alpha": list(ALPHAS)})
    single = {}
    for p in points:
        lc = p.run.lora
        split = split_trainable(params, init_lora(params, lc, jax.random.key(0)), lc)
        schedule = make_schedule(run.optim, run.train.steps)
        tx = make_tx(lc, run.optim, schedule)
        box = [init_state(split.trainable, tx, 0)]
        step = make_train_step(model, cfg, lc, tx, schedule, use_segments=run.data.packing)

        def f1(i, box=box, step=step, frozen=split.frozen):
            box[0], m = step(box[0], frozen, batches[i % 4])
            jax.block_until_ready(m)

        single[p.name] = bench(f1)
    trainable, frozen_lora, _, base = init_stacked(params, [p.run.lora for p in points], 0)
    k = len(points)
    tx0 = make_tx(points[0].run.lora, run.optim, make_schedule(run.optim, run.train.steps))
    key = jax.random.key_data(jax.random.key(0))
    box = [
        TrainState(
            jnp.zeros((k,), jnp.int32),
            trainable,
            jax.vmap(tx0.init)(trainable),
            jnp.array(jnp.broadcast_to(key, (k,) + key.shape)),
        )
    ]
    hyper = {"lr": jnp.full((k,), run.optim.lr), "weight_decay": jnp.zeros((k,)), "lora_dropout": jnp.zeros((k,))}
    total = sum(single.values())
    out = {"single_step_s": single, "sum_of_singles_s": total}
    for per_pass, name in ((None, "vmapped"), (1, "looped")):  # adapters_per_pass
        sstep = make_sweep_step(
            model,
            cfg,
            points[0].run.lora,
            run.optim,
            run.train.steps,
            use_segments=run.data.packing,
            adapters_per_pass=per_pass,
        )

        def fk(i, sstep=sstep):
            box[0], m = sstep(box[0], base, frozen_lora, hyper, batches[i % 4])
            jax.block_until_ready(m)

        swept = bench(fk)
        out[f"sweep_step_s_{name}"] = swept
        out[f"per_step_speedup_{name}"] = total / swept
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 100])
    ap.add_argument("--baseline", choices=("processes", "inprocess"), default="processes")
    ap.add_argument("--out", help="write the measurements here (JSON)")
    ap.add_argument("--work", help="directory for the runs (default: a temporary one)")
    ap.add_argument(
        "--per-step",
        action="store_true",
        help="only compare steady-state step times (K=8 program vs the 8 single programs)",
    )
    args = ap.parse_args()
    if args.per_step:
        rec = per_step()
        print(json.dumps(rec, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rec, f, indent=2)
        return 0
    work = args.work or tempfile.mkdtemp(prefix="lora-jax-speedup-")
    results = []
    for steps in args.steps:
        load0 = _load()
        sweep = run_sweep(steps, work)
        seq = run_sequential(steps, work, args.baseline)
        load1 = _load()
        rec = {
            "steps": steps,
            "configs": len(RANKS) * len(ALPHAS),
            "sweep": sweep,
            "sequential": seq,
            "speedup": seq["wall_s"] / sweep["wall_s"],
            "loadavg_1min": [load0, load1],
            "cpus": os.cpu_count(),
        }
        results.append(rec)
        t = sweep["timing"]
        singles = seq["runs"].values()
        print(
            f"\n== {steps} steps, {rec['configs']} configurations, {os.cpu_count()} CPUs "
            f"(load avg {load0:.1f} -> {load1:.1f})"
        )
        print(
            f"sweep (1 process):        {sweep['wall_s']:7.1f} s   [in sweep(): {t['total_s']:.1f}: "
            f"setup {t['setup_s']:.1f}, compile {t['compile_s']:.1f}, train {t['train_s']:.1f}, "
            f"eval {t['eval_s']:.1f}, export {t['export_s']:.1f}, plots/files {t.get('outputs_s', 0):.1f}; "
            f"{sweep['compiles']['train_step']} compile]"
        )
        print(
            f"sequential ({args.baseline}): {seq['wall_s']:7.1f} s   [per run: compile "
            f"{sum(r['compile_s'] for r in singles) / len(singles):.1f} s, step "
            f"{sum(r['step_s'] or 0 for r in singles) / len(singles):.3f} s]"
        )
        print(f"speed-up: {rec['speedup']:.2f}x")
        print("config        eval_loss sweep / single    exact_match sweep / single")
        for name, s in seq["runs"].items():
            w = sweep["rows"][name]
            print(
                f"{name:13s} {w['eval_loss']:.4f} / {s['eval_loss']:.4f}          "
                f"{w['exact_match']:.3f} / {s['exact_match']:.3f}"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
