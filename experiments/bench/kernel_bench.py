"""Profiling aids for two choices of the train step, each timed alone on the GPU.

- Attention, one layer forward + backward over packed rows (bf16, causal within documents): the
  XLA reference with a dense mask, the Pallas Triton kernel with segment ids, cuDNN causal on
  unpacked rows, and cuDNN's packed (ragged) path; each checked against the reference.
- LoRA dropout masks: drawing a `[tokens, features]` keep-mask with each PRNG implementation.

    python experiments/bench/kernel_bench.py --batch 8 --seq 2048 --heads 32 --kv-heads 8 --head-dim 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lora_jax.lora.dropout import dropout_keep_mask  # noqa: E402
from lora_jax.models.attention import _cudnn_packed, attention, segments_per_row  # noqa: E402


def timeit(f, *args, n=20) -> float:
    out = f(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def packed_segment_ids(b, t, rng, lo=200, hi=1800):
    rows = []
    for _ in range(b):
        row, s = [], 1
        while len(row) < t:
            n = int(rng.integers(lo, hi + 1))
            row += [s] * n
            s += 1
        rows.append(row[:t])
    return jnp.asarray(rows, jnp.int32)


def bench_attention(args) -> list[dict]:
    b, t, n, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, n, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, kv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, kv, d), jnp.bfloat16)
    w = jax.random.normal(ks[3], (b, t, n, d), jnp.bfloat16)
    seg = packed_segment_ids(b, t, np.random.default_rng(0))

    bound = segments_per_row([{"segment_ids": np.asarray(r)} for r in seg])
    print(f"segments per row (bound): {bound}", flush=True)

    def fwd_bwd(impl, segs):
        if impl in ("cudnn rows", "cudnn flat"):
            attn = lambda q, k, v: _cudnn_packed(q, k, v, segs, 1 / d**0.5, bound, impl.endswith("flat"))
        else:
            attn = lambda q, k, v: attention(q, k, v, segs, implementation=impl, max_segments=bound)

        def loss(q, k, v):
            return jnp.sum((w * attn(q, k, v)).astype(jnp.float32))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    ref_val, ref_g = fwd_bwd("xla", seg)(q, k, v)
    rel = lambda a, r: float(jnp.linalg.norm((a - r).astype(jnp.float32)) / jnp.linalg.norm(r.astype(jnp.float32)))
    out = []
    for name, impl, segs in [
        ("xla dense mask, packed", "xla", seg),
        ("pallas triton, packed", "pallas", seg),
        ("cudnn causal, unpacked", "cudnn", None),
        ("cudnn packed, per-row offsets", "cudnn rows", seg),
        ("cudnn packed, batch flattened", "cudnn flat", seg),
    ]:
        try:
            f = fwd_bwd(impl, segs)
            ms = timeit(f, q, k, v)
            val, g = f(q, k, v)
            err = max(rel(a, r) for a, r in zip(g, ref_g)) if segs is not None else None
            out.append(
                {
                    "bench": "attention",
                    "impl": name,
                    "ms": ms,
                    "grad_rel_err": err,
                    "nan": bool(any(jnp.isnan(x).any() for x in g)),
                }
            )
        except Exception as e:  # a kernel the platform lacks is a row, not a crash
            out.append({"bench": "attention", "impl": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(out[-1]), flush=True)
    return out


def bench_dropout(args) -> list[dict]:
    tokens = args.batch * args.seq
    out = []
    for feat in (2048, 8192):
        x = jax.random.normal(jax.random.key(1), (tokens, feat), jnp.bfloat16)

        @jax.jit
        def ours(key, x):
            keep, keep_p = dropout_keep_mask(key, 0.05, x.shape)
            return jnp.where(keep, x / keep_p.astype(x.dtype), 0).astype(x.dtype)

        ms = timeit(ours, jax.random.key(0), x)
        out.append(
            {
                "bench": "dropout",
                "impl": "lora_jax dropout_keep_mask",
                "shape": [tokens, feat],
                "ms": ms,
                "drop_rate": 1 - float(jnp.mean(ours(jax.random.key(0), x) != 0)),
            }
        )
        print(json.dumps(out[-1]), flush=True)
        for impl in ("threefry2x32", "philox4x32", "rbg"):
            try:
                key = jax.random.key(0, impl=impl)

                @jax.jit
                def drop(key, x):
                    keep = jax.random.bernoulli(key, 0.95, x.shape)
                    return jnp.where(keep, x / 0.95, 0).astype(x.dtype)

                @jax.jit
                def drop16(key, x):  # two 16-bit draws from each 32-bit word
                    bits = jax.random.bits(key, (x.size // 2,), jnp.uint32)
                    u16 = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(x.shape)
                    return jnp.where(u16 >= 3277, x / 0.95, 0).astype(x.dtype)

                for name, f in ((impl, drop), (impl + " 16-bit", drop16)):
                    ms = timeit(f, key, x)
                    rate = 1 - float(jnp.mean(f(key, x) != 0))
                    out.append({"bench": "dropout", "impl": name, "shape": [tokens, feat], "ms": ms, "drop_rate": rate})
                    print(json.dumps(out[-1]), flush=True)
            except Exception as e:
                out.append({"bench": "dropout", "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})
                print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--only", choices=("attention", "dropout"))
    args = p.parse_args(argv)
    results = []
    if args.only != "dropout":
        results += bench_attention(args)
    if args.only != "attention":
        results += bench_dropout(args)
    for r in results:
        print("RESULT " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
