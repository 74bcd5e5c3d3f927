"""lora_jax training-step throughput: the same code path users run.

Random bf16 weights of a benchmark shape are created on the device (no download), then the real
pieces run: `init_lora` (r=16, alpha=32, all seven projections), `split_trainable`, the optax
partition optimizer (AdamW), and `make_train_step` (interception, chunked cross-entropy, donation,
grads w.r.t. the trainable subtree only). Batches are pre-tokenised random ids already on device.

Each result is one line `RESULT {json}`; an out-of-memory config reports status "OOM".

    python experiments/bench/jax_bench.py --shape 1b --batch 8 --seq 2048
    python experiments/bench/jax_bench.py --shape 8b --batch 4 --seq 2048 --remat full
    python experiments/bench/jax_bench.py --shape 8b --batch 1 --remat full --seq 131072 114688
    python experiments/bench/jax_bench.py --shape 8b --batch 4 --seq 2048 --remat full --quantize nf4

With `--quantize nf4|int8` (QLoRA) the seven projections are made quantised, one layer at a time
(random bf16, quantised with `lora_jax.quant` on the device, the bf16 layer freed), so no
full-precision copy of them ever exists and peak memory is that of the QLoRA step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from shapes import get_shape  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax import flops  # noqa: E402
from lora_jax.train.step import init_state, make_schedule, make_train_step, make_tx  # noqa: E402

GIB = 2**30


def _versions() -> dict:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


def build(
    shape: str,
    remat: str,
    attention: str | None,
    scan: bool = True,
    quantize: str | None = None,
    fuse_wide: bool = True,
):
    cfg = lj.LlamaConfig.from_hf(
        get_shape(shape),
        dtype="bfloat16",
        param_dtype="bfloat16",
        scan_layers=scan,
        remat_policy=remat,
        attention=attention or "auto",
        fuse_wide_adapters=fuse_wide,
    )
    model = lj.Llama(cfg)
    init = lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]
    if quantize:
        return cfg, model, init_quantized(init, quantize, jax.random.key(0))
    params = jax.jit(init)(jax.random.key(0))
    return cfg, model, params


def init_quantized(init, kind: str, key):
    """Random params leaf by leaf; each projection kernel made and quantised one layer at a time
    (`lax.map`), so the device holds the quantised model plus one bf16 layer kernel, never the bf16
    projections (init N(0, 0.02) as the model's own initialisers; norms 1)."""
    import functools

    from flax import traverse_util

    from lora_jax import quant

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def quantized_leaf(k, shape, dtype):
        def one(kk):
            return quant.quantize((0.02 * jax.random.normal(kk, shape[-2:], jnp.float32)).astype(dtype), kind)

        if len(shape) == 2:
            return one(k)
        return jax.lax.map(one, jax.random.split(k, shape[0]))

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def plain_leaf(k, shape, dtype, ones):
        return jnp.ones(shape, dtype) if ones else (0.02 * jax.random.normal(k, shape, dtype)).astype(dtype)

    flat = traverse_util.flatten_dict(jax.eval_shape(init, key))
    out = {}
    for i, (path, sds) in enumerate(sorted(flat.items())):
        k = jax.random.fold_in(key, i)
        if quant.is_projection_kernel(path):
            out[path] = quantized_leaf(k, tuple(sds.shape), jnp.dtype(sds.dtype).name)
        else:
            out[path] = plain_leaf(k, tuple(sds.shape), jnp.dtype(sds.dtype).name, path[-1] == "scale")
        jax.block_until_ready(out[path])
    return traverse_util.unflatten_dict(out)


def measure(
    shape: str,
    batch: int,
    seq: int,
    remat: str,
    steps: int,
    warmup: int,
    attention: str | None,
    chunk: int,
    r: int = 16,
    variant: str = "lora",
    profile_dir: str | None = None,
    scan: bool = True,
    quantize: str | None = None,
    fuse_wide: bool = True,
    dropout: float = 0.0,
) -> dict:
    cfg, model, params = build(shape, remat, attention, scan, quantize, fuse_wide)
    base_gib = sum(x.nbytes for x in jax.tree.leaves(params)) / GIB
    if (
        variant == "nolora"
    ):  # the frozen model alone, full backward (only the per-layer input norms train): LoRA overhead
        lcfg = lj.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", modules_to_save=("input_layernorm",))
        lora = {}
    else:
        lcfg = lj.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=dropout)
        lora = lj.init_lora(params, lcfg, jax.random.key(1))
    split = lj.split_trainable(params, lora, lcfg)
    del params, lora
    ocfg = lj.OptimConfig(lr=1e-4, warmup_steps=0)
    schedule = make_schedule(ocfg, 1000)
    tx = make_tx(lcfg, ocfg, schedule)
    state = init_state(split.trainable, tx, 0)
    step = make_train_step(model, cfg, lcfg, tx, schedule, chunk_tokens=chunk, use_segments=False)
    key = jax.random.key(2)
    ids = jax.random.randint(key, (batch, seq), 0, cfg.vocab_size, jnp.int32)
    data = {
        "input_ids": ids,
        "targets": jnp.roll(ids, -1, axis=1),
        "loss_mask": jnp.ones((batch, seq), jnp.float32),
        "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
        "segment_ids": jnp.ones((batch, seq), jnp.int32),
    }
    t0 = time.perf_counter()
    state, m = step(state, split.frozen, data)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = step(state, split.frozen, data)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, split.frozen, data)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    kernels = profile(step, state, split.frozen, data, profile_dir) if profile_dir else None
    tps = batch * seq / med
    fpt = flops.flops_per_token(cfg, seq, r)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "system": "lora_jax",
        "mode": "jit",
        "shape": shape,
        "batch": batch,
        "seq": seq,
        "remat": remat,
        "attention": attention or "auto",
        "scan": scan,
        "fuse_wide": fuse_wide,
        "lora_dropout": dropout,
        "tokens_per_s": tps,
        "mfu_798": flops.mfu(tps, fpt, flops.PEAK_H100_MEASURED),
        "mfu_989": flops.mfu(tps, fpt, flops.PEAK_H100_DATASHEET),
        "peak_gib": stats.get("peak_bytes_in_use", 0) / GIB,
        "compile_s": compile_s,
        "step_ms_median": med * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "loss": float(m["loss"]),
        "flops_per_token": fpt,
        "steps": steps,
        "lora_r": r,
        "gpu": jax.devices()[0].device_kind,
        "status": "ok",
        "variant": variant,
        "quantize": quantize,
        "base_gib": base_gib,
        **_versions(),
        **({"kernels": kernels} if kernels else {}),
    }


