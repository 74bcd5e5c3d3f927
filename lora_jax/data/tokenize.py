"""Records -> ``(token ids, loss mask)`` with a Hugging Face tokenizer.

The mask marks the tokens the model is trained to *predict*; packing turns it into per-position
target masks. The tokenizer is duck-typed (``__call__``, ``apply_chat_template``, ``eos_token_id``)
so this module never imports transformers.

Assistant spans in chat records are found by rendering the conversation progressively
(``apply_chat_template`` on ``messages[:i]`` with the generation prompt, and on ``messages[:i+1]``)
and diffing the rendered *strings*; the full conversation is then tokenized once with offsets and
a token is a loss token when its characters overlap an assistant span. This was chosen over
``return_assistant_tokens_mask`` because that needs a ``{% generation %}`` block that almost no
released chat template (Llama 3 included) has, and over diffing token counts because a BPE merge
across the prefix boundary would shift a token-count diff but not a character span. Templates that
re-render earlier turns once later ones exist (e.g. stripping reasoning from old turns) break the
prefix property; that is detected and refused rather than mis-masked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_jax.errors import DataError

__all__ = ["special_prefix", "tokenize_record", "assistant_spans"]

_PROBE = "Hello world"


def special_prefix(tokenizer) -> list[int]:
    """The ids ``add_special_tokens=True`` puts before the text (Llama: ``[bos]``; else ``[]``).

    Found by encoding a probe with and without special tokens, so it follows the tokenizer's own
    post-processor instead of guessing from ``bos_token_id`` (which some tokenizers define but
    never add).
    """
    plain = _encode(tokenizer, _PROBE)
    full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def tokenize_record(
    record: Mapping[str, Any],
    fmt: str,
    tokenizer,
    completion_only: bool = True,
    add_eos: bool = True,
    *,
    where: str = "record",
    bos_prefix: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [n], loss_mask bool [n])`` for one record of format ``fmt``.

    text: loss on every token. prompt_completion: prompt and completion are tokenized separately
    and concatenated so the boundary is exact (a merge across it would blur which tokens are the
    completion); loss on completion (+ eos) only when ``completion_only``. messages: rendered with
    the chat template; loss on assistant turns (their content and end-of-turn tokens) only when
    ``completion_only``. ``add_eos`` appends eos unless the sequence already ends with it (for
    messages: unless the template already closes the last assistant turn with eos).
    ``bos_prefix`` (default: `special_prefix(tokenizer)`) lets a caller compute it once per dataset.
    """
    prefix: list[int] = []  # not used for messages
    if fmt != "messages":
        prefix = special_prefix(tokenizer) if bos_prefix is None else list(bos_prefix)
    if fmt == "text":
        ids = prefix + _encode(tokenizer, record["text"])
        mask = [True] * len(ids)
        eos_loss = True
    elif fmt == "prompt_completion":
        prompt = prefix + _encode(tokenizer, record["prompt"])
        completion = _encode(tokenizer, record["completion"])
        ids = prompt + completion
        mask = [not completion_only] * len(prompt) + [True] * len(completion)
        eos_loss = True
    elif fmt == "messages":
        ids, mask, has_eos = _tokenize_messages(record["messages"], tokenizer, completion_only, where)
        eos_loss = not completion_only or record["messages"][-1]["role"] == "assistant"
        add_eos = add_eos and not has_eos
    else:
        raise DataError(
            f"{where}: unknown record format {fmt!r}; expected one of 'text', 'prompt_completion', 'messages'"
        )
    if add_eos:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError(
                "the tokenizer has no eos_token, so data.add_eos cannot append one; "
                "set data.add_eos=false or use a tokenizer that defines eos"
            )
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
            mask = list(mask) + [eos_loss]
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def assistant_spans(
    messages: Sequence[Mapping[str, str]], tokenizer, where: str = "record"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn.

    A span runs from the end of the generation prompt before the turn (so the ``assistant`` header
    is not trained on) to the end of the turn's rendering (so its end-of-turn token is: the model
    must learn to stop).
    """
    full = _render(tokenizer, messages, False, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1], False, where)
        if not full.startswith(upto):
            raise DataError(
                f"{where}: the chat template renders messages[:{i + 1}] differently from the start "
                "of the full conversation, so assistant turns cannot be located; use a template "
                "whose earlier turns do not depend on later ones, or set "
                "data.completion_only_loss=false"
            )
        start = 0
        for generation_prompt in (True, False):
            try:
                before = _render(tokenizer, messages[:i], generation_prompt, where)
            except DataError:
                if i:
                    raise
                before = ""  # some templates refuse an empty conversation
            if upto.startswith(before):
                start = len(before)
                break
        else:
            raise DataError(
                f"{where}: the chat template's rendering of messages[:{i}] is not a prefix of "
                f"messages[:{i + 1}], so assistant turn {i} cannot be located; set "
                "data.completion_only_loss=false or fix the template"
            )
        spans.append((start, len(upto)))
    return full, spans


def _tokenize_messages(messages, tokenizer, completion_only: bool, where: str) -> tuple[list[int], list[bool], bool]:
    """ids, loss mask, and whether the template already closes the last assistant turn with eos
    (then ``add_eos`` adds nothing: templates that write ``eos`` then a newline would otherwise get
    a second eos after the newline)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: 'messages' records need a tokenizer with a chat_template and "
            "this one has none; use the chat/instruct model's tokenizer or convert the "
            'records to {"prompt", "completion"}'
        )
    text, spans = assistant_spans(messages, tokenizer, where)
    # The rendered text already holds the template's special tokens (bos included), so the
    # tokenizer must not add its own.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    in_spans = [(ends > lo) & (starts < hi) for lo, hi in spans]  # a straddling token counts
    has_eos = False
    if spans and in_spans[-1].any():
        has_eos = tokenizer.eos_token_id in ids[int(np.argmax(in_spans[-1])) :]
    if not completion_only:
        return ids, [True] * len(ids), has_eos
    mask = np.logical_or.reduce(in_spans) if spans else np.zeros(len(ids), dtype=bool)
    return ids, mask.tolist(), has_eos


def _render(tokenizer, messages, add_generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja2 TemplateError, raise_exception() in templates, ValueError
        raise DataError(
            f"{where}: the chat template failed ({type(e).__name__}: {e}); check the "
            "roles and their order against what the model's template accepts"
        ) from None
    if not isinstance(text, str):
        raise DataError(
            f"{where}: apply_chat_template returned {type(text).__name__}, expected a "
            "string; pass a transformers tokenizer"
        )
    return text


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
