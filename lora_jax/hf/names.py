"""The one table between Hugging Face tensor names and Flax parameter paths.

Flax kernels are `[in, out]`, torch weights `[out, in]`: `transpose` says which entries flip.
Layer entries carry `{i}`; with scanned layers they land in the stacked `layers/...` leaf at index i,
otherwise in `layers_{i}/...`.
"""

from __future__ import annotations

from typing import NamedTuple

from lora_jax.config import LlamaConfig

__all__ = ["Entry", "hf_entries", "PROJECTIONS", "ATTENTION_PROJECTIONS", "MLP_PROJECTIONS"]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


class Entry(NamedTuple):
    hf_key: str
    path: tuple[str, ...]  # Flax path, without the layer prefix for layer entries
    layer: int | None
    transpose: bool
    hf_shape: tuple[int, ...]


def _projection_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection, torch layout."""
    d, h = cfg.hidden_size, cfg.head_dim
    return {
        "q_proj": (cfg.num_attention_heads * h, d),
        "k_proj": (cfg.num_key_value_heads * h, d),
        "v_proj": (cfg.num_key_value_heads * h, d),
        "o_proj": (d, cfg.num_attention_heads * h),
        "gate_proj": (cfg.intermediate_size, d),
        "up_proj": (cfg.intermediate_size, d),
        "down_proj": (d, cfg.intermediate_size),
    }


def projection_parent(name: str) -> str:
    return "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"


def hf_entries(cfg: LlamaConfig) -> list[Entry]:
    """Every tensor a HF `LlamaForCausalLM` checkpoint of this config holds, in checkpoint order."""
    d = cfg.hidden_size
    entries = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), None, False,
                     (cfg.vocab_size, d))]
    shapes = _projection_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}"
        for name in PROJECTIONS:
            parent = projection_parent(name)
            out_in = shapes[name]
            entries.append(Entry(f"{prefix}.{parent}.{name}.weight", (parent, name, "kernel"), i, True, out_in))
            has_bias = cfg.attention_bias if parent == "self_attn" else cfg.mlp_bias
            if has_bias:
                entries.append(Entry(f"{prefix}.{parent}.{name}.bias", (parent, name, "bias"), i, False,
                                     (out_in[0],)))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            entries.append(Entry(f"{prefix}.{norm}.weight", (norm, "scale"), i, False, (d,)))
    entries.append(Entry("model.norm.weight", ("norm", "scale"), None, False, (d,)))
    if not cfg.tie_word_embeddings:
        entries.append(Entry("lm_head.weight", ("lm_head", "kernel"), None, True, (cfg.vocab_size, d)))
    return entries


def flax_path(entry: Entry, scan_layers: bool) -> tuple[str, ...]:
    """Where an entry lives in the Flax tree (the stacked leaf for scanned layers)."""
    if entry.layer is None:
        return entry.path
    return (("layers",) if scan_layers else (f"layers_{entry.layer}",)) + entry.path


# Keys some checkpoints carry that hold nothing the model needs (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
