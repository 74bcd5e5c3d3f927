"""Does the FP8 frozen base train as well as bf16? (issue #21)

(a) `--demo`: the built-in demonstration (`lora-jax train` with no arguments: a tiny Llama learns
    to upper-case phrases, scored by exact match on 64 held-out phrases, `summary.json`'s
    `eval_after`), trained with the bf16 base and with the FP8 base, same seed and data, one after
    the other in this process. Target: exact match within 0.02 of bf16's.
(b) `--curve`: the training loss of every step over `--steps` steps of one random model of
    `--shape` (`cli_bench.py`: its model, tokenizer and corpus writing; `--corpus zipf`, words whose
    loss moves), bf16 then FP8, each in its own process, same corpus, seed and config; or
    `--curve-from results.jsonl`: the same curves from rows already measured (`run.py --suite
    fp8` runs the 1B config 100 steps on that corpus and records every step's loss). Target: within
    1% of bf16's loss at every logged step. Writes `fp8_curve.json` (both curves, the relative
    difference at every step) and `fp8_loss_curve.png` under `--out`.

    python experiments/bench/fp8_quality.py --demo --out fp8_out                          # GPU, ~1 min
    python experiments/bench/fp8_quality.py --curve --shape 1b \\
        --config experiments/configs/llama-3.2-1b.yaml --steps 100 --out fp8_out          # GPU, ~3 min
    python experiments/bench/fp8_quality.py --curve-from fp8_out/results.jsonl --out fp8_out
    # CPU smoke test (FP8 GEMMs emulated by XLA, `--fp8-gemm on`; a few minutes on 2 cores):
    python experiments/bench/fp8_quality.py --demo --demo-steps 40 --curve --shape tiny --steps 30 \\
        --fp8-gemm on --set data.seq_len=64 --set train.batch_size=4 --doc-words 20 60 --work /tmp/fp8q --out /tmp/fp8q

Exits 1 when a target is missed (the figures are printed either way).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
sys.path.insert(0, _HERE)
sys.path.insert(0, _ROOT)

DEMO_TOLERANCE = 0.02  # exact match, absolute
CURVE_TOLERANCE = 0.01  # loss, relative to bf16's, at every logged step


def demo(args) -> dict:
    """Both demonstrations in this process; {"bf16": summary, "fp8": summary, "diff": ...}."""
    import jax
    from cli_bench import apply_fp8_options

    from lora_jax.demo import demo_run_config
    from lora_jax.train.loop import train

    apply_fp8_options(SimpleNamespace(fp8_scaling=args.fp8_scaling, fp8_gemm=args.fp8_gemm))
    out: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    for name, quantize in (("bf16", "null"), ("fp8", "fp8")):
        overrides = [f"model.quantize={quantize}", f"train.output_dir={os.path.join(args.work, f'demo-{name}')}"]
        if args.demo_steps:
            overrides.append(f"train.steps={args.demo_steps}")
        run_cfg = demo_run_config().with_overrides(overrides + args.demo_overrides)
        t = time.perf_counter()
        summary = train(run_cfg, progress=False, overwrite=True)
        out[name] = {
            "exact_match_before": summary["eval_before"],
            "exact_match": summary["eval_after"],
            "eval_loss": summary["eval_loss_after"],
            "train_loss_first": summary["train_loss_first"],
            "train_loss_last": summary["train_loss_last"],
            "steps": summary["steps"],
            "dtype": run_cfg.model.dtype,
            "wall_s": time.perf_counter() - t,
        }
        print(f"demo {name}: exact match {summary['eval_after']:.3f} ({summary['eval_before']:.3f} before)", flush=True)
    diff = out["fp8"]["exact_match"] - out["bf16"]["exact_match"]
    out.update(diff=diff, tolerance=DEMO_TOLERANCE, ok=abs(diff) <= DEMO_TOLERANCE)
    print(
        f"demo: exact match bf16 {out['bf16']['exact_match']:.3f}, fp8 {out['fp8']['exact_match']:.3f}, "
        f"fp8 - bf16 = {diff:+.3f} (target |diff| <= {DEMO_TOLERANCE}): {'PASS' if out['ok'] else 'FAIL'}",
        flush=True,
    )
    return out


def run_curves(args) -> list[dict]:
    """bf16 then FP8 through `cli_bench.py`, each in its own process; their RESULT rows."""
    common = ["--shape", args.shape, "--steps", str(args.steps), "--corpus", args.corpus, "--work", args.work]
    common += ["--doc-words", *map(str, args.doc_words)] + (["--config", args.config] if args.config else [])
    common += ["--set", "data.eval_fraction=0", "--set", "train.export_peft=false"]
    for o in args.overrides:
        common += ["--set", o]
    fp8 = ["--quantize", "fp8", "--fp8-gemm", args.fp8_gemm] + (
        ["--fp8-scaling", args.fp8_scaling] if args.fp8_scaling else []
    )
    rows = []
    for extra in ([], fp8):
        cmd = [sys.executable, os.path.join(_HERE, "cli_bench.py"), *common, *extra]
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True)
        found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not found:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            raise SystemExit(f"no RESULT from {' '.join(cmd)}")
        rows.append(found[-1])
    return rows


def pick_curves(path: str, shape: str, scaling: str | None) -> list[dict]:
    """The bf16 and FP8 rows of `shape` with per-step losses in a results.jsonl (the last of each)."""
    bf16 = fp8 = None
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("shape") != shape or not r.get("losses") or r.get("status") != "ok":
                continue
            if r.get("quantize") is None:
                bf16 = r
            elif r.get("quantize") == "fp8" and r.get("fp8_scaling", "row") == (scaling or "row"):
                fp8 = r
    if bf16 is None or fp8 is None:
        raise SystemExit(f"{path}: no bf16 and FP8 rows of shape {shape!r} with per-step losses")
    return [bf16, fp8]


def compare_curves(bf16: dict, fp8: dict, every: int) -> dict:
    """Relative difference of the FP8 loss from bf16's at every step; the report logs every `every`."""
    a, b = bf16["losses"], fp8["losses"]
    n = min(len(a), len(b))
    rel = [abs(b[i] - a[i]) / abs(a[i]) for i in range(n)]
    worst = max(range(n), key=lambda i: rel[i])
    drop_a, drop_b = a[0] - a[n - 1], b[0] - b[n - 1]
    out = {
        "shape": bf16.get("shape"),
        "config": bf16.get("config"),
        "corpus": bf16.get("corpus"),
        "batch": bf16.get("batch"),
        "seq": bf16.get("seq"),
        "steps": n,
        "bf16": a[:n],
        "fp8": b[:n],
        "rel_diff": rel,
        "max_rel_diff": rel[worst],
        "max_rel_diff_step": worst + 1,
        "loss_drop_bf16": drop_a,
        "loss_drop_fp8": drop_b,
        "fp8_scaling": fp8.get("fp8_scaling"),
        "tolerance": CURVE_TOLERANCE,
        "ok": rel[worst] <= CURVE_TOLERANCE,
        "device": bf16.get("gpu"),
        "tokens_per_s": {"bf16": bf16.get("tokens_per_s"), "fp8": fp8.get("tokens_per_s")},
    }
    print(f"loss curve, {out['shape']} ({out['config']}, corpus {out['corpus']}), {n} steps, bf16 vs fp8:")
    print("| step | bf16 | fp8 | rel diff |\n|---|---|---|---|")
    for i in range(n):
        if (i + 1) % every == 0 or i == 0 or i == worst:
            print(f"| {i + 1} | {a[i]:.4f} | {b[i]:.4f} | {rel[i]:.5f} |")
    print(
        f"max relative difference {rel[worst]:.5f} at step {worst + 1} (target <= {CURVE_TOLERANCE}): "
        f"{'PASS' if out['ok'] else 'FAIL'}; loss drop over the run bf16 {drop_a:.4f}, fp8 {drop_b:.4f}",
        flush=True,
    )
    return out


