"""One command for the GPU comparison, side by side in one invocation: `lora-jax train` (the CLI's
loop, shipped configs, a packed JSONL corpus; `cli_bench.py`) against transformers + PEFT on the
same GPU, shape, batch, rank (16), alpha (32) and targets (all seven projections), random bf16
weights. The step-only harness (`jax_bench.py`, unpacked rows, no loader) runs beside them as the
yardstick the loop must stay within 5% of.

Each side runs in its own process (JAX and PyTorch would otherwise compete for device memory);
the results are gathered into `results.jsonl` and a Markdown table.

    python experiments/bench/run.py --suite 1b        # 1B: experiments/configs/llama-3.2-1b.yaml
    python experiments/bench/run.py --suite 8b        # 8B: experiments/configs/llama-3-8b.yaml
    python experiments/bench/run.py --suite long      # 8B, batch 1: llama-3-8b-long.yaml, 80 GB cap
    python experiments/bench/run.py --suite dropout   # the 1B config with and without LoRA dropout
    python experiments/bench/run.py --suite families  # Qwen3-1.7B and Gemma-3-1B: shipped configs vs PEFT
    python experiments/bench/run.py --suite fp8       # issue #21: bf16 against the FP8 base, 1B and 8B
    python experiments/bench/run.py --suite 1b 8b long --out-dir bench_out

`--suite fp8` (one H200, ~7 minutes with the models already written): the 1B config for 100 steps
on a corpus whose loss moves (`--corpus zipf`; the per-step losses are the FP8 quality check's
curves, `fp8_quality.py --curve-from`), bf16 then FP8 (the FP8 train step's HLO dumped and its
custom calls counted); the 8B config (16 x 2048 in 4 micro-batches, q/k/v saved) for 6 steps,
bf16 then FP8; the 8B FP8 memory row (4 x 2048, full remat). No held-out evaluation nor PEFT
export (they are outside the timed steps, and cost minutes at 8B); after the table, the FP8/bf16
throughput ratio of each pair. `--suite fp8-scaling`: the 1B FP8 row with per-tensor scaling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time

import yaml

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
PY = sys.executable

_1B = ["--shape", "1b", "--config", "experiments/configs/llama-3.2-1b.yaml", "--steps", "30"]
_8B = ["--shape", "8b", "--config", "experiments/configs/llama-3-8b.yaml", "--steps", "8"]
_LONG = ["--shape", "8b", "--config", "experiments/configs/llama-3-8b-long.yaml", "--steps", "3"]


def _family(shape: str, config: str, steps: int = 30) -> list[tuple[str, list[str]]]:
    """`lora-jax train` with a family's shipped config beside PEFT (eager and torch.compile) at the
    config's own batch x seq (8 x 2048 for both)."""
    with open(os.path.join(_ROOT, config)) as f:
        cfg = yaml.safe_load(f)
    batch, seq = cfg["train"]["batch_size"], cfg["data"]["seq_len"]
    return [
        ("cli", ["--shape", shape, "--config", config, "--steps", str(steps)]),
        ("peft", ["--shape", shape, "--batch", str(batch), "--seq", str(seq), "--mode", "eager", "compile"]),
    ]


# issue #21: no held-out evaluation or adapter export (outside the timed steps; minutes at 8B)
_NO_EVAL = ["--set", "data.eval_fraction=0", "--set", "train.export_peft=false"]
_1B_CURVE = [*_1B[:4], "--steps", "100", "--corpus", "zipf", *_NO_EVAL]
_8B_SHORT = [*_8B[:4], "--steps", "6", *_NO_EVAL]
_8B_MEMORY = [*_8B[:4], "--steps", "4", *_NO_EVAL, "--quantize", "fp8"]
_8B_MEMORY += ["--set", "train.batch_size=4", "--set", "train.grad_accum=1", "--set", "model.remat_policy=full"]

