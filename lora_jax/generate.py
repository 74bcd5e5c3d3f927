"""Text generation with a KV cache: greedy or sampled, one jitted program per (shape, settings).
Every family decodes through its own module's cache path (`cache=`, `cache_index=`, `cache_mask=`).

Prompts are left-padded into one batch; positions count from each prompt's first real token and a
key mask hides the padding, so a padded prompt decodes exactly as it would alone.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import CheckpointFormatError, ConfigError
from lora_jax.hf.peft import load_peft
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.intercept import lora_interception
from lora_jax.models.llama import init_kv_cache
from lora_jax.models.registry import FamilyConfig, build_model, config_from_hf
from lora_jax.run_config import ModelConfig
from lora_jax.session import load_model, load_run, open_model_dir, resolve_model_path

__all__ = ["generate", "generate_text", "check_settings"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=16)
def _decoder(
    cfg: FamilyConfig, lcfg: LoraConfig | None, batch: int, prompt_len: int, max_new: int, sample: bool, top_k: int
):
    model = build_model(cfg)

    def forward(variables, ids, positions, cache, index, cache_mask):
        with lora_interception(lcfg, fuse_wide=cfg.fuse_wide_adapters):
            return model.apply(variables, ids, positions, cache=cache, cache_index=index, cache_mask=cache_mask)

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


def generate(
    cfg: FamilyConfig,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    lora=None,
    lcfg: LoraConfig | None = None,
    max_new_tokens: int = 32,
    eos_token_id=None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    bucket: int = 16,
) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens of each, eos included, pad removed.

    temperature=0 is greedy; otherwise softmax sampling at that temperature, optionally top-k.
    Prompt lengths are rounded up to `bucket` so nearby lengths share one compiled program.
    Bad settings (an empty prompt, max_new_tokens < 1, a negative or non-finite temperature, top_k
    outside [0, vocab_size] or without sampling) raise ConfigError naming the value.
    """
    check_settings(cfg, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty (no token ids); every prompt needs at least one token")
    if not prompts:
        return []
    batch = len(prompts)
    width = _round_up(max(len(p) for p in prompts), bucket)
    ids = np.full((batch, width), pad_token_id, np.int32)
    mask = np.zeros((batch, width), bool)
    positions = np.zeros((batch, width), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        ids[i, width - n :] = p
        mask[i, width - n :] = True
        positions[i, width - n :] = np.arange(n)
    eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    eos_ids = jnp.asarray(np.atleast_1d(np.asarray(eos if eos is not None else -1, np.int32)))
    run = _decoder(
        cfg.replace(remat_policy="none"), lcfg if lora else None, batch, width, max_new_tokens, temperature > 0, top_k
    )
    variables = {"params": params, "lora": lora} if lora else {"params": params}
    out = np.asarray(
        run(
            variables,
            ids,
            mask,
            positions,
            jax.random.key(seed),
            jnp.float32(max(temperature, 1e-6)),
            eos_ids,
            pad_token_id,
        )
    )
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


def check_settings(
    cfg: FamilyConfig | None, *, max_new_tokens, temperature, top_k, seed=0, names: Mapping[str, str] | None = None
) -> None:
    """ConfigError naming the value unless max_new_tokens >= 1, temperature is finite and >= 0,
    0 <= top_k <= vocab_size (top_k only when sampling: temperature > 0) and seed is an integer >= 0.
    `names` spells the settings in messages (the CLI's flags); `cfg=None` skips the vocabulary."""
    n = {
        "max_new_tokens": "max_new_tokens=",
        "temperature": "temperature=",
        "top_k": "top_k=",
        "seed": "seed=",
        **(names or {}),
    }

    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"{n['max_new_tokens']}{max_new_tokens!r} must be a positive integer, e.g. 48")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ConfigError(f"{n['temperature']}{temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not is_int(top_k) or top_k < 0:
        raise ConfigError(f"{n['top_k']}{top_k!r} must be an integer >= 0 (0 = no top-k cut)")
    if top_k and temperature == 0:
        raise ConfigError(
            f"{n['top_k']}{top_k} needs sampling, but {n['temperature']}0 is greedy "
            f"decoding; set a temperature > 0 (e.g. 0.7) or drop top_k"
        )
    if cfg is not None and top_k > cfg.vocab_size:
        raise ConfigError(
            f"{n['top_k']}{top_k} exceeds the vocabulary ({cfg.vocab_size} tokens); use at most {cfg.vocab_size}"
        )
    if not is_int(seed) or not 0 <= seed < 2**63:
        raise ConfigError(f"{n['seed']}{seed!r} must be an integer in [0, 2**63)")


def generate_text(cfg: FamilyConfig, params, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """String in, string out; special tokens are dropped from the output."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id or 0)
    outs = generate(cfg, params, ids, **kwargs)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


_FLAGS = {
    "max_new_tokens": "--max-new-tokens ",
    "temperature": "--temperature ",
    "top_k": "--top-k ",
    "seed": "--seed ",
}


def _run_model_path(run_dir: str) -> str:
    """The base model a training run used (from its run.json), without loading anything."""
    run_json = os.path.join(run_dir, "run.json")
    if not os.path.isfile(run_json):
        raise CheckpointFormatError(
            f"--checkpoint {run_dir} is not a lora-jax run directory (no run.json); "
            "pass the --output-dir of a `lora-jax train` run"
        )
    try:
        with open(run_json) as f:
            return json.load(f)["model_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(
            f"--checkpoint {run_dir}: run.json is unreadable ({type(e).__name__}: {e}); the run directory is damaged"
        ) from None


def generate_cli(
    *,
    model: str | None,
    adapter: str | None,
    checkpoint: str | None,
    prompts,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
):
    """What `lora-jax generate` does: base (+ PEFT adapter or a run's checkpoint) -> completions.

    Every setting is checked before weights load: the prompts (not empty), the sampling settings,
    the model directory, and that each prompt plus max_new_tokens fits the model's context
    (max_position_embeddings)."""
    if adapter and checkpoint:
        raise ConfigError(
            f"pass --adapter or --checkpoint, not both (got --adapter {adapter} and --checkpoint {checkpoint})"
        )
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"--prompt {p!r} is empty; give the text to continue")
    check_settings(None, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, names=_FLAGS)
    if adapter and not os.path.isdir(adapter):
        raise ConfigError(
            f"--adapter {adapter}: no such directory; pass a PEFT adapter directory "
            "(adapter_config.json + adapter_model.safetensors)"
        )
    model_path = _run_model_path(checkpoint) if checkpoint else resolve_model_path(model)
    tokenizer = open_model_dir(model_path)  # config.json, weights and tokenizer, one clear error each
    cfg = config_from_hf(model_path)
    check_settings(cfg, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, names=_FLAGS)
    context = cfg.max_position_embeddings
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    for p, toks in zip(prompts, ids):
        if len(toks) + max_new_tokens > context:
            room = context - len(toks)
            fix = f"use --max-new-tokens {room} or less" if room > 0 else "shorten the prompt"
            raise ConfigError(
                f"--max-new-tokens {max_new_tokens} after the prompt {_short(p)} ({len(toks)} "
                f"tokens) exceeds the model's context of {context} tokens "
                f"(max_position_embeddings); {fix}"
            )
    lora = lcfg = None
    if checkpoint:
        cfg, params, lora, lcfg, _, _, model_path = load_run(checkpoint)
    else:
        cfg, params = load_model(ModelConfig(), model_path)  # the default model options
        if adapter:
            lora, lcfg = load_peft(adapter, params)
    outs = generate(
        cfg,
        params,
        ids,
        lora=lora,
        lcfg=lcfg,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def _short(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")
