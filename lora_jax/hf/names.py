"""The one table between Hugging Face tensor names and Flax parameter paths, built from the family's
layout (`lora_jax.models.layout`).

Flax kernels are `[in, out]`, torch weights `[out, in]`: `transpose` says which entries flip.
Layer entries carry their layer; with scanned layers they land in the stacked `layers/...` leaf at
index i, otherwise in `layers_{i}/...`.
"""

from __future__ import annotations

from typing import NamedTuple

from lora_jax.hf.gpt2 import gpt2_entries
from lora_jax.models.layout import LLAMA_LAYOUT, Layout, config_value, layout_of
from lora_jax.models.llama_config import LlamaConfig

__all__ = [
    "Entry",
    "hf_entries",
    "flax_path",
    "projection_parent",
    "PROJECTIONS",
    "ATTENTION_PROJECTIONS",
    "MLP_PROJECTIONS",
    "IGNORED_SUFFIXES",
]

# Views of the layout, kept for callers that import them from here.
PROJECTIONS = LLAMA_LAYOUT.names
ATTENTION_PROJECTIONS = tuple(p.name for p in LLAMA_LAYOUT.projections if p.parent == "self_attn")
MLP_PROJECTIONS = tuple(p.name for p in LLAMA_LAYOUT.projections if p.parent == "mlp")

# Keys some checkpoints carry that hold nothing the model needs (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")  # GPT-2's causal-mask buffers


class Entry(NamedTuple):
    hf_key: str
    path: tuple[str, ...]  # Flax path, without the layer prefix for layer entries
    layer: int | None
    transpose: bool
    hf_shape: tuple[int, ...]
    stack: str | None = None  # the Flax layer stack's name where it is not the Llama's (GPT-2: "h")


def projection_parent(name: str) -> str:
    return LLAMA_LAYOUT.parent(name)


def hf_entries(cfg: LlamaConfig, layout: Layout | None = None) -> list[Entry]:
    """Every tensor a HF checkpoint of this config holds (`LlamaForCausalLM` for the Llama layout),
    in checkpoint order; `layout` defaults to the config's family's (`layout_of(cfg)`)."""
    layout = layout_of(cfg) if layout is None else layout
    if layout.family == "gpt2":  # Conv1D kernels, LayerNorm biases, learned positions
        return [Entry(*row) for row in gpt2_entries(cfg)]
    dims = layout.dims(cfg)
    d, vocab = dims["embed"], dims["vocab"]
    base = layout.hf_base
    entries = [Entry(f"{base}.{layout.embed}.weight", (layout.embed, "embedding"), None, False, (vocab, d))]
    shapes = layout.shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        prefix = f"{layout.hf_layers}.{i}"
        for p in layout.projections:
            fan_in, fan_out = shapes[p.name]
            entries.append(
                Entry(f"{prefix}.{p.parent}.{p.name}.weight", (p.parent, p.name, "kernel"), i, True, (fan_out, fan_in))
            )
            if p.has_bias(cfg):
                entries.append(
                    Entry(f"{prefix}.{p.parent}.{p.name}.bias", (p.parent, p.name, "bias"), i, False, (fan_out,))
                )
        head_dim = dims["heads"] // config_value(cfg, "num_attention_heads")
        for norm in layout.head_norms:
            key = f"{prefix}.{layout.head_norm_parent}.{norm}.weight"
            entries.append(Entry(key, (layout.head_norm_parent, norm, "scale"), i, False, (head_dim,)))
        for norm in layout.layer_norms:
            entries.append(Entry(f"{prefix}.{norm}.weight", (norm, "scale"), i, False, (d,)))
    entries.append(Entry(f"{base}.{layout.final_norm}.weight", (layout.final_norm, "scale"), None, False, (d,)))
    if not cfg.tie_word_embeddings:
        entries.append(Entry(f"{layout.lm_head}.weight", (layout.lm_head, "kernel"), None, True, (vocab, d)))
    return entries


def flax_path(entry: Entry, scan_layers: bool, layout: Layout = LLAMA_LAYOUT) -> tuple[str, ...]:
    """Where an entry lives in the Flax tree (the stacked leaf for scanned layers)."""
    if entry.layer is None:
        return entry.path
    if entry.stack is not None:
        return ((entry.stack,) if scan_layers else (f"{entry.stack}_{entry.layer}",)) + entry.path
    return layout.layer_path(entry.layer, scan_layers) + entry.path
