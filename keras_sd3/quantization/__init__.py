"""Quantized weights: Keras' int8 / int4 modes on keras_sd3's `Linear` layers.

Which layers: the large matrix products of the MMDiT and the text encoders, the ones that the
model-parallel `LAYOUT` tables split (attention projections, MLPs, adaLN modulations, the context
embedder; CLIP's and T5's attention and MLPs; see `selected_layers`). Norms, the small embedders
(timestep, pooled text, patches, positions, token tables), the output projection, the VAE and the
sampler stay in the float dtype.

Activations: weight-only by default (`quantize("int8")`: int8 weights with one scale per output
channel, dequantised inside the compiled program and multiplied in the compute dtype), as diffusers'
torchao `int8_weight_only` and ComfyUI's fp8 / GGUF weights; a Keras config with an activation
quantizer (`keras.quantizers.Int8QuantizationConfig()`, Keras' own default) gives W8A8 (each token
quantised to int8 as well, products in int32). See `keras_sd3.quantization.linear`.

Weights loaded from a GGUF file's block types or a float8 file stay in that form in memory (weight-only,
decoded inside each product): `keras_sd3.quantization.stored`.
"""

from keras_sd3.quantization.linear import float_kernel, quantize_linear, quantized_linear  # noqa: F401
from keras_sd3.quantization.parts import (  # noqa: F401
    MODES, PARTS, check_quantize, quantize_backbone, quantize_while_loading, resolve_config, selected_layers)
from keras_sd3.quantization.stored import store_while_loading, stored_linear  # noqa: F401