SUITES = {
    "1b": [
        ("cli", _1B),
        ("jax", ["--shape", "1b", "--batch", "8", "--seq", "2048", "--remat", "none", "--no-scan"]),
        ("peft", ["--shape", "1b", "--batch", "8", "--seq", "2048", "--mode", "eager", "compile"]),
    ],
    "dropout": [
        ("cli", _1B + ["--set", "lora.lora_dropout=0.0"]),
        ("cli", _1B),
    ],
    "8b": [
        ("cli", _8B),
        ("peft", ["--shape", "8b", "--batch", "4", "--seq", "2048", "--mode", "eager", "--grad-ckpt"]),
    ],
    "long": [  # one long document per row, then a row packed with documents of 200-1,800 tokens
        ("cli", _LONG + ["--doc-words", "200000", "200000"]),
        ("cli", _LONG + ["--doc-words", "200", "1800"]),
        ("peft", ["--max-seq-search", "--seq", "28672", "32768"]),
    ],
    "fp8-1b": [
        ("cli", _1B_CURVE),
        ("cli", _1B_CURVE + ["--quantize", "fp8", "--hlo-dump", "hlo-1b-fp8"]),
    ],
    "fp8-8b": [
        ("cli", _8B_SHORT),
        ("cli", _8B_SHORT + ["--quantize", "fp8"]),
        ("cli", _8B_MEMORY),
    ],
    "fp8-scaling": [("cli", _1B_CURVE + ["--quantize", "fp8", "--fp8-scaling", "tensor"])],
    "families": _family("qwen3-1.7b", "experiments/configs/qwen3-1.7b.yaml")
    + _family("gemma-3-1b", "experiments/configs/gemma-3-1b.yaml"),
}

SUITES["fp8"] = SUITES["fp8-1b"] + SUITES["fp8-8b"]

SCRIPTS = {
    "cli": os.path.join(_HERE, "cli_bench.py"),
    "jax": os.path.join(_HERE, "jax_bench.py"),
    "peft": os.path.join(_HERE, "peft_bench.py"),
}
JAX_ENV = {
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true"),
}


