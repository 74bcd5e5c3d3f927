"""One command for the GPU comparison: lora_jax and transformers + PEFT on the same GPU, same shape,
batch, rank (16), alpha (32), targets (all seven projections), AdamW, random bf16 weights.

Each side runs in its own process (JAX and PyTorch would otherwise compete for device memory);
the results are gathered into `results.jsonl` and a Markdown table.

    python experiments/bench/run.py --suite 1b        # 1B shape, 8 x 2048, no remat
    python experiments/bench/run.py --suite 8b        # 8B shape, 4 x 2048, remat (ours: save_qkv)
    python experiments/bench/run.py --suite long      # 8B shape, batch 1, remat: longest sequence
                                                      # (ours with --no-fuse-wide: least memory)
    python experiments/bench/run.py --suite 1b 8b long --out-dir bench_out
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable

SUITES = {
    "1b": [
        ("jax", ["--shape", "1b", "--batch", "8", "--seq", "2048", "--remat", "none", "--no-scan"]),
        ("peft", ["--shape", "1b", "--batch", "8", "--seq", "2048", "--mode", "eager", "compile"]),
    ],
    "8b": [
        ("jax", ["--shape", "8b", "--batch", "4", "--seq", "2048", "--remat", "save_qkv"]),
        ("peft", ["--shape", "8b", "--batch", "4", "--seq", "2048", "--mode", "eager", "--grad-ckpt"]),
    ],
    "long": [
        ("jax", ["--shape", "8b", "--batch", "1", "--remat", "full", "--steps", "1", "--warmup", "0",
                 "--no-fuse-wide", "--stop-at-first-ok", "--seq", "147456", "139264", "131072"]),
        ("peft", ["--max-seq-search", "--seq", "32768", "36864"]),
    ],
}

SCRIPTS = {"jax": os.path.join(_HERE, "jax_bench.py"), "peft": os.path.join(_HERE, "peft_bench.py")}
JAX_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")}


def run_one(side: str, args: list[str], log) -> list[dict]:
    env = dict(os.environ)
    if side == "jax":
        env.update(JAX_ENV)
        cap = os.environ.get("BENCH_MEMORY_GIB")  # both sides capped to the same memory
        if cap:
            total = float(subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True).stdout.split()[0]) / 1024
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(float(cap) / total, 0.95):.4f}"
    cmd = [PY, SCRIPTS[side], *args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    results = []
    for line in proc.stdout:
        log.write(line)
        if line.startswith("RESULT "):
            results.append(json.loads(line[7:]))
            print(line.rstrip(), flush=True)
    proc.wait()
    return results


def table(results: list[dict]) -> str:
    head = ("| system | mode | shape | batch x seq | remat | tokens/s | MFU (798) | MFU (989) | peak GiB "
            "| compile s | status |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows, notes = [], []
    for r in results:
        if r.get("search") == "max_seq_summary":  # a search's verdict, not a measurement
            notes.append(f"{r.get('system')} {r.get('mode')}, {r.get('shape')}, batch {r.get('batch')}: "
                         f"longest sequence that trains {r.get('max_seq')} (tried {r.get('tried')})")
            continue
        f = lambda k, fmt: (fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "-")
        mode = r.get("mode", "-") + (" +ckpt" if r.get("grad_ckpt") else "")
        rows.append(f"| {r.get('system')} | {mode} | {r.get('shape')} | {r.get('batch')} x {r.get('seq')} | "
                    f"{r.get('remat', r.get('grad_ckpt', '-'))} | {f('tokens_per_s', '{:,.0f}')} | "
                    f"{f('mfu_798', '{:.3f}')} | {f('mfu_989', '{:.3f}')} | {f('peak_gib', '{:.1f}')} | "
                    f"{f('compile_s', '{:.1f}')} | {r.get('status', 'ok')} |")
    return head + "\n".join(rows) + "\n" + "".join(f"\n{n}\n" for n in notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", default=["1b"], choices=sorted(SUITES))
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--only", choices=("jax", "peft"))
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    results = []
    with open(os.path.join(args.out_dir, "log.txt"), "a") as log:
        for suite in args.suite:
            for side, side_args in SUITES[suite]:
                if args.only and side != args.only:
                    continue
                results += [dict(r, suite=suite) for r in run_one(side, side_args, log)]
    with open(os.path.join(args.out_dir, "results.jsonl"), "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    md = f"Measured {datetime.date.today()} on {next((r.get('gpu') for r in results if r.get('gpu')), '?')}\n\n"
    md += table(results)
    with open(os.path.join(args.out_dir, "table.md"), "a") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
