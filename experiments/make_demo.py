"""Regenerate the built-in demo shipped in `lora_jax/demo/`: a tiny Llama base model and a dataset.

    python experiments/make_demo.py            # writes lora_jax/demo/{model,data}
    python experiments/check_demo_learnable.py # proves the base lacks the skill and LoRA learns it

What it builds, and why:

* A character-level tokenizer (`tokenizers` WordLevel over printable ASCII + newline). One token
  per character means tokenizing a prompt and a completion separately and concatenating the ids is
  the same as tokenizing their concatenation, so prompt/completion masking has no boundary effects.
* A tiny Llama (~0.2M parameters, <1 MB in fp32) so that the demo trains in a couple of minutes on
  a laptop CPU.
* A brief pretraining on generic synthetic text (copy / repeat / pick-a-word formats, key: value
  lines, a few chat-formatted turns). It teaches the base the *mechanics* the demo relies on
  (attend back to the prompt, copy characters, stop with `</s>`) but never pairs a lowercase
  letter with its uppercase form, so the base cannot do the demo skill.
* The demo skill, "shout": `shout: bako tiru =>` -> ` BAKO TIRU`. It is a copy plus a fixed
  per-character map, which a rank-8..16 LoRA picks up in a few hundred steps; exact match is
  unambiguous to score. Eval phrases use words that never appear in training (nor in pretraining).

Everything is seeded; rerunning on the same machine (same torch version and thread count)
reproduces the files. Across machines the pretrained weights may differ in the last bits (CPU
matmul reduction order), the dataset and tokenizer do not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import string
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "lora_jax", "demo")

SEED = 0
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3: bos/eos match LlamaConfig's defaults
MAX_LEN = 64  # longest training sequence (tokens, bos and eos included); demo records stay < 48

# Minimal chat format. bos once at the start, each assistant turn closed by eos (which is what a
# model trained on this format learns to emit), and a generation prompt without a trailing space so
# the assistant's reply starts with " " just like the prompt/completion records do.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('roles are system, user and assistant; got ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Tiny enough for a 2-core CPU to LoRA-train in ~2 minutes, deep enough (3 layers) to copy reliably.
MODEL_KWARGS = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    attention_dropout=0.0,
    hidden_act="silu",
)


# ------------------------------------------------------------------------------------ tokenizer
def build_tokenizer():
    """Character-level fast tokenizer wrapped for transformers (bos prepended, like Llama's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character (newline included, hence [\s\S] rather than .) is its own "word"; Fuse glues them back
    # together on decode instead of joining with spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        chat_template=CHAT_TEMPLATE, model_max_length=MODEL_KWARGS["max_position_embeddings"],
        padding_side="right")


