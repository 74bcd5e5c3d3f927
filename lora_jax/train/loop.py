"""The training loop: set-up, progress, metrics, evaluation, checkpoints, export, summary.

`train()` reads as its pieces: `_set_up` (checked input through `lora_jax.session`, the output
directory, the compiled steps), `_make_evaluate` (eval loss and exact match, `lora_jax.evaluate`),
`_StepLoop` (the steps, checkpoints, signals, timing), `_export_adapter`, then the summary.
These pieces share the run's state and are read in order, so they stay in one module (a little over
400 lines) rather than being scattered.

Everything that can refuse bad input (configs, data, model, output directory) runs before anything
is written, so a refused run leaves no trace. Output directory layout:

    run.json           the full RunConfig, the model config and the base fingerprint
    checkpoints/<step> Orbax: state (adapters, optimizer, step, rng) + meta (loader state, configs)
    metrics.jsonl      one line per step (loss, lr, grad_norm, tokens/s, ...) and per evaluation;
                       `--resume` drops what a killed run logged after its last checkpoint
    tb/                TensorBoard event files, with the `tensorboard` extra (purged on resume too)
    adapter/           the PEFT adapter exported at the end
    summary.json       eval_before, eval_after, train_loss_first/last, steps, tokens_per_s, ...

Preemption: the first SIGTERM (SLURM, TPU/cloud preemption) or SIGINT (Ctrl-C) during the loop lets
the step in flight finish, checkpoints that step (loader state included, so the resume is exact) and
raises `TrainingInterrupted`; a second signal acts as if the loop had installed nothing (SIGINT
raises KeyboardInterrupt at once, SIGTERM kills). Progress: a tqdm bar on a terminal, one plain
line per `train.log_every` steps when stderr is a file or a pipe.

Beside it: `lora_jax.train.output` (the output directory, refused / opened / resumed),
`lora_jax.train.progress` (progress bar, metrics.jsonl, TensorBoard), `lora_jax.train.signals`
(SIGTERM / SIGINT handling, `TrainingInterrupted`), `lora_jax.train.step` (the jitted steps).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from lora_jax.checkpoint import Checkpointer, base_fingerprint
from lora_jax.data import DataLoader
from lora_jax.errors import ConfigError, LoraJaxError
from lora_jax.evaluate import eval_loss, exact_match
from lora_jax.flops import PEAK_H100_MEASURED, flops_per_token, mfu
from lora_jax.hf.peft import save_peft
from lora_jax.lora.targets import model_shape, plan_targets
from lora_jax.lora.tree import combine, init_lora, split_trainable, unmerge
from lora_jax.models.attention import check_attention
from lora_jax.models.registry import build_model
from lora_jax.run_config import RunConfig
from lora_jax.session import fit_to_data, load_model, open_inputs
from lora_jax.sharding import make_mesh, place, rules_with
from lora_jax.train.output import (
    open_output,
    output_dir,
    prepare_output_dir,
    saved_eval_before,
    saved_first_loss,
    write_json,
)
from lora_jax.train.progress import MetricWriters, Progress, log_step
from lora_jax.train.signals import StopSignals, TrainingInterrupted
from lora_jax.train.step import init_state, make_eval_step, make_schedule, make_train_step, make_tx, shard_state

__all__ = ["train", "TrainingDiverged", "TrainingInterrupted", "prepare_output_dir"]


class TrainingDiverged(LoraJaxError):
    """The loss became NaN or infinite."""


def _peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    return PEAK_H100_MEASURED if ("h100" in kind or "h200" in kind) else None


def train(
    run: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run (or resume) training; returns the summary (also written to `summary.json`)."""
    out = output_dir(run.train.output_dir)
    run = prepare_output_dir(out, run, resume, overwrite)
    t_setup = time.perf_counter()
    s = _set_up(run, out, resume, overwrite)
    evaluate = _make_evaluate(s)
    eval_before = evaluate(s.state.trainable) if s.start_step == 0 else saved_eval_before(out)
    if s.start_step == 0:
        s.writers.write({"step": 0, "event": "eval", **eval_before}, 0)
        write_json(os.path.join(out, "eval_before.json"), eval_before, s.is_main)
    fpt = flops_per_token(s.cfg, s.data.seq_len, run.lora.r, sorted({t.name for t in s.targets}))
    peak = _peak_flops()
    tcfg = run.train
    progress_out = Progress(tcfg.steps, s.start_step, tcfg.log_every) if progress and s.is_main else None
    first_loss = saved_first_loss(out) if s.start_step else None
    setup_s = time.perf_counter() - t_setup
    loop = _StepLoop(s, evaluate, progress_out, on_step, first_loss, fpt, peak)
    loop.run()
    tokens_per_s = loop.settle()
    eval_after = evaluate(loop.state.trainable)
    s.writers.write({"step": loop.step, "event": "eval", **eval_after}, loop.step)
    s.writers.close()
    s.ckpt.close()
    adapter_dir = _export_adapter(s, loop.state.trainable, resume)
    summary = _summary(s, loop, eval_before, eval_after, tokens_per_s, setup_s, adapter_dir)
    write_json(os.path.join(out, "summary.json"), summary, s.is_main)
    return summary


