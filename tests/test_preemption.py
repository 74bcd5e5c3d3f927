"""Preemption and the loop's messages: SIGTERM / SIGINT checkpoint the step in flight and the resume
equals an uninterrupted run bit for bit; a second signal leaves at once; plain progress lines off a
terminal; one-line errors for a diverged run with no checkpoint, an --output-dir that is a file, a
resume whose config does not fit its checkpoint, a model directory without a tokenizer.

One uninterrupted reference run (in process) serves the module."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from lora_jax.checkpoint import Checkpointer
from lora_jax.cli import main
from lora_jax.demo import DEMO_MODEL, demo_run_config
from lora_jax.errors import ConfigError
from lora_jax.train.loop import TrainingInterrupted, train
from lora_jax.train.signals import StopSignals
from tests.helpers import CLI, cli_error, step_losses, steps_logged
from tests.helpers import cli_env as _env

STEPS = 10
SETTINGS = [
    f"train.steps={STEPS}",
    "train.save_every=100",
    "train.batch_size=8",
    "train.eval_generate=0",
    "train.eval_batches=1",
    "train.log_every=2",
    "optim.warmup_steps=2",
]
CLI_SETTINGS = [arg for kv in SETTINGS for arg in ("--set", kv)]


def _run(out, *extra):
    return demo_run_config().with_overrides([*SETTINGS, *extra, f"train.output_dir={out}"])


def _adapter_bytes(out):
    with open(os.path.join(out, "adapter", "adapter_model.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, with progress on and stderr a StringIO (not a terminal)."""
    out = tmp_path_factory.mktemp("preempt") / "ref"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train(_run(out), progress=True)
    return {"out": str(out), "stderr": err.getvalue(), "losses": step_losses(out), "adapter": _adapter_bytes(out)}


def _assert_resumes_to_reference(out, reference):
    assert main(["train", "--output-dir", str(out), "--resume", "--no-progress"]) == 0
    assert step_losses(out) == reference["losses"]  # each step once, the same losses
    assert _adapter_bytes(out) == reference["adapter"]


def test_progress_is_plain_lines_off_a_terminal(reference):
    lines = [x for x in reference["stderr"].splitlines() if x.startswith("train step")]
    assert [x.split(":")[0] for x in lines] == [f"train step {s}/{STEPS}" for s in range(2, STEPS + 1, 2)]
    assert all("loss" in x and "lr" in x and "tokens/s" in x for x in lines), lines
    assert "\r" not in reference["stderr"] and "it/s" not in reference["stderr"]  # no tqdm redraws


