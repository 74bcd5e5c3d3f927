"""Training end to end on the built-in tiny model: exact resume after SIGKILL (also during a
save), packing, gradient accumulation, divergence, shipped configs, and bad input at the CLI."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import lora_jax as lj
from lora_jax.cli import main
from lora_jax.config import RunConfig
from lora_jax.demo import DEMO_MODEL, demo_run_config
from tests.helpers import CLI, REPO, cli_error, step_losses, steps_logged, unpacked_batch
from tests.helpers import cli_env as _env

QUICK = [
    "--set",
    "train.steps=12",
    "--set",
    "train.save_every=4",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.eval_generate=0",
    "--set",
    "train.eval_batches=1",
    "--set",
    "train.log_every=1",
    "--no-progress",
]


def _train_cmd(out, *extra):
    return [*CLI, "train", "--output-dir", str(out), *QUICK, *extra]


def _final_trainable(run_dir):
    from lora_jax.session import load_run

    _, params, lora, _, _, step, _ = load_run(str(run_dir))
    return step, lora


KILL_DURING_SAVE = """
import os, signal, sys
from lora_jax import checkpoint
real = checkpoint.Checkpointer.save
def save(self, step, state, meta):
    real(self, step, state, meta)          # the async write is now in flight
    if step == 8:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save
