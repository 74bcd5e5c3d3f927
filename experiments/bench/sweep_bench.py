"""GPU throughput of a K-adapter sweep (one compiled program, base held once) against single runs.

Per adapter-token: a K=4 sweep at batch B/4 does the work of one single run at batch B, so the
figure to compare is the sweep's aggregate tokens/s (K x B/4 x seq / step time) with the single
run's tokens/s at batch B (same shape, same code path: `lora_jax.sweep.make_sweep_step`).

    python experiments/bench/sweep_bench.py --shape 1b --k 4 --batch 8 --seq 2048 --no-scan
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax_bench import build  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.config import OptimConfig  # noqa: E402
from lora_jax.sweep import init_stacked, make_sweep_step  # noqa: E402
from lora_jax.train.step import init_state, make_schedule, make_tx  # noqa: E402


def _batch(vocab, batch, seq):
    ids = jax.random.randint(jax.random.key(2), (batch, seq), 0, vocab, jnp.int32)
    return {
        "input_ids": ids,
        "targets": jnp.roll(ids, -1, axis=1),
        "loss_mask": jnp.ones((batch, seq), jnp.float32),
        "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
        "segment_ids": jnp.ones((batch, seq), jnp.int32),
    }


def measure(shape, k, batch, seq, remat, scan, steps=8, chunk=2048):
    cfg, model, params = build(shape, remat, "cudnn" if jax.default_backend() == "gpu" else None, scan)
    ocfg = OptimConfig(lr=1e-4)
    lcfgs = [lj.LoraConfig(r=16, lora_alpha=a, target_modules="all-linear") for a in (8, 16, 32, 64)[:k]]
    trainable, frozen_lora, _, base = init_stacked(params, lcfgs, 0)
    del params
    tx = make_tx(lcfgs[0], ocfg, make_schedule(ocfg, 1000))
    state = jax.vmap(lambda t, s: init_state(t, tx, 0)._replace(rng=s))(
        trainable, jnp.stack([jax.random.key_data(jax.random.key(0))] * k)
    )
    hyper = {"lr": jnp.full((k,), 1e-4), "weight_decay": jnp.zeros((k,)), "lora_dropout": jnp.zeros((k,))}
    step = make_sweep_step(model, cfg, lcfgs[0], ocfg, 1000, chunk_tokens=chunk, use_segments=False)
    data = _batch(cfg.vocab_size, batch // k, seq)
    t0 = time.perf_counter()
    state, m = step(state, base, frozen_lora, hyper, data)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, base, frozen_lora, hyper, data)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "system": "lora_jax-sweep",
        "shape": shape,
        "k": k,
        "batch_per_adapter": batch // k,
        "seq": seq,
        "adapter_tokens_per_s": k * (batch // k) * seq / med,
        "step_ms_median": med * 1e3,
        "compile_s": compile_s,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "traces": step.traces,
        "loss": np.asarray(m["loss"]).tolist(),
        "gpu": jax.devices()[0].device_kind,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="total sequences per step (split over K)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--remat", default="none")
    p.add_argument("--no-scan", action="store_true")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    for k in (1, args.k):
        res = measure(args.shape, k, args.batch, args.seq, args.remat, not args.no_scan, args.steps)
        print("RESULT " + json.dumps(res), flush=True)
        jax.clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
