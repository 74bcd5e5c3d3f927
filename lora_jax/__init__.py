"""lora_jax: LoRA fine-tuning of Llama-family models in JAX/Flax, exact against PEFT and transformers.

    import lora_jax as lj
    cfg, params = lj.load_pretrained(path)                 # HF dir -> LlamaConfig, frozen params
    model = lj.Llama(cfg)
    lcfg = lj.LoraConfig(r=16, lora_alpha=32, target_modules=("q_proj", "v_proj"))
    lora = lj.init_lora(params, lcfg, key)                 # adapter tree, pure
    logits = lj.apply(model, params, lora, lcfg, input_ids)
    lj.save_peft(out_dir, lora, lcfg, cfg)                 # PEFT adapter dir
    lj.save_pretrained(out_dir, params, cfg, lora, lcfg)   # merged HF model dir
    cfg, qparams = lj.load_pretrained(path, quantize="nf4")  # QLoRA: NF4 frozen projections
"""

from lora_jax.config import (LlamaConfig, LoraConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig,
                             TrainConfig)
from lora_jax.errors import CheckpointFormatError, ConfigError, DataError, LoraJaxError
from lora_jax.hf.load import load_pretrained
from lora_jax.hf.peft import apply_modules_to_save, load_peft, read_peft_config, save_peft
from lora_jax.hf.save import save_pretrained
from lora_jax.lora import (Split, apply, combine, count_parameters, dora_weight_norms, init_lora,
                           lora_dense, lora_interception, lora_labels, make_optimizer, merge,
                           print_trainable_parameters, split_trainable, unmerge)
from lora_jax.models.llama import KVCache, Llama, init_kv_cache
from lora_jax.quant import QuantizedKernel, dequantize, quantize, quantize_params
from lora_jax.sharding import make_mesh
from lora_jax.sweep import sweep

__version__ = "0.1.0"
