"""`lora-jax train` and `lora-jax sweep` on every family besides Llama (Qwen2, Qwen3, Mistral, GPT-2,
Gemma 3): a tiny random transformers model saved with save_pretrained (every weight perturbed; the
demo tokenizer), a small prompt/completion corpus, a few steps through the CLI entry point. Each run
must finish with finite losses and a lower eval loss, and its exported PEFT adapter must load in
`PeftModel.from_pretrained` with logits within FP32_ATOL of ours; the training loss itself must be
transformers' loss of the adapted model (Gemma's logit softcap and GPT-2's `wte` head included)."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import lora_jax as lj
from lora_jax.cli import main
from lora_jax.demo import DEMO_TRAIN
from lora_jax.flops import flops_per_token, lora_params, matmul_params
from lora_jax.lora.targets import plan_targets, shape_from_config
from lora_jax.lora.tree import split_trainable
from lora_jax.models.layout import layout_of
from lora_jax.models.registry import config_from_hf
from lora_jax.session import load_run
from lora_jax.train.loss import chunked_cross_entropy
from lora_jax.train.step import eval_step
from tests.helpers import (
    FP32_ATOL,
    REPO,
    bench_script,
    cli_error,
    hf_model,
    make_hf_family,
    max_diff,
    random_ids,
    step_losses,
    torch_logits_of,
    unpacked_batch,
)

FAMILIES = ["qwen2", "qwen3", "mistral", "gpt2", "gemma3_text"]
IDS = random_ids(857, (2, 13), seed=7)  # longer than the sliding windows (6) of Mistral and Gemma 3
STEPS = 6

RUN_SETS = [
    f"train.steps={STEPS}",
    f"train.save_every={STEPS}",
    "train.batch_size=8",
    "train.eval_batches=1",
    "train.eval_generate=2",
    "train.max_new_tokens=4",
    "train.log_every=1",
    "data.seq_len=48",
    "data.eval_fraction=0.25",
    "optim.lr=5e-3",
    "optim.warmup_steps=0",
    "lora.r=4",
    "lora.target_modules=all-linear",
]


def _sets(pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 48 records of the demo's prompt/completion training file."""
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    with open(DEMO_TRAIN) as f:
        path.write_text("".join(f.readlines()[:48]))
    return str(path)


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory, corpus):
    """(family, model dir, run dir) of one `lora-jax train` run on the family's tiny model."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir = make_hf_family(root / "model", family)
    run_dir = root / "run"
    argv = ["train", "--model", model_dir, "--data", corpus, "--output-dir", str(run_dir), "--no-progress"]
    assert main([*argv, *_sets(RUN_SETS)]) == 0
    return family, model_dir, str(run_dir)


_torch_logits = functools.partial(torch_logits_of, ids=IDS)  # a torch model's logits of IDS


def test_train_runs_and_learns(trained):
    family, _, run_dir = trained
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == STEPS
    losses = [loss for _, loss in step_losses(run_dir)]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
    assert summary["eval_after"] is not None and 0.0 <= summary["eval_after"] <= 1.0  # generation ran
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["model_config"]["model_type"] == family


def test_exported_adapter_loads_in_peft(trained):
    import peft

    family, model_dir, run_dir = trained
    cfg, params, lora, lcfg, *_ = _load_run(run_dir)
    ours = np.asarray(lj.apply(lj.build_model(cfg), params, lora, lcfg, jnp.asarray(IDS)))
    base = np.asarray(lj.build_model(cfg).apply({"params": params}, jnp.asarray(IDS)))
    assert max_diff(ours, base) > 1e-3, f"{family}: the trained adapter changes nothing"
    pm = peft.PeftModel.from_pretrained(hf_model(model_dir), os.path.join(run_dir, "adapter")).eval()
    diff = max_diff(_torch_logits(pm), ours)
    print(f"[family cli] {family} adapter in PEFT: max abs diff {diff:.3e}")
    assert diff <= FP32_ATOL


def test_training_loss_is_transformers_loss(trained):
    """The loss the train step minimises (chunked, from hidden states, through the family's head
    and softcap) is transformers' causal-LM loss of the PEFT model on the same tokens."""
    import peft
    import torch

    family, model_dir, run_dir = trained
    cfg, params, lora, lcfg, *_ = _load_run(run_dir)
    ids = IDS[:, :-1]
    batch = unpacked_batch(ids, IDS[:, 1:], np.ones(ids.shape, np.float32))
    split = split_trainable(params, lora, lcfg)
    total, n = eval_step(
        split.trainable, split.frozen, batch, model=lj.build_model(cfg), cfg=cfg, lcfg=lcfg, chunk_tokens=7
    )
    pm = peft.PeftModel.from_pretrained(hf_model(model_dir), os.path.join(run_dir, "adapter")).eval()
    with torch.no_grad():
        expected = float(pm(torch.from_numpy(IDS).long(), labels=torch.from_numpy(IDS).long()).loss)
    ours = float(total) / float(n)
    print(f"[family cli] {family} loss {ours:.6f} vs transformers {expected:.6f}")
    assert abs(ours - expected) <= FP32_ATOL