class _Setup(NamedTuple):
    """What the loop runs on: checked input, the loaded model, the state to start from, the open
    output directory and the compiled steps (`_set_up`)."""

    out: str
    run: RunConfig
    data: Any  # DataConfig: `session.data_config(run)`
    model_path: str
    tokenizer: Any
    datasets: Any
    mesh: Any
    cfg: Any  # the family's model config (LlamaConfig, GPT2Config, Gemma3Config)
    targets: list
    fingerprint: Any
    loader: DataLoader
    state: Any  # TrainState: fresh, or restored when resuming
    frozen: Any
    shardings: Any  # StepShardings
    ckpt: Checkpointer
    step_fn: Callable
    eval_fn: Callable
    writers: MetricWriters
    start_step: int
    process_index: int
    process_count: int

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


def _set_up(run: RunConfig, out: str, resume: bool, overwrite: bool) -> _Setup:
    """Everything that validates input (configs, data, model) runs before anything is written;
    then the output directory is opened (`open_output`), run.json written, the steps compiled."""
    tcfg, ocfg, lcfg = run.train, run.optim, run.lora
    inputs = open_inputs(run)
    check_attention(run.model.attention)
    mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    rules = rules_with(run.mesh.rules)
    if tcfg.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ConfigError(
            f"train.batch_size={tcfg.batch_size} must divide by the data-parallel size "
            f"{mesh.shape['data'] * mesh.shape['fsdp']} (mesh.data x mesh.fsdp)"
        )
    cfg, params = load_model(run.model, inputs.model_path, mesh=mesh, rules=rules)
    cfg = fit_to_data(cfg, inputs)
    lora = place(init_lora(params, lcfg, jax.random.key(tcfg.seed)), mesh, rules)
    if lcfg.init_lora_weights == "pissa":
        params = unmerge(params, lora, lcfg)
    targets = plan_targets(model_shape(params), lcfg)
    split = split_trainable(params, lora, lcfg)
    fingerprint = base_fingerprint(params)
    nproc, pidx = jax.process_count(), jax.process_index()
    loader = DataLoader(inputs.datasets.train_rows, tcfg.batch_size, inputs.data.seed, pidx, nproc)
    schedule = make_schedule(ocfg, tcfg.steps)
    tx = make_tx(lcfg, ocfg, schedule)
    state, frozen, shardings = shard_state(init_state(split.trainable, tx, tcfg.seed), split.frozen, mesh, rules)
    state, ckpt = open_output(out, run, state, loader, fingerprint, inputs.model_path, resume, overwrite)
    if pidx == 0:
        run_record = {
            "run": run.to_dict(),
            "model_config": cfg.to_dict(),
            "model_path": inputs.model_path,
            "fingerprint": fingerprint,
            "data_stats": inputs.datasets.stats,
        }
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump(run_record, f, indent=2)

    model = build_model(cfg)
    step_fn = make_train_step(
        model,
        cfg,
        lcfg,
        tx,
        schedule,
        grad_accum=tcfg.grad_accum,
        chunk_tokens=run.model.loss_chunk_tokens,
        use_segments=inputs.data.packing,
        jit_kwargs=shardings.step_jit_kwargs(),
    )
    eval_fn = make_eval_step(
        model, cfg, lcfg, chunk_tokens=run.model.loss_chunk_tokens, use_segments=inputs.data.packing
    )
    start_step = int(state.step)
    writers = MetricWriters(out, pidx == 0, resume_step=start_step if resume else None)
    return _Setup(
        out,
        run,
        inputs.data,
        inputs.model_path,
        inputs.tokenizer,
        inputs.datasets,
        mesh,
        cfg,
        targets,
        fingerprint,
        loader,
        state,
        frozen,
        shardings,
        ckpt,
        step_fn,
        eval_fn,
        writers,
        start_step,
        pidx,
        nproc,
    )


