"""Next-token cross-entropy that never materialises `[tokens, vocab]` fp32 logits at once.

Tokens run through the LM head in chunks inside a `lax.scan`; each chunk's logits are recomputed in
the backward pass (`jax.checkpoint`) instead of stored, so peak memory holds one chunk's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["chunked_cross_entropy", "head_weight"]


def head_weight(params, tie_word_embeddings: bool):
    """(weight, vocab_axis): `[vocab, embed]` embedding when tied, `[embed, vocab]` lm_head otherwise."""
    if tie_word_embeddings:
        return params["embed_tokens"]["embedding"], 0
    return params["lm_head"]["kernel"], 1


def chunked_cross_entropy(hidden_btd, weight, vocab_axis: int, targets_bt, mask_bt, chunk_tokens: int):
    """(sum of masked token losses, number of loss tokens), both fp32 scalars."""
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
    contract = 1 - vocab_axis  # the embed axis of the head weight

    @jax.checkpoint
    def chunk_loss(h_cd, t_c, m_c):
        logits = jax.lax.dot_general(h_cd, w, (((1,), (contract,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return jnp.sum((lse - target) * m_c)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    chunks = (h.reshape(-1, c, d), t.reshape(-1, c), m.reshape(-1, c))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total, jnp.sum(m)
