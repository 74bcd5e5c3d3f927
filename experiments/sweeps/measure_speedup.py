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
    cmd = [sys.executable, "-m", "lora_jax.cli", "sweep",
           "--grid", "lora.r=" + ",".join(map(str, RANKS)),
           "--grid", "lora.lora_alpha=" + ",".join(map(str, ALPHAS)),
           "--set", f"train.steps={steps}", "--output-dir", out, "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "results.json")) as f:
        rec = json.load(f)
    rows = {(r["lora.r"], r["lora.lora_alpha"]): r for r in rec["rows"]}
    return {"wall_s": wall, "timing": rec["timing"], "compiles": rec["compiles"], "cmd": " ".join(cmd),
            "rows": {f"r{r}_alpha{a}": {"eval_loss": rows[(r, a)]["eval_loss"],
                                        "exact_match": rows[(r, a)]["exact_match"]}
                     for r in RANKS for a in ALPHAS}}


def run_sequential(steps: int, work: str, baseline: str) -> dict:
    out = {}
    t_all = time.perf_counter()
    if baseline == "inprocess":
        code = ("import json, sys; from lora_jax.demo import demo_run_config; "
                "from lora_jax.train.loop import train; runs = json.loads(sys.argv[1]); "
                "[train(demo_run_config().with_overrides(r), progress=False) for r in runs]")
        runs = [[f"lora.r={r}", f"lora.lora_alpha={a}", f"train.steps={steps}",
                 f"train.output_dir={os.path.join(work, f'single-{steps}-r{r}-a{a}')}"]
                for r in RANKS for a in ALPHAS]
        subprocess.run([sys.executable, "-c", code, json.dumps(runs)], check=True, env=_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for r in RANKS:
        for a in ALPHAS:
            d = os.path.join(work, f"single-{steps}-r{r}-a{a}")
            t0 = time.perf_counter()
            if baseline == "processes":
                cmd = [sys.executable, "-m", "lora_jax.cli", "train", "--set", f"lora.r={r}",
                       "--set", f"lora.lora_alpha={a}", "--set", f"train.steps={steps}",
                       "--output-dir", d, "--no-progress"]
                subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            with open(os.path.join(d, "summary.json")) as f:
                s = json.load(f)
            step_s = (2048 / s["tokens_per_s"]) if s.get("tokens_per_s") else None
            out[f"r{r}_alpha{a}"] = {"wall_s": wall if baseline == "processes" else None,
                                     "compile_s": s["compile_s"], "setup_s": s["setup_s"],
                                     "step_s": step_s, "eval_loss": s["eval_loss_after"],
                                     "exact_match": s["eval_after"]}
    return {"wall_s": time.perf_counter() - t_all, "runs": out, "baseline": baseline,
            "cmd_example": (f"{sys.executable} -m lora_jax.cli train --set lora.r=R --set lora.lora_alpha=A "
                            f"--set train.steps={steps} --output-dir DIR --no-progress"
                            if baseline == "processes" else "8 x train(RunConfig) in one process")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 100])
    ap.add_argument("--baseline", choices=("processes", "inprocess"), default="processes")
    ap.add_argument("--out", help="write the measurements here (JSON)")
    ap.add_argument("--work", help="directory for the runs (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="lora-jax-speedup-")
    results = []
    for steps in args.steps:
        load0 = _load()
        sweep = run_sweep(steps, work)
        seq = run_sequential(steps, work, args.baseline)
        load1 = _load()
        rec = {"steps": steps, "configs": len(RANKS) * len(ALPHAS), "sweep": sweep, "sequential": seq,
               "speedup": seq["wall_s"] / sweep["wall_s"], "loadavg_1min": [load0, load1],
               "cpus": os.cpu_count()}
        results.append(rec)
        t = sweep["timing"]
        singles = seq["runs"].values()
        print(f"\n== {steps} steps, {rec['configs']} configurations, {os.cpu_count()} CPUs "
              f"(load avg {load0:.1f} -> {load1:.1f})")
        print(f"sweep (1 process):        {sweep['wall_s']:7.1f} s   [in sweep(): {t['total_s']:.1f}: "
              f"setup {t['setup_s']:.1f}, compile {t['compile_s']:.1f}, train {t['train_s']:.1f}, "
              f"eval {t['eval_s']:.1f}, export {t['export_s']:.1f}, plots/files {t.get('outputs_s', 0):.1f}; "
              f"{sweep['compiles']['train_step']} compile]")
        print(f"sequential ({args.baseline}): {seq['wall_s']:7.1f} s   [per run: compile "
              f"{sum(r['compile_s'] for r in singles) / len(singles):.1f} s, step "
              f"{sum(r['step_s'] or 0 for r in singles) / len(singles):.3f} s]")
        print(f"speed-up: {rec['speedup']:.2f}x")
        print("config        eval_loss sweep / single    exact_match sweep / single")
        for name, s in seq["runs"].items():
            w = sweep["rows"][name]
            print(f"{name:13s} {w['eval_loss']:.4f} / {s['eval_loss']:.4f}          "
                  f"{w['exact_match']:.3f} / {s['exact_match']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
