"""The training data pipeline: JSONL records -> tokens + loss masks -> packed rows -> batches.

from lora_jax.data import DataConfig, DataLoader, build_datasets
cfg = DataConfig(train_file="train.jsonl", seq_len=1024)
ds = build_datasets(cfg, tokenizer)            # a transformers tokenizer (local files)
loader = DataLoader(ds.train_rows, batch_size=32, seed=cfg.seed,
                    process_index=jax.process_index(), process_count=jax.process_count())
batch = next(loader)                           # {"input_ids", "targets", "loss_mask",
                                               #  "segment_ids", "positions"}: [32 / P, 1024]
state = loader.get_state()                     # JSON; loader.set_state(state) resumes exactly
"""

from lora_jax.data.config import DEFAULT_MAX_RECORD_BYTES, OVERLONG_POLICIES, DataConfig
from lora_jax.data.dataset import Datasets, build_datasets, has_content, split_heldout
from lora_jax.data.formats import FORMATS, detect_file_format, detect_format, read_jsonl, read_jsonl_lines
from lora_jax.data.loader import DataLoader, batch_indices, eval_batches, steps_per_epoch
from lora_jax.data.pack import (
    ROW_DTYPES,
    ROW_KEYS,
    empty_row,
    first_fit,
    pack_examples,
    pad_examples,
    truncate_examples,
)
from lora_jax.data.tokenize import assistant_spans, special_prefix, tokenize_record

__all__ = [
    "DataConfig",
    "OVERLONG_POLICIES",
    "DEFAULT_MAX_RECORD_BYTES",
    "Datasets",
    "build_datasets",
    "split_heldout",
    "has_content",
    "FORMATS",
    "read_jsonl",
    "read_jsonl_lines",
    "detect_format",
    "detect_file_format",
    "DataLoader",
    "batch_indices",
    "eval_batches",
    "steps_per_epoch",
    "ROW_KEYS",
    "ROW_DTYPES",
    "empty_row",
    "first_fit",
    "pack_examples",
    "pad_examples",
    "truncate_examples",
    "special_prefix",
    "tokenize_record",
    "assistant_spans",
]
