"""Text generation with a KV cache: greedy or sampled, one jitted program per (shape, settings).

Prompts are left-padded into one batch; positions count from each prompt's first real token and a
key mask hides the padding, so a padded prompt decodes exactly as it would alone.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LlamaConfig, LoraConfig
from lora_jax.lora.intercept import lora_interception
from lora_jax.models.llama import Llama, init_kv_cache

__all__ = ["generate", "generate_text"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=16)
def _decoder(cfg: LlamaConfig, lcfg: LoraConfig | None, batch: int, prompt_len: int, max_new: int,
             sample: bool, top_k: int):
    model = Llama(cfg)

    def forward(variables, ids, positions, cache, index, cache_mask):
        with lora_interception(lcfg, fuse_wide=cfg.fuse_wide_adapters):
            return model.apply(variables, ids, positions, cache=cache, cache_index=index,
                               cache_mask=cache_mask)

    def pick(logits, key, temperature):
        logits = logits.astype(jnp.float32)
        if not sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    def run(variables, ids, mask, positions, key, temperature, eos_ids, pad_id):
        total = prompt_len + max_new
        cache = init_kv_cache(cfg, batch, total)
        cache_mask = jnp.concatenate([mask, jnp.zeros((batch, max_new), bool)], axis=1)
        logits, cache = forward(variables, ids, positions, cache, 0, cache_mask)
        key, sub = jax.random.split(key)
        tok = pick(logits[:, -1], sub, temperature)
        pos = positions[:, -1] + 1
        out = jnp.full((batch, max_new), pad_id, jnp.int32)
        done = jnp.zeros((batch,), bool)

        def cond(c):
            i, _, _, _, _, _, done, _ = c
            return (i < max_new) & ~jnp.all(done)

        def body(c):
            i, tok, cache, cache_mask, pos, out, done, key = c
            out = out.at[:, i].set(jnp.where(done, pad_id, tok))
            done = done | jnp.isin(tok, eos_ids)
            cache_mask = cache_mask.at[:, prompt_len + i].set(True)
            logits, cache = forward(variables, tok[:, None], pos[:, None], cache, prompt_len + i, cache_mask)
            key, sub = jax.random.split(key)
            return i + 1, pick(logits[:, 0], sub, temperature), cache, cache_mask, pos + 1, out, done, key

        state = (jnp.zeros((), jnp.int32), tok, cache, cache_mask, pos, out, done, key)
        return jax.lax.while_loop(cond, body, state)[5]

    return jax.jit(run)


def generate(cfg: LlamaConfig, params, prompts: Sequence[Sequence[int]], *, lora=None,
             lcfg: LoraConfig | None = None, max_new_tokens: int = 32, eos_token_id=None,
             pad_token_id: int = 0, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             bucket: int = 16) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens of each, eos included, pad removed.

    temperature=0 is greedy; otherwise softmax sampling at that temperature, optionally top-k.
    Prompt lengths are rounded up to `bucket` so nearby lengths share one compiled program.
    """
    if not prompts:
        return []
    batch = len(prompts)
    width = _round_up(max(len(p) for p in prompts), bucket)
    ids = np.full((batch, width), pad_token_id, np.int32)
    mask = np.zeros((batch, width), bool)
    positions = np.zeros((batch, width), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        ids[i, width - n:] = p
        mask[i, width - n:] = True
        positions[i, width - n:] = np.arange(n)
    eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    eos_ids = jnp.asarray(np.atleast_1d(np.asarray(eos if eos is not None else -1, np.int32)))
    run = _decoder(cfg.replace(remat_policy="none"), lcfg if lora else None, batch, width,
                   max_new_tokens, temperature > 0, top_k)
    variables = {"params": params, "lora": lora} if lora else {"params": params}
    out = np.asarray(run(variables, ids, mask, positions, jax.random.key(seed),
                         jnp.float32(max(temperature, 1e-6)), eos_ids, pad_token_id))
    eos_set = set(np.asarray(eos_ids).tolist())
    results = []
    for row in out:
        toks = []
        for t in row.tolist():
            toks.append(t)
            if t in eos_set:
                break
        results.append(toks)
    return results


def generate_text(cfg: LlamaConfig, params, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """String in, string out; special tokens are dropped from the output."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id or 0)
    outs = generate(cfg, params, ids, **kwargs)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def generate_cli(*, model: str | None, adapter: str | None, checkpoint: str | None, prompts, **kwargs):
    """What `lora-jax generate` does: base (+ PEFT adapter or a run's checkpoint) -> completions."""
    import transformers

    from lora_jax.errors import ConfigError
    from lora_jax.hf.load import load_pretrained
    from lora_jax.train.loop import resolve_dtype, resolve_model_path

    if adapter and checkpoint:
        raise ConfigError("pass --adapter or --checkpoint, not both")
    lora = lcfg = None
    if checkpoint:
        from lora_jax.export import load_run

        cfg, params, lora, lcfg, _, _, model_path = load_run(checkpoint)
    else:
        model_path = resolve_model_path(model)
        cfg, params = load_pretrained(model_path, dtype=resolve_dtype("auto"))
        if adapter:
            from lora_jax.hf.peft import load_peft

            lora, lcfg = load_peft(adapter, params)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    return generate_text(cfg, params, tokenizer, prompts, lora=lora, lcfg=lcfg, **kwargs)