from lora_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    env = _env()
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref), check=True, env=env, capture_output=True)

    # killed at a random step after the first checkpoint, then resumed
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at = int(np.random.default_rng().integers(5, 11))
    deadline = time.time() + 300
    committed = killed / "checkpoints" / "4"  # Orbax renames the step directory when the save is complete
    while (steps_logged(killed) < kill_at or not committed.is_dir()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 4 <= steps_logged(killed) < 12  # killed mid-run
    r = subprocess.run(
        [*CLI, "train", "--output-dir", str(killed), "--resume", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]

    # killed inside a save (step 8's write in flight): resume falls back to step 4
    mid = tmp_path / "mid_save"
    r = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, "train", "--output-dir", str(mid), *QUICK],
        env=env,
        capture_output=True,
    )
    assert r.returncode == -signal.SIGKILL
    subprocess.run(
        [*CLI, "train", "--output-dir", str(mid), "--resume", "--no-progress"], check=True, env=env, capture_output=True
    )

    step_ref, lora_ref = _final_trainable(ref)
    for run in (killed, mid):
        step, lora = _final_trainable(run)
        assert step == step_ref == 12
        for a, b in zip(jax.tree.leaves(lora_ref), jax.tree.leaves(lora)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{run.name}: adapters differ"
        # the log reads as one run: each step once, with the uninterrupted run's losses
        assert step_losses(run) == step_losses(ref), f"{run.name}: metrics.jsonl differs"
    with open(ref / "summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 12 and os.path.isfile(ref / "adapter" / "adapter_model.safetensors")


def _rows(tokenizer, packing):
    from lora_jax.data import DataConfig, build_datasets
    from lora_jax.demo import DEMO_EVAL

    cfg = DataConfig(train_file=DEMO_EVAL, eval_fraction=0.0, seq_len=128, packing=packing)
    return build_datasets(cfg, tokenizer).train_rows


def test_packed_loss_equals_documents_alone(demo_tokenizer):
    from lora_jax.train.step import make_eval_step

    cfg, params = lj.load_pretrained(DEMO_MODEL)
    lcfg = lj.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    split = lj.split_trainable(params, lora, lcfg)
    model = lj.Llama(cfg)
    packed = _rows(demo_tokenizer, True)[0]
    n_docs = int(packed["segment_ids"].max())
    assert n_docs >= 3
    packed_step = make_eval_step(model, cfg, lcfg, use_segments=True)
    alone_step = make_eval_step(model, cfg, lcfg, use_segments=False)
    for doc in range(1, n_docs + 1):
        sel = packed["segment_ids"] == doc
        batch = {k: v[None] for k, v in packed.items()}
        batch["loss_mask"] = (packed["loss_mask"] * sel)[None]
        loss_packed, n = packed_step(split.trainable, split.frozen, batch)
        # the same document alone, at the start of a row
        alone = {k: np.zeros_like(v) for k, v in packed.items()}
        length = int(sel.sum())
        for k in alone:
            alone[k][:length] = packed[k][sel]
        loss_alone, n2 = alone_step(split.trainable, split.frozen, {k: v[None] for k, v in alone.items()})
        assert float(n) == float(n2) > 0
        np.testing.assert_allclose(float(loss_packed), float(loss_alone), rtol=2e-6)


def test_grad_accumulation_equals_one_batch():
    from lora_jax.train.step import init_state, make_schedule, make_train_step, make_tx

    cfg, params = lj.load_pretrained(DEMO_MODEL)
    lcfg = lj.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    split = lj.split_trainable(params, lj.init_lora(params, lcfg, jax.random.key(0)), lcfg)
    ocfg = lj.config.OptimConfig(lr=1e-3)
    sched = make_schedule(ocfg, 10)
    tx = make_tx(lcfg, ocfg, sched)
    rng = np.random.default_rng(0)
    batch = unpacked_batch(
        rng.integers(5, 99, (8, 32)).astype(np.int32),
        rng.integers(5, 99, (8, 32)).astype(np.int32),
        (rng.random((8, 32)) > 0.3).astype(np.float32),
    )
    outs = []
    for accum in (1, 4):
        step = make_train_step(lj.Llama(cfg), cfg, lcfg, tx, sched, grad_accum=accum)
        state, m = step(init_state(jax.tree.map(jnp.copy, split.trainable), tx, 0), split.frozen, batch)
        outs.append((state, m))
    np.testing.assert_allclose(outs[0][1]["loss"], outs[1][1]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(outs[0][0].trainable), jax.tree.leaves(outs[1][0].trainable)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_divergence_stops_with_the_step(tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["train", "--output-dir", str(out), *QUICK, "--set", "optim.lr=1e30", "--set", "optim.clip_norm=null"])
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became" in err and "at step" in err


def test_shipped_configs_load():
    paths = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.yaml")))
    assert len(paths) >= 2
    for path in paths:
        with open(path) as f:
            run = RunConfig.from_dict(yaml.safe_load(f))
        assert run.lora.r > 0 and run.train.steps > 0
    demo = demo_run_config()
    assert RunConfig.from_dict(demo.to_dict()) == demo


def _bad(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "case",
    [
        "missing_data",
        "malformed",
        "missing_fields",
        "empty",
        "overlong",
        "no_config",
        "no_weights",
        "unknown_key",
        "bad_value",
        "bad_bool",
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    out = tmp_path / "out"
    args = {
        "missing_data": ["--data", str(tmp_path / "nope.jsonl")],
        "malformed": ["--data", _bad(tmp_path, "bad.jsonl", '{"text": "a"}\n{"text": "b",,}\n')],
        "missing_fields": ["--data", _bad(tmp_path, "f.jsonl", '{"prompt": "a"}\n')],
        "empty": ["--data", _bad(tmp_path, "e.jsonl", "")],
        "overlong": ["--set", "data.seq_len=8", "--set", "data.overlong=error"],
        "no_config": ["--model", str(tmp_path)],
        "no_weights": ["--model", str(tmp_path / "m")],
        "unknown_key": ["--set", "lora.rank=4"],
        "bad_value": ["--set", "lora.r=0"],
        "bad_bool": ["--set", "model.fuse_wide_adapters=maybe"],
    }[case]
    if case == "no_weights":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text(
            json.dumps(
                lj.LlamaConfig(
                    vocab_size=100,
                    hidden_size=8,
                    intermediate_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                ).to_hf_dict()
            )
        )
    err = cli_error(capsys, ["train", "--output-dir", str(out), "--no-progress", *args])
    expected = {
        "missing_data": "nope.jsonl",
        "malformed": "bad.jsonl:2",
        "missing_fields": "completion",
        "empty": "e.jsonl",
        "overlong": "seq_len",
        "no_config": "config.json",
        "no_weights": "safetensors",
        "unknown_key": "did you mean lora.r",
        "bad_value": "r=0",
        "bad_bool": "fuse_wide_adapters='maybe'; use true or false",
    }[case]
    assert expected in err, err
    assert not out.exists()


def test_output_dir_holding_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"run": demo_run_config().to_dict()}))
    (out / "metrics.jsonl").write_text("")
    code = main(["train", "--output-dir", str(out), "--no-progress", "--set", "lora.r=4"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "run.json"]


def test_export_from_a_run_needs_nothing_retyped(tmp_path, capsys):
    import peft
    import torch
    import transformers

    from lora_jax.session import load_run

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(run),
                *QUICK,
                "--set",
                "train.steps=4",
                "--set",
                "lora.init_lora_weights=false",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(run),
                "--peft",
                str(tmp_path / "adapter"),
                "--merged",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    cfg, params, lora, lcfg, _, step, _ = load_run(str(run))
    assert step == 4
    ids = np.random.default_rng(0).integers(5, 99, (2, 17)).astype(np.int32)
    ours = np.asarray(lj.apply(lj.Llama(cfg), params, lora, lcfg, jnp.asarray(ids)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        t = torch.from_numpy(ids).long()
        for model in (merged, peft_model):
            assert np.max(np.abs(model(t).logits.numpy() - ours)) <= 1e-4
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")


def test_fingerprint_tells_bases_apart_not_meshes():
    from lora_jax.checkpoint import base_fingerprint, fingerprints_match

    _, p1 = lj.load_pretrained(DEMO_MODEL)
    _, p2 = lj.load_pretrained(DEMO_MODEL, mesh=lj.make_mesh(1, 2, 4))
    f1 = base_fingerprint(p1)
    assert fingerprints_match(f1, base_fingerprint(p2))
    changed = jax.tree.map(lambda x: x, p1)
    changed["norm"]["scale"] = changed["norm"]["scale"] * 1.01
    assert not fingerprints_match(f1, base_fingerprint(changed))
    permuted = jax.tree.map(lambda x: x, p1)
    permuted["norm"]["scale"] = permuted["norm"]["scale"][::-1]
    assert not fingerprints_match(f1, base_fingerprint(permuted))


def test_metrics_without_tensorboard_extra(tmp_path, monkeypatch, capsys):
    """Without the optional tensorboardX, metrics.jsonl still gets every record and one notice
    names the extra to install."""
    import json
    import sys

    from lora_jax.train.progress import MetricWriters

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    writers = MetricWriters(str(tmp_path), enabled=True)
    writers.write({"step": 1, "loss": 2.5}, 1)
    writers.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 2.5}]
    assert not (tmp_path / "tb").exists()
    assert "lora-jax[tensorboard]" in capsys.readouterr().err
