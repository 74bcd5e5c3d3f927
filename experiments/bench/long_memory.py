"""Peak memory of one long-context LoRA train step, read off the compiled program, no weights needed.

The library's own train step (`lora_jax.train.step.make_train_step`: LoRA through the interceptor,
chunked cross-entropy, AdamW) is lowered on abstract arguments (`jax.ShapeDtypeStruct`s) and compiled;
XLA's buffer assignment (`compiled.memory_analysis()`) then says how many bytes of arguments,
temporaries and host memory the step needs. Nothing is allocated, so the 8B shape at 131,072 tokens
compiles on any machine; the figures are the compiler's, for the platform it compiles for.

    # on the GPU (the real attention kernel: cuDNN / Pallas)
    python experiments/bench/long_memory.py --shape 8b --seq 131072 --remat full offload
    python experiments/bench/long_memory.py --shape 8b --seq 131072 --remat offload --packed 200
    # on the CPU: a scaled-down proportional shape; attention by an O(t) stand-in (see below)
    python experiments/bench/long_memory.py --shape small --seq 8192 --remat full offload

On the CPU, `model.attention` can only be "xla", which keeps `[t, t]` scores and would swamp every
other figure, so by default there (`--stand-in-attention`) attention is replaced by an elementwise
stand-in with a flash kernel's footprint: it keeps q, k, v, its output and a `[b, heads, t]` fp32
statistic for the backward pass, and nothing of size t^2. Prints one `RESULT {json}` line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.models import llama as llama_module  # noqa: E402
from lora_jax.run_config import OptimConfig  # noqa: E402
from lora_jax.train.step import init_state, make_schedule, make_train_step, make_tx  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # Meta-Llama-3-8B
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    # 8B's proportions at 1/16 the width (run it at 1/16 the tokens: every activation is 1/256 of
    # 8B's): intermediate / hidden 3.5, 32 layers, head_dim 128, 4 heads per kv head, and a
    # vocabulary that makes an LM-head chunk of 2,048 tokens as large beside a layer input
    "small": dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=896,
        num_hidden_layers=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
    ),
}


@jax.custom_vjp
def _stand_in(q, k, v):
    return _stand_in_fwd(q, k, v)[0]


def _expand(q, x):
    return jnp.repeat(x, q.shape[2] // x.shape[2], axis=2)


def _stand_in_fwd(q, k, v):
    out = (jnp.tanh(q * _expand(q, k)) * _expand(q, v)).astype(q.dtype)
    lse = jnp.sum(q.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [b, heads, t], as flash keeps
    return out, (q, k, v, out, lse)


def _stand_in_bwd(res, g):
    q, k, v, _, lse = res
    ke, ve = _expand(q, k), _expand(q, v)
    th = jnp.tanh(q * ke)
    d = g * ve * (1 - th * th) + 0 * lse.transpose(0, 2, 1)[..., None].astype(q.dtype)
    fold = lambda x: x.reshape(x.shape[:2] + (k.shape[2], -1) + x.shape[3:]).sum(3)
    return (d * ke).astype(q.dtype), fold(d * q).astype(k.dtype), fold(g * th).astype(v.dtype)


_stand_in.defvjp(_stand_in_fwd, _stand_in_bwd)


def stand_in_attention(q, k, v, segment_ids=None, **_):
    """O(t) memory, flash-like residuals; not attention (for memory figures only)."""
    return _stand_in(q, k, v)


def stacked_residuals(jaxpr, layers: int, seq: int) -> dict[str, int]:
    """Bytes, by memory space, of what the layer scan stacks per layer for the backward pass: the
    outputs `[layers, ..., seq, ...]` of every scan of `layers` steps in the step's program. (The CPU
    compiles a host offload to nothing, so its memory analysis cannot show one; this can.)"""
    found: dict[str, int] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == layers:
            for v in eqn.outvars:
                shape = v.aval.shape
                if len(shape) >= 3 and shape[0] == layers and seq in shape[1:]:
                    space = str(getattr(v.aval, "memory_space", "Device")).rsplit(".", 1)[-1].lower()
                    found[space] = found.get(space, 0) + v.aval.size * v.aval.dtype.itemsize
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if eqn.primitive.name != "scan":
                for k, b in stacked_residuals(sub, layers, seq).items():
                    found[k] = found.get(k, 0) + b
    return found


def measure(shape: str, seq: int, remat: str, mlp_chunk: int | None, packed: int | None, stand_in: bool) -> dict:
    model_options: dict[str, Any] = dict(scan_layers=True, remat_policy=remat, dtype="bfloat16", param_dtype="bfloat16")
    model_options.update(fuse_wide_adapters=False, max_segments=(seq // packed + 2) if packed else None)
    if mlp_chunk:
        model_options["mlp_chunk_tokens"] = mlp_chunk
    cfg = lj.LlamaConfig(**SHAPES[shape], **model_options)
    model = lj.Llama(cfg)
    lcfg = lj.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    lora = lj.init_lora(params, lcfg, jax.random.key(1))  # reads only the kernels' shapes
    lora = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora)
    split = lj.split_trainable(params, lora, lcfg)
    ocfg = OptimConfig(lr=1e-4)
    schedule = make_schedule(ocfg, 100)
    tx = make_tx(lcfg, ocfg, schedule)
    state = jax.eval_shape(lambda t: init_state(t, tx, 0), split.trainable)
    batch = {k: ids for k in ("input_ids", "positions", "segment_ids", "targets")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((1, seq), jnp.float32)
    step = make_train_step(model, cfg, lcfg, tx, schedule, chunk_tokens=2048, use_segments=bool(packed))
    if stand_in:
        llama_module.attention = stand_in_attention  # type: ignore[assignment]
    traced = step.trace(state, split.frozen, batch)
    residuals = stacked_residuals(traced.jaxpr.jaxpr, cfg.num_hidden_layers, seq)
    compiled = traced.lower().compile()
    mem = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f"{f}_gib": round(getattr(mem, f"{f}_size_in_bytes") / 2**30, 4) for f in fields}
    for f in ("host_argument", "host_output", "host_temp", "host_alias"):
        if hasattr(mem, f"{f}_size_in_bytes"):
            out[f"{f}_gib"] = round(getattr(mem, f"{f}_size_in_bytes") / 2**30, 4)
    peak = getattr(mem, "peak_memory_in_bytes", None)
    if peak is not None:
        out["peak_gib"] = round(peak / 2**30, 4)
    out.update({f"stacked_residuals_{k}_gib": round(b / 2**30, 4) for k, b in sorted(residuals.items())})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--remat", nargs="+", default=["full", "offload"])
    p.add_argument("--mlp-chunk", type=int, nargs="+", default=[0], help="model.mlp_chunk_tokens values; 0 = off")
    p.add_argument("--packed", type=int, default=None, help="a packed row of documents of this many tokens")
    p.add_argument("--stand-in-attention", action=argparse.BooleanOptionalAction, default=None)
    a = p.parse_args(argv)
    stand_in = jax.default_backend() == "cpu" if a.stand_in_attention is None else a.stand_in_attention
    for remat in a.remat:
        for chunk in a.mlp_chunk:
            mem = measure(a.shape, a.seq, remat, chunk or None, a.packed, stand_in)
            run = dict(shape=a.shape, seq=a.seq, remat=remat, mlp_chunk_tokens=chunk or None, packed=a.packed)
            run.update(backend=jax.default_backend(), stand_in_attention=stand_in)
            print("RESULT " + json.dumps({**run, **mem}), flush=True)


if __name__ == "__main__":
    main()
