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
    python experiments/bench/run.py --suite 1b 8b long --out-dir bench_out
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import yaml

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
PY = sys.executable

_1B = ["--shape", "1b", "--config", "experiments/configs/llama-3.2-1b.yaml", "--steps", "30"]
_8B = ["--shape", "8b", "--config", "experiments/configs/llama-3-8b.yaml", "--steps", "8"]
_LONG = ["--shape", "8b", "--config", "experiments/configs/llama-3-8b-long.yaml", "--steps", "3"]


def _family(shape: str, config: str, steps: int = 30) -> list[tuple[str, list[str]]]:
    """`lora-jax train` with a family's shipped config beside PEFT (eager and torch.compile) at the
    config's own batch x seq (Qwen3-1.7B 8 x 2048; Gemma-3-1B 32 x 512, its sliding window)."""
    with open(os.path.join(_ROOT, config)) as f:
        cfg = yaml.safe_load(f)
    batch, seq = cfg["train"]["batch_size"], cfg["data"]["seq_len"]
    return [
        ("cli", ["--shape", shape, "--config", config, "--steps", str(steps)]),
        ("peft", ["--shape", shape, "--batch", str(batch), "--seq", str(seq), "--mode", "eager", "compile"]),
    ]


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
    "families": _family("qwen3-1.7b", "experiments/configs/qwen3-1.7b.yaml")
    + _family("gemma-3-1b", "experiments/configs/gemma-3-1b.yaml"),
}

SCRIPTS = {
    "cli": os.path.join(_HERE, "cli_bench.py"),
    "jax": os.path.join(_HERE, "jax_bench.py"),
    "peft": os.path.join(_HERE, "peft_bench.py"),
}
JAX_ENV = {
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true"),
}


def run_one(side: str, args: list[str], log) -> list[dict]:
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
    results = []
    for line in proc.stdout:
        log.write(line)
        if line.startswith("RESULT "):
            results.append(json.loads(line[7:]))
            print(line.rstrip(), flush=True)
    proc.wait()
    return results


def table(results: list[dict]) -> str:
    head = (
        "| system | mode | shape | batch x seq | packed | remat | tokens/s | MFU (798) | MFU (989) "
        "| peak GiB | compile s | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
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
            f"{f('mfu_798', '{:.3f}')} | {f('mfu_989', '{:.3f}')} | {f('peak_gib', '{:.1f}')} | "
            f"{f('compile_s', '{:.1f}')} | {r.get('status', 'ok')} |"
        )
    return head + "\n".join(rows) + "\n" + "".join(f"\n{n}\n" for n in notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", default=["1b"], choices=sorted(SUITES))
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--only", choices=("cli", "jax", "peft"))
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    results = []
    with open(os.path.join(args.out_dir, "log.txt"), "a") as log:
        for suite in args.suite:
            if suite == "long":  # both sides under the same 80 GB cap
                os.environ.setdefault("BENCH_MEMORY_GIB", "79.6")  # an H100 80GB's usable memory
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