def plot(curve: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, curve["steps"] + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    top.plot(steps, curve["bf16"], label="bf16 base")
    top.plot(steps, curve["fp8"], label=f"FP8 base ({curve['fp8_scaling']} scaling)", linestyle="--")
    top.set_ylabel("training loss")
    top.set_title(f"{curve['shape']}, {curve['batch']} x {curve['seq']}, corpus {curve['corpus']} ({curve['device']})")
    top.legend()
    bottom.plot(steps, [100 * r for r in curve["rel_diff"]], color="C2")
    bottom.axhline(100 * CURVE_TOLERANCE, color="C3", linestyle=":", label="target")
    bottom.set_ylabel("|fp8 - bf16| / bf16, %")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "fp8_out"), help="where the JSON and the plot go")
    p.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/lora_jax_bench"), help="models, corpora, runs")
    p.add_argument("--demo", action="store_true", help="(a) the built-in demonstration, bf16 and FP8")
    p.add_argument("--demo-steps", type=int, help="shorter demonstrations (default: its 300 steps)")
    p.add_argument("--demo-set", dest="demo_overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--curve", action="store_true", help="(b) train bf16 and FP8 through cli_bench.py and compare")
    p.add_argument("--curve-from", metavar="RESULTS_JSONL", help="(b) from rows already measured (run.py --suite fp8)")
    p.add_argument("--shape", default="1b")
    p.add_argument("--config", default=None, help="run config YAML for --curve (default: the demonstration's)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--corpus", default="zipf", choices=("random", "zipf"))
    p.add_argument("--doc-words", type=int, nargs=2, default=[200, 1800], metavar=("MIN", "MAX"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--every", type=int, default=10, help="print every this many steps (the JSON has all)")
    p.add_argument("--fp8-scaling", choices=("row", "tensor"))
    p.add_argument("--fp8-gemm", choices=("auto", "on"), default="auto", help="on: FP8 GEMMs emulated on the CPU too")
    args = p.parse_args(argv)
    if not (args.demo or args.curve or args.curve_from):
        p.error("choose --demo, --curve and/or --curve-from")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    ok = True
    if args.demo:
        result = demo(args)
        ok &= result["ok"]
        with open(os.path.join(args.out, "fp8_demo.json"), "w") as f:
            json.dump(result, f, indent=1)
    if args.curve or args.curve_from:
        rows = pick_curves(args.curve_from, args.shape, args.fp8_scaling) if args.curve_from else run_curves(args)
        curve = compare_curves(rows[0], rows[1], every=args.every)
        ok &= curve["ok"]
        with open(os.path.join(args.out, "fp8_curve.json"), "w") as f:
            json.dump(curve, f)
        plot(curve, os.path.join(args.out, "fp8_loss_curve.png"))
        print(f"wrote {os.path.join(args.out, 'fp8_curve.json')} and fp8_loss_curve.png", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