def profile(step, state, frozen, data, out_dir: str, n: int = 3) -> dict:
    """Device time per kernel class over n steps, from a jax.profiler trace (no TensorBoard needed)."""
    import glob
    from collections import Counter

    from jax.profiler import ProfileData

    os.makedirs(out_dir, exist_ok=True)
    with jax.profiler.trace(out_dir):
        for _ in range(n):
            state, m = step(state, frozen, data)
        jax.block_until_ready(m["loss"])
    path = sorted(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    prof = ProfileData.from_file(path)
    by_name: Counter = Counter()
    for plane in prof.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            total = sum(ev.duration_ns for ev in line.events) / 1e6 / n
            print(f"PROFILE line {line.name!r}: {total:.2f} ms/step", flush=True)
            if not line.name.lower().startswith("stream"):
                continue
            for ev in line.events:
                by_name[ev.name] += ev.duration_ns / 1e6 / n
    classes: Counter = Counter()
    for name, ms in by_name.items():
        low = name.lower()
        key = (
            "attention(cudnn)"
            if ("cudnn" in low or "flash" in low or "fmha" in low or "sdpa" in low)
            else "gemm"
            if (
                "gemm" in low
                or "cublas" in low
                or "cutlass" in low
                or "sm90_xmma" in low
                or "nvjet" in low
                or "triton_gemm" in low
                or "dot" in low
            )
            else "memcpy"
            if "memcpy" in low or "memset" in low
            else "fusion/other"
        )
        classes[key] += ms
    top = by_name.most_common(25)
    print("PROFILE per step (ms):", json.dumps({k: round(v, 2) for k, v in classes.items()}), flush=True)
    for name, ms in top:
        print(f"PROFILE {ms:8.3f} ms  {name[:140]}", flush=True)
    return {
        "classes_ms": {k: round(v, 3) for k, v in classes.items()},
        "total_ms": round(sum(by_name.values()), 3),
        "top": [(n[:160], round(ms, 3)) for n, ms in top],
    }


def _is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, nargs="+", default=[2048])
    p.add_argument("--remat", default="none")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default="cudnn", help="cudnn | xla | auto")
    p.add_argument("--chunk", type=int, default=2048, help="cross-entropy chunk, tokens")
    p.add_argument(
        "--stop-at-first-ok",
        action="store_true",
        help="longest-context search: seqs given longest first; stop at the first that trains",
    )
    p.add_argument("--no-scan", action="store_true", help="unrolled layers (longer compile)")
    p.add_argument(
        "--no-fuse-wide",
        action="store_true",
        help="gate/up adapters beside the frozen matmul, not inside it (less peak memory)",
    )
    p.add_argument("--variant", default="lora", choices=("lora", "nolora"))
    p.add_argument("--profile-dir", help="also trace 3 steps and print device time per kernel")
    p.add_argument("--quantize", choices=("nf4", "int8"), help="QLoRA: a quantised frozen base")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (the shipped configs use 0.05)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    attention = None if args.attention == "auto" else args.attention
    for seq in args.seq:
        try:
            res = measure(
                args.shape,
                args.batch,
                seq,
                args.remat,
                args.steps,
                args.warmup,
                attention,
                args.chunk,
                variant=args.variant,
                profile_dir=args.profile_dir,
                scan=not args.no_scan,
                quantize=args.quantize,
                fuse_wide=not args.no_fuse_wide,
                dropout=args.dropout,
            )
        except Exception as e:  # noqa: BLE001 - report and go on to the next config
            status = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
            if status != "OOM":
                traceback.print_exc()
            res = {
                "system": "lora_jax",
                "shape": args.shape,
                "batch": args.batch,
                "seq": seq,
                "remat": args.remat,
                "quantize": args.quantize,
                "status": status,
            }
        line = json.dumps(res)
        print("RESULT " + line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        jax.clear_caches()
        if args.stop_at_first_ok and res["status"] == "ok":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
