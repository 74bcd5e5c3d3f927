"""`SweepResult`: what `sweep` returns, and each configuration's adapter taken back out of the stack."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.lora.tree import combine
from lora_jax.sweep.grid import SweepPoint
from lora_jax.sweep.report import rank_rows
from lora_jax.sweep.stacking import unstack_tree

__all__ = ["SweepResult"]


@dataclasses.dataclass
class SweepResult:
    """What `sweep` returns. rows: one dict per configuration (the table of results.csv);
    train_loss: [steps, K] per-step train losses; compiles: traces of the train / eval programs."""

    points: list[SweepPoint]
    rows: list[dict]
    train_loss: np.ndarray
    metric: str
    compiles: dict
    timing: dict
    output_dir: str | None
    state: Any = dataclasses.field(repr=False, default=None)  # stacked TrainState
    frozen_lora: Any = dataclasses.field(repr=False, default=None)  # stacked scales
    base_params: Any = dataclasses.field(repr=False, default=None)  # the frozen base, once
    model_config: Any = dataclasses.field(repr=False, default=None)
    shapes: Any = dataclasses.field(repr=False, default=None)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def adapter(self, k: int):
        """(lora, lcfg) of configuration k alone: the adapter tree at its own rank (no padding),
        the same layout a single `lora-jax train` run of that configuration produces."""
        host_trainable, host_frozen = self.host_adapters
        trainable = unstack_tree(host_trainable, k, self.shapes["trainable"])
        frozen_lora = unstack_tree(host_frozen, k, self.shapes["frozen_lora"])
        _, lora = combine(trainable, {"params": {}, "lora": frozen_lora})
        return jax.tree.map(jnp.asarray, lora), self.points[k].run.lora

    def params(self, k: int):
        """The base parameters of configuration k (its own copy of `modules_to_save`, if any)."""
        trainable = unstack_tree(self.host_adapters[0], k, self.shapes["trainable"])
        params, _ = combine({"params": jax.tree.map(jnp.asarray, trainable["params"])}, {"params": self.base_params})
        return params

    @functools.cached_property
    def host_adapters(self):
        """(trainable, frozen_lora), stacked, fetched to the host once: a configuration is then a
        numpy slice (slicing on the device, eagerly, compiles one small program per leaf shape:
        ~1 s of a CPU sweep)."""
        return jax.device_get((self.state.trainable, self.frozen_lora))

    def ranked(self) -> list[dict]:
        """The rows, best first by `metric`."""
        return rank_rows(self.rows, self.metric)