def _make_evaluate(s: _Setup) -> Callable[[Any], dict]:
    """`evaluate(trainable) -> {"eval_loss", "exact_match"}` on the held-out data (each only when
    the data has it). Evaluation runs in the training micro-batches (grad_accum sets them to what
    fits in memory), over the same rows as `train.eval_batches` full batches."""
    tcfg = s.run.train
    dp = s.mesh.shape["data"] * s.mesh.shape["fsdp"]
    eval_batch = tcfg.batch_size // tcfg.grad_accum
    if eval_batch % dp:
        eval_batch = tcfg.batch_size
    eval_steps = tcfg.eval_batches * (tcfg.batch_size // eval_batch)

    def evaluate(trainable) -> dict:
        res: dict[str, Any] = {}
        if s.datasets.eval_rows:
            res["eval_loss"] = float(
                eval_loss(
                    lambda batch: s.eval_fn(trainable, s.frozen, s.shardings.put_batch(batch)),
                    s.datasets.eval_rows,
                    eval_batch,
                    eval_steps,
                    process_index=s.process_index,
                    process_count=s.process_count,
                )
            )
        if tcfg.eval_generate and s.datasets.eval_records:
            p, lo = combine(trainable, s.frozen)
            res["exact_match"] = exact_match(
                s.datasets.eval_records, s.cfg, p, lo, s.run.lora, s.tokenizer, tcfg.max_new_tokens, tcfg.eval_generate
            )
        return res

    return evaluate


class _StepLoop:
    """The steps from `start_step` to `train.steps`: metrics read one step late (so the device
    never idles), logged, checkpointed every `save_every` steps and at the end, evaluated every
    `eval_every`; a stop signal checkpoints the step just taken and raises TrainingInterrupted.

    Timing: the first (compiling) step is `compile_s`; tokens/s counts the later steps' wall
    clock, less the seconds spent checkpointing and evaluating between them (`paused`, reported,
    so a short run's last save does not weigh on its throughput)."""

    def __init__(self, s: _Setup, evaluate: Callable, progress_out, on_step, first_loss, fpt, peak):
        self.s, self.tcfg, self.evaluate = s, s.run.train, evaluate
        self.progress_out, self.on_step, self.fpt, self.peak = progress_out, on_step, fpt, peak
        self.state, self.step = s.state, s.start_step
        self.losses: list[float] = []
        self.first_loss = first_loss
        self.compile_s: float | None = None
        self.tokens_timed, self.time_timed = 0.0, 0.0
        self.pending: tuple[int, Any, float] | None = None  # (step, metrics, t0) of the step in flight
        self.last_done = time.perf_counter()
        self.paused = {"checkpoint_s": 0.0, "eval_s": 0.0}
        self.t_prev = self.last_done

    def run(self) -> None:
        s = self.s
        self.t_prev = time.perf_counter()
        stop = StopSignals(s.process_count, sync_every=self.tcfg.log_every, last_step=self.tcfg.steps)
        try:
            with stop:
                while self.step < self.tcfg.steps:
                    saved = self._step_once()
                    if stop.requested(self.step):  # SIGTERM / SIGINT: checkpoint the step just taken, then stop
                        self._flush()
                        if not saved:
                            self._save(self.step)
                        s.ckpt.wait()
                        assert stop.signum is not None  # requested() is true only once a signal is recorded
                        raise TrainingInterrupted(self.step, stop.signum, s.out)
                self._flush()
        except KeyboardInterrupt:
            s.writers.close()
            if stop.signum is None:  # a plain Ctrl-C (no handler of ours was installed): keep the save
                s.ckpt.wait()
                s.ckpt.close()
            # else a second signal during the interruption's save: leave at once; Orbax only renames a
            # complete checkpoint, so the one abandoned mid-write is invisible to --resume
            raise
        except BaseException:
            s.writers.close()
            s.ckpt.wait()
            s.ckpt.close()
            raise
        finally:
            if self.progress_out is not None:
                self.progress_out.close()

    def _step_once(self) -> bool:
        """One step, then the checkpoint and evaluation due after it; returns whether it saved."""
        s, tcfg = self.s, self.tcfg
        batch = next(s.loader)
        t0 = time.perf_counter()
        self.state, metrics = s.step_fn(self.state, s.frozen, s.shardings.put_batch(batch))
        self.step += 1
        step = self.step
        self._flush()
        self.pending = (step, metrics, t0)
        if step == s.start_step + 1:
            jax.block_until_ready(self.state.step)
            compile_s = time.perf_counter() - t0
            self.compile_s = compile_s
            self.pending = None
            m, _ = self._finish(step, metrics, t0)
            self._log(m, compile_s, step)
            self.t_prev = time.perf_counter()
        else:
            now = time.perf_counter()
            self.tokens_timed += float(np.sum(batch["loss_mask"] >= 0))  # all slots processed
            self.time_timed += now - self.t_prev
            self.t_prev = now
        saved = step % tcfg.save_every == 0 or step == tcfg.steps
        if saved:
            self._flush()  # never checkpoint a state whose loss we have not checked
            self._save(step)
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
            t = time.perf_counter()
            res = self.evaluate(self.state.trainable)
            s.writers.write({"step": step, "event": "eval", **res}, step)
            self.paused["eval_s"] += time.perf_counter() - t
        return saved

    def _flush(self) -> None:
        """Fetch and log the metrics of the step in flight, if any."""
        if self.pending is not None:
            step, metrics, t0 = self.pending
            self.pending = None
            self._log(*self._finish(step, metrics, t0), step)

    def _finish(self, step: int, metrics, t0: float) -> tuple[dict[str, float], float]:
        """Fetch a step's metrics (blocking); dt is the time since the previous step finished."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt, self.last_done = now - max(self.last_done, t0), now
        if not math.isfinite(m["loss"]):
            steps_saved = self.s.ckpt.all_steps()
            where = (
                f"The last good checkpoint is step {max(steps_saved)} in {os.path.join(self.s.out, 'checkpoints')}"
                if steps_saved
                else f"No checkpoint was written yet (the first was due at step "
                f"{min(self.tcfg.save_every, self.tcfg.steps)})"
            )
            raise TrainingDiverged(
                f"loss became {m['loss']} at step {step}; stopped. {where}. Lower optim.lr or raise optim.warmup_steps"
            )
        if self.first_loss is None:
            self.first_loss = m["loss"]
        self.losses.append(m["loss"])
        return m, dt

    def _log(self, m: dict, dt: float, step: int) -> None:
        record = log_step(
            m, dt, step, self.s.writers, self.progress_out, self.tcfg, self.fpt, self.peak, self.s.data.seq_len
        )
        if self.on_step is not None:
            self.on_step(step, record)

    def _save(self, step: int) -> None:
        s, t = self.s, time.perf_counter()
        s.ckpt.save(
            step,
            self.state,
            {
                "loader": s.loader.get_state(),
                "fingerprint": s.fingerprint,
                "run": s.run.to_dict(),
                "model_config": s.cfg.to_dict(),
                "model_path": s.model_path,
                "first_loss": self.first_loss,
            },
        )
        self.paused["checkpoint_s"] += time.perf_counter() - t

    def settle(self) -> float | None:
        """After the loop: wait for the last checkpoint; tokens/s over the timed steps (the first,
        compiling step excluded), wall clock per step, less checkpointing and evaluation."""
        jax.block_until_ready(self.state.trainable)
        t = time.perf_counter()
        self.s.ckpt.wait()
        self.paused["checkpoint_s"] += time.perf_counter() - t
        self.time_timed += time.perf_counter() - self.t_prev - sum(self.paused.values())
        if self.time_timed > 0 and self.tokens_timed:
            return self.tokens_timed * 1.0 / self.time_timed
        return None


def _export_adapter(s: _Setup, trainable, resume: bool) -> str | None:
    """The PEFT adapter in `<out>/adapter` (when `train.export_peft`); its path on process 0."""
    if not s.run.train.export_peft:
        return None
    if s.process_count > 1:  # every process takes part in the gather; process 0 writes
        trainable = multihost_utils.process_allgather(trainable, tiled=True)
    p, lo = combine(trainable, s.frozen)
    if not s.is_main:
        return None
    adapter_dir = os.path.join(s.out, "adapter")
    save_peft(adapter_dir, lo, s.run.lora, s.cfg, base_model_name_or_path=s.model_path, params=p, overwrite=resume)
    return adapter_dir


def _summary(
    s: _Setup,
    loop: _StepLoop,
    eval_before: dict,
    eval_after: dict,
    tokens_per_s: float | None,
    setup_s: float,
    adapter_dir: str | None,
) -> dict:
    """summary.json: the evaluations before and after, the losses, throughput and timings."""
    fpt, peak = loop.fpt, loop.peak
    return {
        "eval_before": eval_before.get("exact_match"),
        "eval_after": eval_after.get("exact_match"),
        "eval_loss_before": eval_before.get("eval_loss"),
        "eval_loss_after": eval_after.get("eval_loss"),
        "train_loss_first": loop.first_loss,
        "train_loss_last": loop.losses[-1] if loop.losses else None,
        "steps": loop.step,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, fpt, peak) if (peak and tokens_per_s) else None,
        "compile_s": loop.compile_s,
        "checkpoint_s": loop.paused["checkpoint_s"],
        "setup_s": setup_s,
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(loop.state.trainable))),
        "device": jax.devices()[0].device_kind,
        "adapter_dir": adapter_dir,
        "output_dir": s.out,
        "data": s.datasets.stats,
    }