def save_tokenizer(tokenizer, path: str) -> None:
    # Keep the chat template inside tokenizer_config.json (not chat_template.jinja) and name the
    # generic fast class: both are understood by every transformers version the package supports
    # (>=4.56), whereas v5's default "TokenizersBackend" class name is unknown to v4.
    tokenizer.save_pretrained(path, save_jinja_files=False)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(cfg_file, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


# ------------------------------------------------------------------------------------ text
CONSONANTS = "bcdfghjklmnprstvwxyz"  # + "q" below, so all 26 letters occur
VOWELS = "aeiou"


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word (2-7 letters) so demo strings are readable yet not memorized."""
    word = ""
    for _ in range(rng.choice((1, 2, 2, 3))):
        c = "qu" if rng.random() < 0.03 else rng.choice(CONSONANTS)
        word += c + rng.choice(VOWELS)
    if rng.random() < 0.3:
        word += rng.choice(CONSONANTS)
    return word[:7]


def word_pools(rng: random.Random, n_eval_words: int = 200, n_words: int = 6000):
    """Disjoint word sets: eval words never occur in the demo train set nor in pretraining."""
    words: list[str] = []
    seen = set()
    while len(words) < n_words:
        w = pseudo_word(rng)
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words[n_eval_words:], words[:n_eval_words]


def phrase(rng: random.Random, words: list[str], n_min: int = 1, n_max: int = 3) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(n_min, n_max)))


def case_style(rng: random.Random, s: str) -> str:
    """Vary casing *between* examples so the base sees (and can emit) uppercase letters, without
    ever seeing a lowercase string next to its uppercase version."""
    r = rng.random()
    if r < 0.5:
        return s
    if r < 0.75:
        return s.title()
    if r < 0.9:
        return s.upper()
    return "".join(c.upper() if rng.random() < 0.5 else c for c in s)


def random_token_string(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "-_.,!?"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 10)))


def pretrain_example(rng: random.Random, words: list[str]) -> str:
    """One generic pretraining document (bos/eos added by the caller)."""
    kind = rng.random()
    if kind < 0.06:  # key: value lines, the "simple formats" part
        first, last = pseudo_word(rng).title(), pseudo_word(rng).title()
        return (f"name: {first} {last}\nage: {rng.randint(1, 99)}\n"
                f"city: {rng.choice(words).title()}")
    if kind < 0.10:
        return " ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 6)))
    s = case_style(rng, phrase(rng, words)) if rng.random() < 0.7 else random_token_string(rng)
    toks = s.split()
    task = rng.random()
    if task < 0.55:
        prompt, completion = f"repeat: {s} =>", f" {s}"
    elif task < 0.70:
        prompt, completion = f"twice: {s} =>", f" {s} {s}"
    elif task < 0.80:
        prompt, completion = f"first: {s} =>", f" {toks[0]}"
    elif task < 0.90:
        prompt, completion = f"last: {s} =>", f" {toks[-1]}"
    else:
        prompt, completion = f"join: {s} =>", " " + "-".join(toks)
    if rng.random() < 0.2:  # some turns in the chat format, so apply_chat_template output is familiar
        return f"User: {prompt}\nAssistant:{completion}"
    return prompt + completion


def demo_record(rng: random.Random, words: list[str]) -> dict:
    s = phrase(rng, words)
    return {"prompt": f"shout: {s} =>", "completion": f" {s.upper()}"}


def build_dataset(rng: random.Random, train_words, eval_words, n_train: int, n_eval: int):
    train, eval_ = [], []
    seen = set()
    for out, words, n in ((train, train_words, n_train), (eval_, eval_words, n_eval)):
        while len(out) < n:
            rec = demo_record(rng, words)
            if rec["prompt"] not in seen:  # no duplicate prompts within or across splits
                seen.add(rec["prompt"])
                out.append(rec)
    return train, eval_


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=True) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------ torch helpers
def encode_record(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """ids = bos + prompt + completion + eos; labels mask the prompt (what the demo trainer does)."""
    p = tokenizer(prompt).input_ids  # bos prepended by the post-processor
    c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad. No attention mask is needed: with causal attention, real tokens never see the
    padding after them, and padded positions carry label -100."""
    import torch

    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


def greedy_exact_match(model, tokenizer, records: list[dict], max_new_tokens: int = 32,
                       batch_size: int = 64, show: int = 0) -> float:
    """Fraction of records whose greedy continuation (up to eos) equals the completion exactly."""
    import torch

    model.eval()
    hits = 0
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the end of every row
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
            for j, r in enumerate(chunk):
                gen = out[j, enc.input_ids.shape[1]:].tolist()
                if tokenizer.eos_token_id in gen:
                    gen = gen[: gen.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(gen, skip_special_tokens=True)
                hits += text == r["completion"]
                if start + j < show:
                    print(f"    {r['prompt']!r} -> {text!r} (want {r['completion']!r})")
    finally:
        tokenizer.padding_side = old_side
    return hits / len(records)


# ------------------------------------------------------------------------------------ pretraining
def pretrain(model, tokenizer, words, *, steps: int, batch_size: int, lr: float, seed: int):
    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        batch = []
        while len(batch) < batch_size:
            text = pretrain_example(rng, words)
            ids = tokenizer(text).input_ids + [tokenizer.eos_token_id]
            if len(ids) <= MAX_LEN:
                batch.append((ids, ids))  # plain LM loss on every real token
        ids, labels = collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps:
            print(f"  pretrain step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)",
                  flush=True)
    model.eval()


def copy_probe(rng: random.Random, words: list[str], n: int = 64) -> list[dict]:
    """Held-out 'repeat' records: checks the base really acquired the copying competence."""
    out = []
    for _ in range(n):
        s = phrase(rng, words)
        out.append({"prompt": f"repeat: {s} =>", "completion": f" {s}"})
    return out


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="demo directory (model/ and data/ inside)")
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=64)
    args = ap.parse_args()

    import torch
    import transformers

    torch.manual_seed(SEED)
    model_dir, data_dir = os.path.join(args.out, "model"), os.path.join(args.out, "data")
    for d in (model_dir, data_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    # Data first: it only depends on the seed, never on the (machine-dependent) weights.
    rng = random.Random(SEED)
    train_words, eval_words = word_pools(rng)
    train, eval_ = build_dataset(rng, train_words, eval_words, args.n_train, args.n_eval)
    write_jsonl(os.path.join(data_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(data_dir, "eval.jsonl"), eval_)
    print(f"data: {len(train)} train / {len(eval_)} eval records -> {data_dir}")

    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL_KWARGS)
    model = transformers.LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, vocab {len(tokenizer)}")

    t0 = time.time()
    pretrain(model, tokenizer, train_words, steps=args.pretrain_steps, batch_size=args.pretrain_batch,
             lr=args.pretrain_lr, seed=SEED + 1)
    print(f"pretraining took {time.time() - t0:.0f}s")

    probe_rng = random.Random(SEED + 2)
    print(f"base copy exact match (held-out words): "
          f"{greedy_exact_match(model, tokenizer, copy_probe(probe_rng, eval_words), show=3):.3f}")
    print(f"base shout exact match (eval.jsonl):    "
          f"{greedy_exact_match(model, tokenizer, eval_, show=3):.3f}")

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir, safe_serialization=True)
    save_tokenizer(tokenizer, model_dir)
    for name in os.listdir(model_dir):  # safetensors writes 0600; package data should be readable
        os.chmod(os.path.join(model_dir, name), 0o644)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {model_dir}: {sorted(os.listdir(model_dir))}; demo total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
