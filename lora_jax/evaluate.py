"""Evaluation on held-out data: token-weighted eval loss over eval batches, and exact match of
greedy completions. `train()` scores one adapter with them, `sweep()` a stack of K at once.

    loss = eval_loss(lambda batch: eval_fn(trainable, frozen, batch), datasets.eval_rows,
                     batch_size=8, steps=4)
    match = exact_match(datasets.eval_records, cfg, params, lora, lcfg, tokenizer,
                        max_new_tokens=32, limit=64)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lora_jax.data import eval_batches, special_prefix
from lora_jax.generate import generate

__all__ = ["eval_loss", "exact_match"]


def eval_loss(
    loss_fn: Callable,
    rows: Sequence,
    batch_size: int,
    steps: int,
    *,
    shape: tuple = (),
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Token-weighted mean loss over the first `steps` batches of `rows` (`eval_batches`, this
    process's slice of each): `loss_fn(batch) -> (loss sum, token count)`, each of `shape` (`()`
    for one adapter, `(K,)` for a stack of K). Summed in float64 on the host; a batch-free
    evaluation gives zeros."""
    total = np.zeros(shape)
    count = np.zeros(shape)
    for i, batch in enumerate(eval_batches(rows, batch_size, process_index, process_count)):
        if i >= steps:
            break
        t, c = loss_fn(batch)
        total, count = total + np.asarray(t, np.float64), count + np.asarray(c, np.float64)
    return total / np.maximum(count, 1.0)


def exact_match(records, cfg, params, lora, lcfg, tokenizer, max_new_tokens: int, limit: int) -> float | None:
    """Fraction of held-out prompts whose greedy completion equals the reference (stripped).
    None when the data defines no prompt (text records)."""
    prompts, answers = [], []
    for rec in records[:limit]:
        if "prompt" in rec:
            prompts.append(special_prefix(tokenizer) + tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"])
            answers.append(rec["completion"])
        elif "messages" in rec and rec["messages"][-1]["role"] == "assistant":
            prompts.append(
                list(
                    tokenizer.apply_chat_template(
                        rec["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=False
                    )
                )
            )
            answers.append(rec["messages"][-1]["content"])
    if not prompts:
        return None
    outs = generate(
        cfg,
        params,
        prompts,
        lora=lora,
        lcfg=lcfg,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return float(np.mean([t.strip() == a.strip() for t, a in zip(texts, answers)]))