def test_export_and_generate_from_the_run(trained, tmp_path, capsys):
    """`lora-jax export --merged` of the run loads in transformers with our logits (the family's
    model_type and architecture written), and `lora-jax generate --checkpoint` decodes on it."""
    family, _, run_dir = trained
    merged = str(tmp_path / "merged")
    assert main(["export", "--checkpoint", run_dir, "--merged", merged]) == 0
    cfg, params, lora, lcfg, *_ = _load_run(run_dir)
    ours = np.asarray(lj.apply(lj.build_model(cfg), params, lora, lcfg, jnp.asarray(IDS)))
    with open(os.path.join(merged, "config.json")) as f:
        assert json.load(f)["model_type"] == family
    diff = max_diff(_torch_logits(hf_model(merged)), ours)
    print(f"[family cli] {family} merged export: max abs diff {diff:.3e}")
    assert diff <= FP32_ATOL
    capsys.readouterr()
    assert main(["generate", "--checkpoint", run_dir, "--prompt", "shout: double =>", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_flops_count_each_family():
    """The FLOP model reads each family's layout: GPT-2 124M's textbook adapters are PEFT's
    811,008 parameters, and Gemma 3's local layers count at most their window of keys."""

    gpt2 = config_from_hf(SHIPPED["gpt2.yaml"])
    assert lora_params(gpt2, 8, ["c_attn", "c_proj", "mlp.c_proj"]) == 811_008
    assert matmul_params(gpt2) == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    with pytest.raises(ValueError, match="unknown LoRA target 'q_proj' for gpt2"):
        lora_params(gpt2, 8, ["q_proj"])
    gemma = config_from_hf(SHIPPED["gemma-3-1b.yaml"])
    local, full = sum(gemma.sliding_layers), gemma.num_hidden_layers - sum(gemma.sliding_layers)
    attn = 12 * (local * 512 + full * 4096) * 4 * 256  # heads * head_dim, not the hidden size
    assert flops_per_token(gemma, 4096, 16) == 4 * matmul_params(gemma) + 6 * lora_params(gemma, 16) + attn


def _load_run(run_dir):

    return load_run(run_dir)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_sweep_runs_on_family(family, tmp_path, corpus):
    """A 2-point rank grid through `lora-jax sweep`: one compile, finite losses, a lower eval loss
    for each point, and each exported adapter loads in PEFT with our logits."""
    import peft

    model_dir = make_hf_family(tmp_path / "model", family)
    out = tmp_path / "sweep"
    sets = [s for s in RUN_SETS if not s.startswith(("train.save_every", "train.log_every", "lora.r="))]
    argv = ["sweep", "--model", model_dir, "--data", corpus, "--output-dir", str(out), "--no-progress"]
    assert main([*argv, "--grid", "lora.r=2,4", *_sets(sets)]) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["compiles"]["train_step"] == 1
    assert len(results["rows"]) == 2
    cfg, params = lj.load_pretrained(model_dir)
    model = lj.build_model(cfg)
    base = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    for row in results["rows"]:
        assert all(math.isfinite(x) for x in results["train_loss"][row["name"]])
        assert row["eval_loss"] < row["eval_loss_before"], row
        adapter = os.path.join(out, "adapters", row["name"])
        lora, lcfg = lj.load_peft(adapter, params)
        assert lcfg.r == row["lora.r"]
        ours = np.asarray(lj.apply(model, params, lora, lcfg, jnp.asarray(IDS)))
        assert max_diff(ours, base) > 1e-3
        pm = peft.PeftModel.from_pretrained(hf_model(model_dir), adapter).eval()
        assert max_diff(_torch_logits(pm), ours) <= FP32_ATOL


# ------------------------------------------------------------------------------ shipped run configs
# each family's shipped run config and the config.json of the model it is for (the benchmark's
# shape where it has one: experiments/bench/shapes.py)
SHIPPED = {
    "qwen3-1.7b.yaml": bench_script("shapes").get_shape("qwen3-1.7b"),
    "mistral-7b.yaml": dict(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,  # v0.1
    ),
    "gemma-3-1b.yaml": bench_script("shapes").get_shape("gemma-3-1b"),
    "gpt2.yaml": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


def test_every_family_config_is_checked():

    shipped = set(os.listdir(os.path.join(REPO, "experiments", "configs")))
    assert set(SHIPPED) <= shipped
    assert {n for n in shipped if n.endswith(".yaml") and not n.startswith("llama")} == set(SHIPPED)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_family_config_fits_its_model(name):
    """Beyond parsing (tests/test_train.py parses every shipped config): its targets exist in the
    family it is for, its rows fit the model's context, and a sliding window that cuts a row runs
    on an attention that takes it (cuDNN or XLA; the Pallas kernels take no window)."""

    with open(os.path.join(REPO, "experiments", "configs", name)) as f:
        run = lj.RunConfig.from_dict(yaml.safe_load(f))
    cfg = config_from_hf(SHIPPED[name])
    targets = plan_targets(shape_from_config(cfg), run.lora)
    assert targets and {t.layer for t in targets} == set(range(cfg.num_hidden_layers))
    assert run.data.seq_len <= cfg.max_position_embeddings
    window = cfg.sliding_window
    assert window is None or run.data.seq_len <= window or run.model.attention != "pallas"
    assert flops_per_token(cfg, run.data.seq_len, run.lora.r, sorted({t.name for t in targets})) > 0
    if name == "gpt2.yaml":  # the textbook count, as PEFT gives it (tests/test_gpt2.py)
        assert sum(t.r * (t.fan_in + t.fan_out) for t in targets) == 811_008


@pytest.mark.parametrize("vocab_axis", [0, 1])
def test_softcapped_chunked_loss_and_gradients(vocab_axis):
    """Gemma's final logit softcap inside the chunked loss (hand-written VJP) against autodiff of
    the plain formula, value and both gradients."""

    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (2, 9, 16))
    w = jax.random.normal(k[1], (16, 37) if vocab_axis == 1 else (37, 16))  # logits well past the cap
    t = jax.random.randint(k[2], (2, 9), 0, 37)
    m = (jax.random.uniform(k[3], (2, 9)) > 0.3).astype(jnp.float32)
    cap = 3.0

    def reference(h, w):
        logits = h @ (w if vocab_axis == 1 else w.T)
        logits = cap * jnp.tanh(logits / cap)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), t[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * m)

    ours = lambda h, w: chunked_cross_entropy(h, w, vocab_axis, t, m, 5, softcap=cap)[0]
    np.testing.assert_allclose(ours(h, w), reference(h, w), rtol=1e-6)
    plain = chunked_cross_entropy(h, w, vocab_axis, t, m, 5)[0]
    assert abs(float(plain) - float(reference(h, w))) > 1.0  # the cap matters at these logits
    for got, ref in zip(jax.grad(ours, argnums=(0, 1))(h, w), jax.grad(reference, argnums=(0, 1))(h, w)):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family, extra",
    [
        ("gpt2", ["lora.use_dora=true", "lora.modules_to_save=[ln_f]"]),  # Conv1D DoRA; a LayerNorm with bias
        ("gemma3_text", ["lora.use_dora=true", "lora.modules_to_save=[pre_feedforward_layernorm,norm]"]),
    ],
)
def test_dora_and_modules_to_save_through_the_cli(family, extra, tmp_path, corpus):
    """DoRA and trained norms (`modules_to_save`, as PEFT matches names: Gemma's 'norm' is every
    norm) on GPT-2 and Gemma 3: the run's export loads in PEFT with our logits, the saved norms
    have moved from the base, and the adapter loads back into lora_jax with the same logits."""
    import peft
    from safetensors import safe_open

    model_dir = make_hf_family(tmp_path / "model", family)
    run_dir = str(tmp_path / "run")
    argv = ["train", "--model", model_dir, "--data", corpus, "--output-dir", run_dir, "--no-progress"]
    assert main([*argv, *_sets([*RUN_SETS, "train.eval_generate=0", *extra])]) == 0
    cfg, params, lora, lcfg, *_ = _load_run(run_dir)
    assert lcfg.use_dora and lcfg.modules_to_save
    ours = np.asarray(lj.apply(lj.build_model(cfg), params, lora, lcfg, jnp.asarray(IDS)))
    adapter = os.path.join(run_dir, "adapter")
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "np") as f:
        keys = list(f.keys())
    final_norm = f"{layout_of(cfg).hf_base}.{layout_of(cfg).final_norm}.weight"
    assert "base_model.model." + final_norm in keys
    assert sum(k.endswith("lora_magnitude_vector") for k in keys) == sum(k.endswith("lora_A.weight") for k in keys)
    base_cfg, base_params = lj.load_pretrained(model_dir)
    assert max_diff(_leaf_of(params, cfg), _leaf_of(base_params, cfg)) > 1e-4, "the saved norm did not train"
    pm = peft.PeftModel.from_pretrained(hf_model(model_dir), adapter).eval()
    diff = max_diff(_torch_logits(pm), ours)
    print(f"[family cli] {family} DoRA + modules_to_save in PEFT: max abs diff {diff:.3e}")
    assert diff <= FP32_ATOL
    lora2, lcfg2, params2 = lj.load_peft(adapter, base_params, return_params=True)
    again = np.asarray(lj.apply(lj.build_model(base_cfg), params2, lora2, lcfg2, jnp.asarray(IDS)))
    assert max_diff(again, ours) <= FP32_ATOL


