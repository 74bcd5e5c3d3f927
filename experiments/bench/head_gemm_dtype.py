"""Which dtype does the compiled LM-head matmul of the chunked cross-entropy write?

XLA may fold an upcast of a bf16 matmul into the matmul itself (an fp32-output GEMM), which
doubles the traffic of the `[chunk, vocab]` logits; `lora_jax.train.loss` guards against it. This
compiles the loss gradient for a 1B-shaped head (bf16, vocab 128,256, chunk 2,048) on the default
device and prints the matmul lines of the optimised HLO and one RESULT line.

    python experiments/bench/head_gemm_dtype.py        # on the GPU: expect "bf16"
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lora_jax.train.loss import chunked_cross_entropy  # noqa: E402

VOCAB, D, CHUNK = 128256, 2048, 2048


def main() -> int:
    h = jnp.ones((2, CHUNK, D), jnp.bfloat16)
    w = jnp.ones((VOCAB, D), jnp.bfloat16)
    t, m = jnp.zeros((2, CHUNK), jnp.int32), jnp.ones((2, CHUNK))
    grad = jax.jit(jax.grad(lambda h: chunked_cross_entropy(h, w, 0, t, m, CHUNK)[0]))
    hlo = grad.lower(h).compile().as_text()
    shape = f"[{CHUNK},{VOCAB}]"
    matmuls = [
        line.strip() for line in hlo.splitlines() if shape in line and ("custom-call" in line or " dot(" in line)
    ]
    for line in matmuls:
        print(line[:200])
    bf16 = any(re.search(r"= \(?bf16" + re.escape(shape), line) for line in matmuls)
    print("RESULT head matmul output:", "bf16" if bf16 else "f32", "on", jax.devices()[0].platform)
    return 0


if __name__ == "__main__":
    sys.exit(main())
