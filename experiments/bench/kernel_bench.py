"""Profiling aids for two choices of the train step, each timed alone on the GPU.

- Attention, one layer forward + backward over packed rows (bf16, causal within documents): the
  XLA reference with a dense mask, the Pallas Triton kernel with segment ids, cuDNN causal on
  unpacked rows, and cuDNN's packed (ragged) path; each checked against the reference.
- LoRA dropout masks: drawing a `[tokens, features]` keep-mask with each PRNG implementation.
- `dropout(x) @ A` forward + backward (bf16, rank 16) at each of `--dropout-features`: the XLA path,
  the fused Pallas kernels (at a few tile sizes, and with dx left to XLA), and no dropout (`x @ A`,
  the floor); the kernels are first checked against the XLA path and an fp32 reference.

    python experiments/bench/kernel_bench.py --batch 8 --seq 2048 --heads 32 --kv-heads 8 --head-dim 64
    python experiments/bench/kernel_bench.py --only dropout_project
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lora_jax.lora import dropout_kernel  # noqa: E402
from lora_jax.lora.dropout import dropout_keep_mask, dropout_project, dropout_project_xla  # noqa: E402
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


def bench_dropout_project(args) -> list[dict]:
    """Forward + backward of `dropout(x) @ A` per implementation, and the forward alone for the
    main three. Off a GPU the kernels run in interpret mode (a smoke run of this script)."""
    interpret = jax.default_backend() != "gpu"
    tokens, r, rate = args.batch * args.seq, args.rank, 0.05
    key = jax.random.key(0)
    out: list[dict[str, Any]] = []

    def fwd_bwd(project):
        def run(x, a, g):
            y, vjp = jax.vjp(lambda x, a: project(x, a, key, jnp.float32(rate)), x, a)
            return (y, *vjp(g))

        return jax.jit(run)

    def fwd(project):
        return jax.jit(lambda x, a: project(x, a, key, jnp.float32(rate)))

    plain = lambda x, a, key, rate: x @ a
    fused = lambda blocks=None, fuse_dx=True: (
        lambda x, a, key, rate: dropout_kernel.dropout_project_fused(x, a, key, rate, blocks, interpret, fuse_dx)
    )
    for feat in (int(f) for f in args.dropout_features.split(",")):
        ks = jax.random.split(jax.random.key(1), 3)
        x = jax.random.normal(ks[0], (tokens, feat), jnp.bfloat16)
        a = (jax.random.normal(ks[1], (feat, r)) / feat**0.5).astype(jnp.bfloat16)
        g = jax.random.normal(ks[2], (tokens, r), jnp.bfloat16)
        base: dict[str, Any] = {"bench": "dropout_project", "shape": [tokens, feat, r], "rate": rate}
        default = dropout_kernel.blocks_for(tokens, feat)
        dispatched = "pallas_call" in str(jax.make_jaxpr(lambda x, a: dropout_project(x, a, key, rate))(x, a))
        print(json.dumps({**base, "blocks": default._asdict(), "dropout_project_takes_pallas": dispatched}))

        variants = [
            ("xla dropout_project_xla", fwd_bwd(dropout_project_xla), "fwd+bwd"),
            (f"pallas fused {tuple(default)}", fwd_bwd(fused()), "fwd+bwd"),
            ("pallas fused, dx in xla", fwd_bwd(fused(fuse_dx=False)), "fwd+bwd"),
        ]
        for alt in (default._replace(tokens=128, num_warps=8), default._replace(features=64)):
            variants.append((f"pallas fused {tuple(alt)}", fwd_bwd(fused(alt)), "fwd+bwd"))
        variants += [
            ("no dropout (x @ A)", fwd_bwd(plain), "fwd+bwd"),
            ("xla dropout_project_xla", fwd(dropout_project_xla), "fwd"),
            (f"pallas fused {tuple(default)}", fwd(fused()), "fwd"),
            ("no dropout (x @ A)", fwd(plain), "fwd"),
        ]

        # correctness first: y, dx, dA of the kernels and of the XLA path against fp32
        f32 = [v.astype(jnp.float32) for v in (x, a, g)]
        with jax.default_matmul_precision("highest"):
            ref = fwd_bwd(dropout_project_xla)(*f32)
        xla_vals = variants[0][1](x, a, g)
        try:
            ours = variants[1][1](x, a, g)
            err = lambda u, v: float(jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32))))
            names = ("y", "dx", "dA")
            check = {
                "max_abs_err_vs_xla": {n: err(o, e) for n, o, e in zip(names, ours, xla_vals)},
                "max_abs_err_vs_fp32": {n: err(o, e) for n, o, e in zip(names, ours, ref)},
                "xla_max_abs_err_vs_fp32": {n: err(o, e) for n, o, e in zip(names, xla_vals, ref)},
                "max_abs_fp32": {n: float(jnp.max(jnp.abs(e))) for n, e in zip(names, ref)},
            }
            out.append({**base, "impl": "check pallas vs xla", **check})
        except Exception as e:
            out.append({**base, "impl": "check pallas vs xla", "error": f"{type(e).__name__}: {e}"[:600]})
        print(json.dumps(out[-1]), flush=True)
        del ref, f32

        floor: dict[str, float] = {}
        for name, f, what in variants:
            try:
                ms = timeit(f, x, a, g) if what == "fwd+bwd" else timeit(f, x, a)
                if name.startswith("no dropout"):
                    floor[what] = ms
                out.append({**base, "impl": name, "pass": what, "ms": ms})
            except Exception as e:
                out.append({**base, "impl": name, "pass": what, "error": f"{type(e).__name__}: {e}"[:600]})
            print(json.dumps(out[-1]), flush=True)
        for row in out:
            if row.get("shape") == base["shape"] and "ms" in row and row["pass"] in floor:
                row["over_floor_ms"] = row["ms"] - floor[row["pass"]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--only", choices=("attention", "dropout", "dropout_project"))
    p.add_argument("--rank", type=int, default=16, help="dropout_project: the adapter rank")
    p.add_argument("--dropout-features", default="2048,8192", help="dropout_project: input widths")
    args = p.parse_args(argv)
    results = []
    if args.only in (None, "attention"):
        results += bench_attention(args)
    if args.only in (None, "dropout"):
        results += bench_dropout(args)
    if args.only in (None, "dropout_project"):
        results += bench_dropout_project(args)
    for r in results:
        print("RESULT " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