def _leaf_of(params, cfg):
    """The final norm's scale, one of the modules saved in both cases above."""
    return params[layout_of(cfg).final_norm]["scale"]


@pytest.mark.parametrize(
    "family, modules", [("gpt2", ["ln_f", "ln_2"]), ("gemma3_text", ["norm", "pre_feedforward_layernorm"])]
)
def test_peft_dora_modules_to_save_adapter_loads(family, modules, tmp_path):
    """An adapter PEFT itself wrote (DoRA, trained norms: GPT-2's LayerNorm biases too) loads with
    `load_peft(..., return_params=True)` and gives PEFT's logits."""
    import peft
    import torch

    model_dir = make_hf_family(tmp_path / "model", family, with_tokenizer=False)
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        init_lora_weights=False,
        use_dora=True,
        modules_to_save=modules,
        fan_in_fan_out=family == "gpt2",
    )
    pm = peft.get_peft_model(hf_model(model_dir), config).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    cfg, params = lj.load_pretrained(model_dir)
    lora, lcfg, trained = lj.load_peft(tmp_path / "adapter", params, return_params=True)
    ours = np.asarray(lj.apply(lj.build_model(cfg), trained, lora, lcfg, jnp.asarray(IDS)))
    without = np.asarray(lj.apply(lj.build_model(cfg), params, lora, lcfg, jnp.asarray(IDS)))
    assert max_diff(ours, without) > 1e-3  # the saved norms are applied
    assert max_diff(_torch_logits(pm), ours) <= FP32_ATOL


def test_rows_longer_than_gpt2_positions_are_refused(tmp_path, capsys, corpus):
    """GPT-2's learned position table has n_positions rows (128 here): longer rows are refused in
    one line before anything is written (JAX would clamp the index silently)."""

    model_dir = make_hf_family(tmp_path / "model", "gpt2")
    out = tmp_path / "run"
    argv = ["train", "--model", model_dir, "--data", corpus, "--output-dir", str(out), "--no-progress"]
    err = cli_error(capsys, [*argv, "--set", "data.seq_len=256"])
    assert "data.seq_len=256 exceeds this gpt2 model's n_positions=128" in err
    assert not out.exists()
