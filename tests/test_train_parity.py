"""Training equals transformers + PEFT, step for step (fp32, CPU, a tiny random Llama).

Both sides start from the same adapters (ours, exported with `save_peft`, loaded with
`PeftModel.from_pretrained(is_trainable=True)`) and see the same batches (one document a row,
right-padded, loss on the completion only; labels -100 elsewhere on the torch side). Ours is the
real jitted step (`make_train_step` with `make_schedule` / `make_tx` from an `OptimConfig`);
theirs a plain torch loop: `torch.optim.AdamW` (LoRA+: `peft.optimizers.create_loraplus_optimizer`),
transformers' scheduler, `clip_grad_norm_`, and under gradient accumulation each micro-batch's
summed token loss divided by the loss tokens of the whole batch (`num_items_in_batch`).

Compared, with the tolerances of `experiments/peft_parity/train_parity.py` (`TOLS`, justified
there): per step the loss, learning rate and pre-clip global gradient norm; at the end every
adapter tensor (ours exported with `save_peft` vs PEFT's `get_peft_model_state_dict`), relative to
its norm and to the change training made to it.
`python experiments/peft_parity/train_parity.py --set KEY=VALUE` runs the same comparison for
any run config. Four cases cover the features between them; `pytest -s` prints each one's figures.
"""

import pytest

from experiments.peft_parity.train_parity import TOLS, compare, run_config

STEPS = 20
BASE = ["train.batch_size=4", "lora.r=4", "lora.lora_alpha=8"]
CASES = {
    # plain LoRA on every projection; cosine after a warmup; decoupled weight decay; clipping binds
    # at every step (pre-clip norms are ~0.3); two accumulated micro-batches; packed-row attention
    "lora_cosine_warmup_decay_clip_accum": [
        "lora.r=8",
        "lora.lora_alpha=16",
        "lora.target_modules=all-linear",
        "optim.lr=5e-3",
        "optim.schedule=cosine",
        "optim.warmup_steps=5",
        "optim.weight_decay=0.1",
        "optim.clip_norm=0.05",
        "train.grad_accum=2",
    ],
    # rsLoRA with per-module ranks and alphas; transformers' default schedule (linear, warmup);
    # no clipping; plain causal attention (segments off)
    "rslora_patterns_linear": [
        "lora.use_rslora=true",
        "lora.target_modules=[q_proj, v_proj, up_proj, down_proj]",
        "lora.rank_pattern={down_proj: 2, model.layers.0.self_attn.q_proj: 6}",
        "lora.alpha_pattern={v_proj: 3}",
        "optim.lr=5e-3",
        "optim.schedule=linear",
        "optim.warmup_steps=3",
        "optim.clip_norm=null",
        "data.packing=false",
    ],
    # DoRA (the magnitude trains, and decays); a warmup longer than the run (it ends still warming
    # up, as transformers' schedule does); four micro-batches of one row each
    "dora_constant_long_warmup_accum": [
        "lora.use_dora=true",
        "lora.target_modules=[q_proj, v_proj, o_proj, up_proj]",
        "optim.lr=5e-3",
        "optim.schedule=constant",
        "optim.warmup_steps=25",
        "optim.weight_decay=0.1",
        "train.grad_accum=4",
    ],
    # LoRA+ as create_loraplus_optimizer groups it: b, DoRA's magnitude and 1-d tensors (a
    # modules_to_save norm) at 4x the rate, a 2-d modules_to_save tensor (the head) at 1x; cosine
    # to a floor (cosine_with_min_lr); weight decay
    "loraplus_dora_cosine_min_lr": [
        "lora.use_dora=true",
        "lora.loraplus_lr_ratio=4",
        "lora.target_modules=[k_proj, v_proj, gate_proj, down_proj]",
        "lora.modules_to_save=[lm_head, input_layernorm]",
        "optim.lr=2e-3",
        "optim.schedule=cosine",
        "optim.min_lr_ratio=0.1",
        "optim.warmup_steps=2",
        "optim.weight_decay=0.05",
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_equals_transformers_peft(case, tmp_path):
    run = run_config(BASE + CASES[case])
    res = compare(run, steps=STEPS, seq_len=16, workdir=tmp_path)
    ours, theirs = res["ours"], res["theirs"]
    figures = " ".join(f"{k} {v:.1e}" for k, v in res["max_rel"].items())
    print(
        f"[train parity] {case}: max rel diff {figures} (worst tensor {res['worst_tensor']}, worst "
        f"element {res['elementwise']:.1e}); loss {ours['loss'][0]:.3f} -> {ours['loss'][-1]:.3f}"
    )
    for name, value in res["max_rel"].items():
        assert value <= TOLS[name], f"{case}: {name} differs by {value:.2e} > {TOLS[name]:g}"
    assert ours["loss"][-1] < 0.99 * ours["loss"][0]  # the run learns: the trajectory is not trivial
    if run.optim.warmup_steps:
        assert theirs["lr"][0] == ours["lr"][0] == 0.0  # transformers' first update has lr 0
    if run.optim.clip_norm and run.optim.clip_norm < 0.1:
        assert min(theirs["grad_norm"]) > run.optim.clip_norm  # clipping bound at every step
