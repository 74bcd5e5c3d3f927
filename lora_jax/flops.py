"""FLOP model for LoRA training throughput and MFU (pure Python: no jax or torch import).

Kept dependency-free so the PyTorch/PEFT benchmark can load it by path on a machine without JAX,
and both sides of a comparison divide by exactly the same FLOP count:

    F_per_token = 4 * N_mm + 6 * N_lora + 12 * L * s * d

* ``N_mm``: parameters of every matmul, LM head included (also when tied to the embedding, since
  the head matmul is executed either way). Frozen weights cost forward (2) + input-gradient (2)
  FLOPs per parameter per token, with no weight gradient, hence 4.
* ``N_lora``: adapter parameters ``r * (in + out)`` per adapted projection. Trainable, so forward,
  input-gradient and weight-gradient: 6.
* ``12 * L * s * d``: attention scores and weighted values, forward + backward, counted
  non-causally (PaLM convention), so causal masking never changes the denominator. ``d`` is the
  attention width ``heads * head_dim`` (the hidden size in Llama and GPT-2; Qwen3 and Gemma 3 may
  differ), and a sliding-window layer counts ``min(s, window)`` keys (Mistral, Gemma 3's local layers).

Recomputation from gradient checkpointing is not counted: MFU measures useful model FLOPs.

Projection names and shapes are the layout of the config's family (`lora_jax/models/layout.py`,
pure Python too), so every family (Llama, Qwen, Mistral, GPT-2, Gemma 3) is counted by the same
rule. Loaded by file path (no package), this module loads the layout file the same way.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import Any

if __package__:
    from lora_jax.models.layout import LLAMA_LAYOUT, config_value, layout_of
else:  # loaded by file path (experiments/bench/peft_bench.py): no package, so no JAX either
    _NAME = "lora_jax_models_layout"
    if _NAME not in sys.modules:  # registered before it runs: dataclasses look their module up
        _spec = importlib.util.spec_from_file_location(
            _NAME, os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "layout.py")
        )
        assert _spec is not None and _spec.loader is not None  # a .py file path always has a source loader
        sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules[_NAME])
    LLAMA_LAYOUT, config_value = sys.modules[_NAME].LLAMA_LAYOUT, sys.modules[_NAME].config_value
    layout_of = sys.modules[_NAME].layout_of

__all__ = [
    "ALL_TARGETS",
    "PEAK_H100_DATASHEET",
    "PEAK_H100_MEASURED",
    "flops_per_token",
    "lora_params",
    "matmul_params",
    "mfu",
    "projection_shapes",
]

PEAK_H100_MEASURED = 798e12  # achievable dense bf16 matmul FLOP/s, as measured (see docs/performance.md)
PEAK_H100_DATASHEET = 989e12  # NVIDIA datasheet dense bf16 peak, H100 SXM

ALL_TARGETS = LLAMA_LAYOUT.names

_get = config_value  # a field of a config object or of a plain dict of HF kwargs


def projection_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each per-layer projection, keyed by its HF module name."""
    return layout_of(cfg).shapes(cfg)


def _layers(cfg: Any) -> int:
    return _get(cfg, "num_hidden_layers", _get(cfg, "n_layer"))  # GPT-2's kwargs name it n_layer


def matmul_params(cfg: Any) -> int:
    """N_mm: weights of all matmuls in the model, including the (possibly tied) LM head."""
    dims = layout_of(cfg).dims(cfg)
    per_layer = sum(i * o for i, o in projection_shapes(cfg).values())
    return _layers(cfg) * per_layer + dims["vocab"] * dims["embed"]


def _normalize_targets(cfg: Any, targets: Iterable[str] | None) -> tuple[str, ...]:
    """The family's projection names ("q_proj", GPT-2's "c_attn"; a Llama-like's short "q" too);
    None means all of them."""
    names = layout_of(cfg).names
    if targets is None:
        return names
    if isinstance(targets, str):
        targets = (targets,)
    out = []
    for t in targets:
        name = t if t in names or t.endswith("_proj") else f"{t}_proj"
        if name not in names:
            raise ValueError(f"unknown LoRA target {t!r} for {layout_of(cfg).family}; expected one of {names}")
        out.append(name)
    return tuple(out)


def lora_params(cfg: Any, r: int, targets: Iterable[str] | None = None) -> int:
    """N_lora: r * (in + out) summed over adapted projections across all layers."""
    shapes = projection_shapes(cfg)
    per_layer = sum(r * sum(shapes[t]) for t in _normalize_targets(cfg, targets))
    return _layers(cfg) * per_layer


def _attended(cfg: Any, seq_len: int) -> int:
    """Keys per query summed over layers: `seq_len` each, a sliding-window layer at most its window."""
    window = _get(cfg, "sliding_window")
    if window is None or _get(cfg, "use_sliding_window", True) is False:  # Qwen's config has an unused one
        return _layers(cfg) * seq_len
    types = _get(cfg, "layer_types", ())  # Gemma 3: which layers slide; Mistral: all of them
    sliding = [t == "sliding_attention" for t in types] if types else [True] * _layers(cfg)
    return sum(min(seq_len, window) if s else seq_len for s in sliding)


def flops_per_token(cfg: Any, seq_len: int, r: int, targets: Iterable[str] | None = None) -> float:
    """Training FLOPs per token (forward + backward) of a LoRA step at sequence length seq_len."""
    attn = 12 * _attended(cfg, seq_len) * layout_of(cfg).dims(cfg)["heads"]
    return float(4 * matmul_params(cfg) + 6 * lora_params(cfg, r, targets) + attn)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float = PEAK_H100_MEASURED) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware peak (a fraction, not %)."""
    return tokens_per_s * flops_per_token / peak_flops
