"""Check that the shipped demo is a fair LoRA demonstration, using torch + PEFT as the reference.

    python experiments/check_demo_learnable.py [--steps 300] [--batch 32] [--lr 2e-3]

1. Greedy exact match of the *base* model on `eval.jsonl` must be ~0 (it lacks the skill).
2. A PEFT LoRA (all linear projections) trained on `train.jsonl`, loss on completion tokens
   only, must reach >= 0.9 exact match within a few hundred steps on CPU.

It reads only the shipped files (`lora_jax/demo`), so it also checks they load offline with
`AutoTokenizer` / `AutoModelForCausalLM`. Training mirrors what the JAX demo trainer does:
ids = bos + prompt + completion + eos, labels masked on bos + prompt, right padding.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import make_demo as md  # same directory: tokenization/collation/scoring shared with the builder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default=md.DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    args = ap.parse_args()

    # Before importing transformers (it reads this once): the demo must load with no network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import torch
    import transformers

    torch.manual_seed(args.seed)
    model_dir = os.path.join(args.demo, "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)
    train = md.read_jsonl(os.path.join(args.demo, "data", "train.jsonl"))
    eval_ = md.read_jsonl(os.path.join(args.demo, "data", "eval.jsonl"))
    print(f"torch threads {torch.get_num_threads()}, {len(train)} train / {len(eval_)} eval records")

    base_em = md.greedy_exact_match(model, tokenizer, eval_, show=3)
    print(f"base exact match: {base_em:.3f}")

    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    # What demo_run_config() uses: 20 warmup steps from 0, cosine decay to 0, gradient clipping at 1.
    warmup = 20

    def lr_factor(s: int) -> float:
        if s < warmup:
            return s / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(args.steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    encoded = [md.encode_record(tokenizer, r["prompt"], r["completion"]) for r in train]
    print(f"longest training sequence: {max(len(x) for x, _ in encoded)} tokens")
    rng = random.Random(args.seed)
    order: list[int] = []
    train_time = 0.0
    history = []
    for step in range(1, args.steps + 1):
        t0 = time.time()
        model.train()
        if len(order) < args.batch:  # epoch-wise shuffling, like a data loader
            perm = list(range(len(encoded)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: args.batch], order[args.batch :]
        ids, labels = md.collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        loss = model(input_ids=ids.to(args.device), labels=labels.to(args.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.time() - t0
        if step % args.eval_every == 0 or step == args.steps:
            em = md.greedy_exact_match(model, tokenizer, eval_)
            history.append((step, em))
            print(
                f"step {step:4d} loss {loss.item():.4f} eval exact match {em:.3f} (train time {train_time:.1f}s)",
                flush=True,
            )

    final = md.greedy_exact_match(model, tokenizer, eval_, show=3)
    print(
        f"summary: base EM {base_em:.3f} -> LoRA EM {final:.3f} after {args.steps} steps "
        f"(batch {args.batch}, lr {args.lr}, r {args.rank}, alpha {args.alpha}); "
        f"training wall time {train_time:.1f}s excluding evals"
    )
    first_08 = next((s for s, em in history if em >= 0.8), None)
    first_09 = next((s for s, em in history if em >= 0.9), None)
    print(f"first eval with EM >= 0.8: step {first_08}; >= 0.9: step {first_09}")


if __name__ == "__main__":
    main()
