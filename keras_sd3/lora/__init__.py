"""LoRA adapters: loading diffusers / PEFT and kohya files, scaling, unloading, fusing, saving.

The backbone's `load_lora`, `set_lora_scale`, `unload_lora`, `fuse_loras` and `save_lora` delegate here.
"""

from keras_sd3.lora.formats import LoraError, LoraWeights, read_lora, write_lora