def run_one(side: str, args: list[str], log, timeout_s: float | None = None) -> list[dict]:
    env = dict(os.environ)
    if side in ("jax", "cli"):
        env.update(JAX_ENV)
        cap = os.environ.get("BENCH_MEMORY_GIB")  # both sides capped to the same memory
        if cap:
            total = (
                float(
                    subprocess.run(
                        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                        capture_output=True,
                        text=True,
                    ).stdout.split()[0]
                )
                / 1024
            )
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(float(cap) / total, 0.95):.4f}"
    cmd = [PY, SCRIPTS[side], *args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(
        cmd,
        cwd=_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
    if timer:
        timer.start()
    results = []
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
        log.write(line)
        if line.startswith("RESULT "):
            results.append(json.loads(line[7:]))
            print(line.rstrip(), flush=True)
    proc.wait()
    if timer:
        timer.cancel()
    if not results:
        print(f"no result (exit status {proc.returncode}); the end of its output is in log.txt", flush=True)
        results.append({"status": f"no result, exit {proc.returncode}", "args": args, "side": side})
    return results


def table(results: list[dict]) -> str:
    head = (
        "| system | mode | shape | batch x seq | packed | remat | tokens/s | MFU (798) | MFU (989) | MFU (FP8 1979) "
        "| peak GiB | compile s | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows, notes = [], []
    for r in results:
        if r.get("search") == "max_seq_summary":  # a search's verdict, not a measurement
            notes.append(
                f"{r.get('system')} {r.get('mode')}, {r.get('shape')}, batch {r.get('batch')}: "
                f"longest sequence that trains {r.get('max_seq')} (tried {r.get('tried')})"
            )
            continue
        f = lambda k, fmt: fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "-"
        if "system" not in r:  # a row that gave no result (skipped, crashed, stopped)
            rows.append(f"| {r.get('side')} | {' '.join(r.get('args', []))} |" + " - |" * 10 + f" {r.get('status')} |")
            continue
        if r.get("system") == "lora-jax train":
            mode = f"CLI, {r.get('config')}" + (f" {' '.join(r['overrides'])}" if r.get("overrides") else "")
            packed = f"yes ({r['doc_words'][0]}-{r['doc_words'][1]} tokens/doc)" if r.get("packed") else "no"
        else:
            mode = r.get("mode", "-") + (" +ckpt" if r.get("grad_ckpt") else "")
            packed = "no"
        batch = f"{r.get('batch')}" + (f" ({r['grad_accum']} micro)" if r.get("grad_accum", 1) > 1 else "")
        rows.append(
            f"| {r.get('system')} | {mode} | {r.get('shape')} | {batch} x {r.get('seq')} | {packed} | "
            f"{r.get('remat', r.get('grad_ckpt', '-'))} | {f('tokens_per_s', '{:,.0f}')} | "
            f"{f('mfu_798', '{:.3f}')} | {f('mfu_989', '{:.3f}')} | {f('mfu_1979', '{:.3f}')} | "
            f"{f('peak_gib', '{:.1f}')} | "
            f"{f('compile_s', '{:.1f}')} | {r.get('status', 'ok')} |"
        )
    notes += fp8_ratios(results)
    return head + "\n".join(rows) + "\n" + "".join(f"\n{n}\n" for n in notes)


def _bf16_key(r: dict) -> tuple:
    """What an FP8 row is compared on: the same shape, config and other overrides, without FP8."""
    rest = tuple(o for o in r.get("overrides", []) if not o.startswith("model.quantize="))
    return r.get("shape"), r.get("config"), rest, r.get("corpus")


def fp8_ratios(results: list[dict]) -> list[str]:
    """One line per FP8 CLI row with a bf16 row of the same settings in `results`: tokens/s ratio
    (loop and median step), MFU against the bf16 and FP8 peaks, peak memory, FP8 GEMMs counted."""
    bf16 = {_bf16_key(r): r for r in results if r.get("system") == "lora-jax train" and r.get("quantize") is None}
    lines = []
    for r in results:
        if r.get("quantize") != "fp8" or r.get("status") != "ok":
            continue
        calls = [c.get("__cublas$lt$matmul$f8", 0) for c in (r.get("hlo_calls") or {}).values()]
        proof = f"; {calls} FP8 GEMM calls (`__cublas$lt$matmul$f8`) in the compiled train step" if calls else ""
        mem = f"peak {r['peak_gib']:.1f} GiB" if isinstance(r.get("peak_gib"), (int, float)) else "peak -"
        mfu = ", ".join(f"MFU {r[k]:.3f} of {p}" for k, p in (("mfu_989", 989), ("mfu_1979", 1979)) if r.get(k))
        base = bf16.get(_bf16_key(r))
        head = f"FP8 {r.get('shape')} {r.get('batch')} x {r.get('seq')} ({r.get('remat')}, {r.get('fp8_scaling')})"
        if base and base.get("tokens_per_s") and r.get("tokens_per_s"):
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            med = ""
            if r.get("tokens_per_s_median_step") and base.get("tokens_per_s_median_step"):
                med = f", median step {r['tokens_per_s_median_step'] / base['tokens_per_s_median_step']:.3f}x"
            head += (
                f": {r['tokens_per_s']:,.0f} against bf16 {base['tokens_per_s']:,.0f} tokens/s = **{ratio:.3f}x**{med}"
            )
        else:
            head += f": {r.get('tokens_per_s') or 0:,.0f} tokens/s (no bf16 row of the same settings)"
        lines.append(f"{head}; {mfu}; {mem}{proof}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", default=["1b"], choices=sorted(SUITES))
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--only", choices=("cli", "jax", "peft"))
    p.add_argument("--row-timeout-s", type=float, help="stop a row (its process) after this many seconds")
    p.add_argument(
        "--start-before-s",
        type=float,
        help="start no row later than this many seconds after this script began (later ones are listed as skipped)",
    )
    p.add_argument(
        "--report", action="store_true", help="run nothing: the table of every row in --out-dir's results.jsonl"
    )
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.report:
        with open(os.path.join(args.out_dir, "results.jsonl")) as f:
            results = [json.loads(line) for line in f if line.strip()]
        print(f"All rows of {os.path.join(args.out_dir, 'results.jsonl')}\n\n" + table(results))
        return 0
    t0 = time.perf_counter()
    results = []
    with (
        open(os.path.join(args.out_dir, "log.txt"), "a") as log,
        open(os.path.join(args.out_dir, "results.jsonl"), "a") as out,
    ):
        for suite in args.suite:
            if suite == "long":  # both sides under the same 80 GB cap
                os.environ.setdefault("BENCH_MEMORY_GIB", "79.6")  # an H100 80GB's usable memory
            for side, side_args in SUITES[suite]:
                if args.only and side != args.only:
                    continue
                if args.start_before_s is not None and time.perf_counter() - t0 > args.start_before_s:
                    print(f"skipped (past --start-before-s {args.start_before_s:.0f}): {side} {' '.join(side_args)}")
                    rows = [{"status": "skipped (time budget)", "args": side_args, "side": side}]
                else:
                    rows = run_one(side, side_args, log, args.row_timeout_s)
                for r in rows:  # written as they come: a run stopped from outside keeps its rows
                    results.append(dict(r, suite=suite))
                    out.write(json.dumps(results[-1]) + "\n")
                    out.flush()
    md = f"Measured {datetime.date.today()} on {next((r.get('gpu') for r in results if r.get('gpu')), '?')}\n\n"
    md += table(results)
    with open(os.path.join(args.out_dir, "table.md"), "a") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
