"""Next-token cross-entropy that never materialises `[tokens, vocab]` fp32 logits at once.

Tokens run through the LM head in chunks inside a `lax.scan`; peak memory holds one chunk's logits.
Under differentiation each chunk's hidden-state gradient is formed in the forward pass, while its
logits exist (the loss is the last op, so its gradient is known up to the scalar cotangent): the
backward pass then only scales it, and recomputes logits only if the head weight itself trains.

A family whose head ends in a logit softcap (Gemma 3's `final_logit_softcapping`: `c * tanh(z / c)`)
has it applied here, in fp32, so the loss is the one of the model's own logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.models.layout import layout_of

__all__ = ["chunked_cross_entropy", "head_weight"]


def _logits(h_cd, w, vocab_axis):
    """fp32 logits of one chunk. The matmul writes them in the compute dtype, as the model's own
    head (and transformers') does, and the upcast fuses into their readers: in bf16 this halves
    the memory traffic of the `[chunk, vocab]` array, the largest of the step. (The barrier keeps
    XLA from folding the upcast into the matmul, which would write fp32 again.)"""
    contract = 1 - vocab_axis  # the embed axis of the head weight
    logits = jax.lax.dot_general(h_cd, w, (((1,), (contract,)), ((), ())))
    return jax.lax.optimization_barrier(logits).astype(jnp.float32)


def _chunk_loss(vocab_axis: int, softcap: float | None):
    """Masked loss sum of one chunk, with a hand-written VJP: the fp32 softmax gradient is cast to
    the compute dtype before the head matmuls, so they run on bf16 tensor cores (autodiff would
    promote the head weight to fp32 and run a TF32 GEMM three times as slow); and the gradient of
    the hidden states is made in the forward pass, saving the backward a logits GEMM and softmax."""

    @jax.custom_vjp
    def loss(h_cd, w, t_c, m_c):
        return _forward(h_cd, w, t_c, m_c)[0]

    def _capped_logits(h_cd, w):
        logits = _logits(h_cd, w, vocab_axis)
        return logits if softcap is None else softcap * jnp.tanh(logits / softcap)

    def _forward(h_cd, w, t_c, m_c):
        logits = _capped_logits(h_cd, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return jnp.sum((lse - target) * m_c), lse, logits

    def _d_logits(logits, lse, t_c, scale, dtype):
        """The gradient w.r.t. the head's raw logits (through the softcap: d tanh = 1 - tanh^2)."""
        p = jnp.exp(logits - lse[:, None])
        onehot = jax.nn.one_hot(t_c, logits.shape[-1], dtype=p.dtype)
        d = (p - onehot) * scale[:, None]
        if softcap is not None:
            d = d * (1.0 - jnp.square(logits / softcap))
        return d.astype(dtype)

    def fwd(h_cd, w, t_c, m_c):
        total, lse, logits = _forward(h_cd, w, t_c, m_c)
        d_logits = _d_logits(logits, lse, t_c, m_c, h_cd.dtype)
        dh = jax.lax.dot_general(
            d_logits, w, (((1,), (vocab_axis,)), ((), ())), preferred_element_type=jnp.float32
        ).astype(h_cd.dtype)
        return total, (dh, h_cd, w, t_c, m_c, lse)

    def bwd(res, g):
        dh, h_cd, w, t_c, m_c, lse = res
        # only for a trainable head; XLA drops this recomputation when dw is unused
        d_logits = _d_logits(_capped_logits(h_cd, w), lse, t_c, g * m_c, h_cd.dtype)
        dw = jax.lax.dot_general(
            h_cd, d_logits, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [embed, vocab]
        dw = (dw if vocab_axis == 1 else dw.T).astype(w.dtype)
        return (g * dh.astype(jnp.float32)).astype(h_cd.dtype), dw, None, None

    loss.defvjp(fwd, bwd)
    return loss


def head_weight(params, cfg):
    """(weight, vocab_axis) of the model config's head: the `[vocab, embed]` embedding when tied
    (named as its family's layout names it: `embed_tokens`, GPT-2's `wte`), else the
    `[embed, vocab]` lm_head."""
    layout = layout_of(cfg)
    if cfg.tie_word_embeddings:
        return params[layout.embed]["embedding"], 0
    return params[layout.lm_head]["kernel"], 1


def chunked_cross_entropy(
    hidden_btd, weight, vocab_axis: int, targets_bt, mask_bt, chunk_tokens: int, softcap: float | None = None
):
    """(sum of masked token losses, number of loss tokens), both fp32 scalars; `softcap`: the
    logits are `softcap * tanh(logits / softcap)` (Gemma's final logit softcapping)."""
    d = hidden_btd.shape[-1]
    h = hidden_btd.reshape(-1, d)
    t = targets_bt.reshape(-1)
    m = mask_bt.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    c = min(chunk_tokens, n)
    pad = (-n) % c
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t, m = jnp.pad(t, (0, pad)), jnp.pad(m, (0, pad))
    w = weight.astype(h.dtype)
    chunk_loss = _chunk_loss(vocab_axis, softcap)

    def body(total, xs):
        return total + chunk_loss(xs[0], w, xs[1], xs[2]), None

    chunks = (h.reshape(-1, c, d), t.reshape(-1, c), m.reshape(-1, c))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total, jnp.sum(m)
