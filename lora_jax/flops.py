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
  non-causally (PaLM convention), so causal masking never changes the denominator.

Recomputation from gradient checkpointing is not counted: MFU measures useful model FLOPs.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

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

PEAK_H100_MEASURED = 798e12  # achievable dense bf16 matmul FLOP/s, as measured (see PERF doc)
PEAK_H100_DATASHEET = 989e12  # NVIDIA datasheet dense bf16 peak, H100 SXM

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _get(cfg: Any, name: str) -> Any:
    """Read a field from a config object or a plain dict of HF kwargs."""
    return cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)


def projection_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each per-layer projection, keyed by its HF module name."""
    d, mlp = _get(cfg, "hidden_size"), _get(cfg, "intermediate_size")
    nh = _get(cfg, "num_attention_heads")
    nkv = _get(cfg, "num_key_value_heads") or nh
    hd = _get(cfg, "head_dim") or d // nh
    return {
        "q_proj": (d, nh * hd),
        "k_proj": (d, nkv * hd),
        "v_proj": (d, nkv * hd),
        "o_proj": (nh * hd, d),
        "gate_proj": (d, mlp),
        "up_proj": (d, mlp),
        "down_proj": (mlp, d),
    }


def matmul_params(cfg: Any) -> int:
    """N_mm: weights of all matmuls in the model, including the (possibly tied) LM head."""
    per_layer = sum(i * o for i, o in projection_shapes(cfg).values())
    return _get(cfg, "num_hidden_layers") * per_layer + _get(cfg, "vocab_size") * _get(cfg, "hidden_size")


def _normalize_targets(targets: Iterable[str] | None) -> tuple[str, ...]:
    """Accept HF names ("q_proj") or short ones ("q"); None means all seven projections."""
    if targets is None:
        return ALL_TARGETS
    if isinstance(targets, str):
        targets = (targets,)
    out = []
    for t in targets:
        name = t if t.endswith("_proj") else f"{t}_proj"
        if name not in ALL_TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; expected one of {ALL_TARGETS}")
        out.append(name)
    return tuple(out)


def lora_params(cfg: Any, r: int, targets: Iterable[str] | None = None) -> int:
    """N_lora: r * (in + out) summed over adapted projections across all layers."""
    shapes = projection_shapes(cfg)
    per_layer = sum(r * sum(shapes[t]) for t in _normalize_targets(targets))
    return _get(cfg, "num_hidden_layers") * per_layer


def flops_per_token(cfg: Any, seq_len: int, r: int, targets: Iterable[str] | None = None) -> float:
    """Training FLOPs per token (forward + backward) of a LoRA step at sequence length seq_len."""
    attn = 12 * _get(cfg, "num_hidden_layers") * seq_len * _get(cfg, "hidden_size")
    return float(4 * matmul_params(cfg) + 6 * lora_params(cfg, r, targets) + attn)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float = PEAK_H100_MEASURED) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware peak (a fraction, not %)."""
    return tokens_per_s * flops_per_token / peak_flops