def test_sigterm_saves_the_step_and_resumes_bit_exact(tmp_path, reference, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, "train", "--output-dir", str(out), "--no-progress", *CLI_SETTINGS],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while steps_logged(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    saved = Checkpointer(str(out / "checkpoints")).all_steps()
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved
    step = saved[0]
    assert f"SIGTERM received: stopped after step {step} and saved a checkpoint at step {step}" in err, err
    assert f"lora-jax train --output-dir {out} --resume" in err
    assert steps_logged(out) == step  # the step in flight was finished and logged before the save
    _assert_resumes_to_reference(out, reference)


def test_sigint_saves_the_step_and_resumes_bit_exact(tmp_path, reference):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def ctrl_c(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        train(_run(out), progress=False, on_step=ctrl_c)
    e = info.value
    # step 3's metrics are read while step 4 runs: step 4 is the one in flight, finished and saved
    assert (e.step, e.signum, e.exit_code) == (4, signal.SIGINT, 130)
    assert "SIGINT received: stopped after step 4 and saved a checkpoint at step 4" in str(e)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert Checkpointer(str(out / "checkpoints")).all_steps() == [4]
    _assert_resumes_to_reference(out, reference)


def test_second_signal_during_the_save_leaves_at_once(tmp_path, monkeypatch):
    """First SIGTERM: the loop saves; during that save the previous handlers are back, so a Ctrl-C
    raises KeyboardInterrupt at once instead of waiting for the write."""
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real_save = Checkpointer.save
    seen = {}

    def save(self, step, state, meta):
        real_save(self, step, state, meta)  # the asynchronous write is now in flight
        seen["ckpt"] = self
        seen["handlers"] = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        seen["t"] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGINT)

    def preempt(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Checkpointer, "save", save)
    with pytest.raises(KeyboardInterrupt):
        train(_run(out), progress=False, on_step=preempt)
    left_after = time.perf_counter() - seen["t"]
    seen["ckpt"].wait()  # let the abandoned write end before the next test
    seen["ckpt"].close()
    assert seen["handlers"] == before  # handed back at the first signal
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert left_after < 1.0, left_after


def test_multihost_processes_agree_on_the_step(monkeypatch):
    """Several processes: a signal caught here counts at the next all-gather (every `sync_every`
    steps, the same steps everywhere); JAX's preemption sync point stops every process at once."""
    from jax.experimental import multihost_utils

    from lora_jax.train import signals

    gathered = []
    monkeypatch.setattr(
        multihost_utils, "process_allgather", lambda x: gathered.append(int(x)) or np.array([int(x), 0])
    )
    monkeypatch.setattr(signals, "_preemption_service_running", lambda: False)
    stop = StopSignals(nproc=2, sync_every=4, last_step=10)
    with stop:
        stop._handle(signal.SIGINT, None)
        assert [stop.requested(s) for s in (1, 2, 3, 4)] == [False, False, False, True]
    assert gathered == [signal.SIGINT] and stop.signum == signal.SIGINT
    stop = StopSignals(nproc=2, sync_every=4, last_step=10)
    gathered.clear()
    assert [stop.requested(s) for s in (8, 9, 10)] == [False, False, False]
    assert gathered == [0, 0]  # the last step is agreed on too, so no signal is left unheard

    sync_point = iter([False, True])
    monkeypatch.setattr(signals, "_preemption_service_running", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: next(sync_point))
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals(nproc=2, sync_every=4, last_step=10)
    with stop:
        assert signal.getsignal(signal.SIGTERM) is before  # JAX's preemption notifier keeps SIGTERM
        assert [stop.requested(s) for s in (5, 6)] == [False, True]
    assert stop.signum == signal.SIGTERM


def test_divergence_without_a_checkpoint_says_so(tmp_path, capsys):
    err = cli_error(
        capsys,
        [
            "train",
            "--output-dir",
            str(tmp_path / "nan"),
            "--no-progress",
            *CLI_SETTINGS,
            "--set",
            "optim.lr=1e30",
            "--set",
            "optim.clip_norm=null",
            "--set",
            "optim.warmup_steps=0",
        ],
        code=1,
    )
    assert "loss became" in err and "No checkpoint was written yet" in err and "[]" not in err, err


def test_output_dir_naming_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    for out in (path, path / "run"):
        err = cli_error(capsys, ["train", "--output-dir", str(out), "--no-progress"])
        assert str(path) in err and "not a directory" in err, err
    assert path.read_text() == "keep me"


def test_output_dir_that_is_not_a_string_is_refused(tmp_path):
    run = _run(tmp_path / "x")
    object.__setattr__(run.train, "output_dir", 1.0e5)  # a YAML float, past the config's own check
    with pytest.raises(ConfigError, match=r"output_dir=100000.0 is not a directory path \(it was read as"):
        train(run, progress=False)


def test_resume_with_a_config_that_does_not_fit_is_one_line(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    with open(out / "run.json") as f:
        record = json.load(f)
    record["run"]["lora"]["r"] = 4
    with open(out / "run.json", "w") as f:
        json.dump(record, f)
    err = cli_error(capsys, ["train", "--output-dir", str(out), "--resume", "--no-progress"])
    assert str(out) in err and "adapter shapes differ" in err and "lora.r=4" in err and "--overwrite" in err


def test_model_dir_without_tokenizer_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(DEMO_MODEL):
        if not name.startswith("tokenizer"):
            shutil.copy(os.path.join(DEMO_MODEL, name), model / name)
    err = cli_error(capsys, ["train", "--model", str(model), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert str(model) in err and "tokenizer.json" in err, err
    assert not (tmp_path / "out").exists()
