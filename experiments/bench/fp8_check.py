"""Is the FP8 base's GEMM really FP8 on this GPU, and does it pay? (issue #21)

(a) Reads the compiled HLO of `fp8_matmul` forward + input gradient, of `lora_dense` on an FP8
    kernel, and of the bf16 reference, and counts the GEMM custom calls by target: the FP8 path must
    show cuBLASLt FP8 calls (`__cublas$lt$matmul$f8`), two per projection (forward, input
    gradient), and no dequantise-then-bf16 GEMM.
(b) Times, at the Llama-3.2-1B projection shapes (16384 tokens = 8 x 2048), forward + input
    gradient of `fp8_matmul` (x and dy scaled per row, and per tensor: `scaling="tensor"`, whose
    scalar scales the GEMM rewriter can fold into the cuBLASLt call) against bf16 `x @ w`, and the
    bare FP8 GEMM with the weight stored as [out, in] ("TN": both operands contract their minor
    axis, the layout `Fp8Kernel` stores) and as [in, out] ("NN"): what the layout and the scaling
    cost. Median of 20 after warm-up.

    python experiments/bench/fp8_check.py                 # on the GPU
    python experiments/bench/fp8_check.py --small         # smoke test on the CPU (FP8 emulated)

FLOP/s count 2*M*K*N per GEMM (forward + input gradient: two GEMMs; no weight gradient: frozen).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lora_jax.fp8 import E4M3, fp8_matmul, quantize_fp8, quantize_rows  # noqa: E402
from lora_jax.lora.kernel import lora_dense  # noqa: E402

SHAPES = [(16384, 2048, 2048), (16384, 2048, 8192), (16384, 8192, 2048)]  # tokens, in, out
SMALL = [(64, 32, 32), (64, 32, 128), (64, 128, 32)]
F8_CALL = "__cublas$lt$matmul$f8"


def calls(f, *args, dump: str | None = None) -> collections.Counter:
    """Custom-call targets (and plain `dot` ops) in the compiled HLO of `jax.jit(f)(*args)`;
    `dump`: also write that HLO text to this file."""
    text = jax.jit(f).lower(*args).compile().as_text() or ""
    if dump:
        with open(dump, "w") as fh:
            fh.write(text)
    found = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    dots = len(re.findall(r"= \S+ dot\(", text))
    if dots:
        found["dot (not a library call)"] = dots
    return found


def timeit(f, *args, n: int = 20) -> float:
    """Median milliseconds per call of `f(*args)`, over `n` trials of 10 calls dispatched back to
    back (so that host dispatch overlaps the GPU), after warm-up."""
    for _ in range(3):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        for _ in range(10):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / 10)
    return statistics.median(times) * 1e3


@jax.custom_vjp
def fp8_rowwise(x, kern):
    """The first recipe, for comparison: as `fp8_matmul`, but both GEMMs write fp32 (the epilogue
    then reads 4 bytes per element, not 2)."""
    xq, sx = quantize_rows(x, E4M3)
    acc = jax.lax.dot_general(xq, kern.codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (acc * sx * kern.scale).astype(x.dtype)


def _rowwise_bwd(kern, dy):
    gq, sg = quantize_rows(dy.astype(jnp.float32) * kern.scale, E4M3)
    dx = jax.lax.dot_general(gq, kern.codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (dx * sg).astype(dy.dtype), None


fp8_rowwise.defvjp(lambda x, kern: (fp8_rowwise(x, kern), kern), _rowwise_bwd)


def fwd_bwd(mm):
    """x, dy -> (y, dx) of `mm(x)`: forward and input gradient, what a frozen projection runs."""

    def run(x, dy, *w):
        y, vjp = jax.vjp(lambda x: mm(x, *w), x)
        return y, vjp(dy)[0]

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test)")
    p.add_argument("--steps", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--dump", help="a directory: write the compiled HLO of the largest shape's programs there")
    args = p.parse_args(argv)
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}")
    shapes = SMALL if args.small else SHAPES
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in shapes:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        dy = jnp.asarray(rng.standard_normal((m, n)) * 1e-3, jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, jnp.bfloat16)
        kern = quantize_fp8(w)
        kern = type(kern)(kern.codes, kern.scale, kern.spec._replace(gemm=True))  # FP8 even where emulated
        kern_t = type(kern)(kern.codes, kern.scale, kern.spec._replace(scaling="tensor"))  # one scale per tensor
        a = jnp.asarray(rng.standard_normal((k, 16)) * 0.01, jnp.bfloat16)
        b = jnp.asarray(rng.standard_normal((16, n)) * 0.01, jnp.bfloat16)

        bf16 = jax.jit(fwd_bwd(lambda x, w: x @ w))
        f8 = jax.jit(fwd_bwd(fp8_matmul))
        f8_rows = jax.jit(fwd_bwd(fp8_rowwise))
        lora = fwd_bwd(lambda x, kern, a, b: lora_dense(x, kern, a, b, 2.0))
        xq, _ = quantize_rows(x, E4M3)
        tn = jax.jit(
            lambda xq, c: jax.lax.dot_general(xq, c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)
        )
        nn_ = jax.jit(lambda xq, c: jnp.matmul(xq, c, preferred_element_type=jnp.bfloat16))
        codes_nn = jnp.asarray(kern.codes.T)  # [in, out]

        dump = (lambda name: os.path.join(args.dump, f"{name}_{m}x{k}x{n}.hlo.txt")) if args.dump else (lambda _: None)
        counts = {
            "fp8_matmul": calls(f8, x, dy, kern, dump=dump("fp8_matmul")),
            "fp8_matmul(tensor)": calls(f8, x, dy, kern_t, dump=dump("fp8_matmul_tensor")),
            "lora_dense(fp8)": calls(lora, x, dy, kern, a, b, dump=dump("lora_dense_fp8") if k > n else None),
            "bf16": calls(bf16, x, dy, w),
        }
        for name, c in counts.items():
            print(f"[{m}x{k}]x[{k}x{n}] {name}: {dict(c)}")
        y8, dx8 = f8(x, dy, kern)
        y8t, dx8t = f8(x, dy, kern_t)
        y16, dx16 = bf16(x, dy, w)
        rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
        ms = {
            "bf16": timeit(bf16, x, dy, w, n=args.steps),
            "fp8": timeit(f8, x, dy, kern, n=args.steps),
            "fp8_tensor": timeit(f8, x, dy, kern_t, n=args.steps),
            "fp8_rowwise_dy": timeit(f8_rows, x, dy, kern, n=args.steps),
            "lora_fp8": timeit(jax.jit(lora), x, dy, kern, a, b, n=args.steps),
            "gemm_tn": timeit(tn, xq, kern.codes, n=args.steps),
            "gemm_nn": timeit(nn_, xq, codes_nn, n=args.steps),
        }
        flop = 2.0 * m * k * n
        row: dict[str, Any] = {
            "shape": [m, k, n],
            "f8_calls_fp8_matmul": counts["fp8_matmul"][F8_CALL],
            "f8_calls_fp8_tensor": counts["fp8_matmul(tensor)"][F8_CALL],
            "f8_calls_lora_dense": counts["lora_dense(fp8)"][F8_CALL],
            "calls": {name: dict(c) for name, c in counts.items()},
            "ms": ms,
            "tflops": {
                name: (1 if name.startswith("gemm") else 2) * flop / (t * 1e-3) / 1e12 for name, t in ms.items()
            },
            "rel_err_y": rel(y8, y16),
            "rel_err_dx": rel(dx8, dx16),
            "rel_err_y_tensor": rel(y8t, y16),
            "rel_err_dx_tensor": rel(dx8t, dx16),
        }
        rows.append(row)
    print()
    names = ("bf16", "fp8", "fp8_tensor", "fp8_rowwise_dy", "lora_fp8", "gemm_tn", "gemm_nn")
    print(
        "| tokens x in x out | f8 calls (fp8_matmul row / tensor / lora_dense) | bf16 fwd+dx | fp8_matmul fwd+dx "
        "| fp8_matmul, per-tensor scaling | first recipe (fp32 outputs) | lora_dense fp8 "
        "| bare fp8 GEMM, w [out, in] | bare fp8 GEMM, w [in, out] | rel err y / dx (row; tensor) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, ms = r["tflops"], r["ms"]
        cell = lambda name: f"{ms[name]:.3f} ms ({t[name]:.0f} TF/s)"
        timed = " | ".join(cell(name) for name in names)
        print(
            f"| {'x'.join(map(str, r['shape']))} | {r['f8_calls_fp8_matmul']} / {r['f8_calls_fp8_tensor']} / "
            f"{r['f8_calls_lora_dense']} | {timed} | {r['rel_err_y']:.4f} / {r['rel_err_dx']:.4f}; "
            f"{r['rel_err_y_tensor']:.4f} / {r['rel_err_dx_tensor']:.4f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "rows": rows}, f, indent=2)
    on_gpu = device.platform == "gpu"
    if on_gpu and not all(r["f8_calls_fp8_matmul"] >= 2 for r in rows):
        print(f"FAIL: fewer than 2 {F8_CALL} calls per fp8_matmul forward + input gradient")
        return 1
    if on_gpu and not all(r["f8_calls_fp8_tensor"] >= 2 for r in rows):
        print(f"NOTE: the per-tensor recipe's GEMMs were not all rewritten to {F8_CALL} (see its calls above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
