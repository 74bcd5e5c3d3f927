"""What the loop reports: a progress bar or plain lines, and the metrics files.

- `Progress`: a tqdm bar on a terminal (or in a notebook); one plain line per `train.log_every`
  steps when stderr is a file or a pipe.
- `MetricWriters`: `metrics.jsonl` (one line per step and per evaluation) and TensorBoard event
  files under `tb/`, on process 0 only; a resumed run drops what the killed run logged after its
  last checkpoint from both.
- `log_step`: one step's record, written and shown.
"""

from __future__ import annotations

import json
import math
import os
import sys

__all__ = ["MetricWriters", "Progress", "log_step", "metric_lines", "truncate_metrics"]


class MetricWriters:
    """metrics.jsonl + TensorBoard, on process 0 only."""

    def __init__(self, out: str, enabled: bool, resume_step: int | None = None):
        """resume_step: the checkpoint a resumed run starts from; what the killed run logged after
        it is dropped (it is about to be logged again) from metrics.jsonl and, through TensorBoard's
        `purge_step`, from the event files."""
        self.enabled = enabled
        path = os.path.join(out, "metrics.jsonl")
        if enabled and resume_step is not None:
            truncate_metrics(path, resume_step)
        self.jsonl = open(path, "a") if enabled else None
        self.tb = None
        if enabled:
            writer = _summary_writer()
            purge = None if resume_step is None else resume_step + 1
            self.tb = writer(os.path.join(out, "tb"), purge_step=purge) if writer else None

    def write(self, record: dict, step: int, tb: bool = True):
        if self.jsonl is None:  # not enabled
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if tb and self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def _summary_writer():
    """tensorboardX's `SummaryWriter`, or None (with one notice) when the optional extra is absent:
    metrics.jsonl holds every record either way. Imported on first use: a slow import (protobuf),
    needed on process 0 only."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        print(
            "note: TensorBoard event files are not written: tensorboardX is not installed "
            "(pip install 'lora-jax[tensorboard]'); metrics.jsonl has every record",
            file=sys.stderr,
        )
        return None
    return SummaryWriter


def metric_lines(path: str):
    """(line, record) for each readable line of a metrics.jsonl (a line torn by a kill is skipped)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


def truncate_metrics(path: str, last_step: int) -> None:
    """Keep the records of steps <= last_step (and drop a line torn by a kill), atomically."""
    if not os.path.isfile(path):
        return
    kept = [
        line if line.endswith("\n") else line + "\n"
        for line, rec in metric_lines(path)
        if rec.get("step", 0) <= last_step
    ]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def log_step(m: dict, dt: float, step: int, writers: MetricWriters, progress, tcfg, fpt, peak, seq_len: int) -> dict:
    """Write one step's record (TensorBoard every `log_every` steps and at step 1) and show it."""
    tokens_per_s = tcfg.batch_size * seq_len / dt if dt > 0 else 0.0
    record = {
        "step": step,
        "loss": m["loss"],
        "lr": m["lr"],
        "grad_norm": m["grad_norm"],
        "loss_tokens": m["tokens"],
        "step_s": dt,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * fpt / peak if peak else None,
    }
    writers.write(record, step, tb=(step % tcfg.log_every == 0 or step == 1))
    if progress is not None:
        progress.update(step, m["loss"], m["lr"], tokens_per_s)
    return record


class Progress:
    """A tqdm bar on a terminal (or in a notebook); one plain line per `log_every` steps (and the
    last) when stderr is a file or a pipe, where a redrawn bar would be one endless line."""

    def __init__(self, total: int, initial: int, log_every: int):
        self.total, self.log_every, self.stream = total, log_every, sys.stderr
        self.bar = None
        if _interactive(self.stream):
            # imported on first use: tqdm.auto looks for a notebook (IPython) when imported
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        elif step % self.log_every == 0 or step == self.total:
            print(
                f"train step {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _interactive(stream) -> bool:
    """A terminal, or a Jupyter kernel's output (where tqdm.auto draws a widget)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        pass
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"
