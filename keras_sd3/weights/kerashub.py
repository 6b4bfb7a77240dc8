"""KerasHub preset folders (`save_to_preset` of keras-hub's `StableDiffusion3Backbone`).

A preset folder holds `config.json` (the backbone's Keras config), `model.weights.h5` (or its shards,
`model.weights.json` + `model_*.weights.h5`), `preprocessor.json` and the tokenizer assets
(`assets/clip_l_tokenizer/vocabulary.json` + `merges.txt`, ...). The `.weights.h5` variables are named
by Keras' saving walk (`layers/mm_di_t/layers/mm_di_t_block_3/x_block/attention_qkv/vars/0`); the
table below maps them to the original SD3 checkpoint names (`model.diffusion_model.*`,
`first_stage_model.*`) and to transformers' CLIP and T5 names, in PyTorch layout, so that the rest of the
loading is the single-file path's (`original_keys`). Tensors are read lazily, one at a time.
"""

import dataclasses
import json
import os
import re

import numpy as np

from keras_sd3.errors import CheckpointError
from keras_sd3.weights.safetensors_file import TensorSource

CONFIG_FILE, WEIGHTS_FILE, SHARDS_FILE = "config.json", "model.weights.h5", "model.weights.json"
BACKBONE_CLASS = "StableDiffusion3Backbone"
MMDIT_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                 "t5": "text_encoders.t5xxl.transformer."}
# KerasHub's activation names -> transformers' T5 `dense_act_fn`.
T5_ACTIVATIONS = {"gelu": "gelu", "keras_hub>gelu_approximate": "gelu_new"}


def is_kerashub_folder(path):
    """True for a folder whose `config.json` is a KerasHub `StableDiffusion3Backbone` config."""
    config = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return json.load(f).get("class_name") == BACKBONE_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def read_config(folder):
    """The backbone's `config` dict of `config.json`."""
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        return json.load(f)["config"]


# --- Layouts: Keras (stored) -> PyTorch (original checkpoints) ---------------------------------------

def _dense(a):
    return a.T


def _conv(a):
    return a.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)


def _mha_in(a):
    return a.reshape(a.shape[0], -1).T if a.ndim == 3 else a.reshape(-1)  # (D, H, d) -> (H d, D); (H, d) -> (H d,)


def _mha_out(a):
    return a.reshape(-1, a.shape[-1]).T if a.ndim == 3 else a  # (H, d, D) -> (D, H d)


def _pos_table(a):
    return a[None]  # (P P, D) -> (1, P P, D)


def _same(a):
    return a


# Each kind: the suffixes of the layer's variables in storage order, and the transform of each.
KINDS = {
    "dense": (("weight", _dense), ("bias", _same)),
    "conv": (("weight", _conv), ("bias", _same)),
    "norm": (("weight", _same), ("bias", _same)),
    "mha_in": (("weight", _mha_in), ("bias", _mha_in)),
    "mha_out": (("weight", _mha_out), ("bias", _same)),
    "table": (("", _pos_table),),
    "embedding": (("weight", _same),),
}

_N = r"(?:_(\d+))?"  # Keras' name counter: `block`, `block_1`, `block_2`, ...
_MMDIT_BLOCK = (
    (r"ada_layer_norm/dense", "adaLN_modulation.1", "dense"),
    (r"attention_qkv", "attn.qkv", "dense"), (r"attention_proj", "attn.proj", "dense"),
    (r"q_norm", "attn.ln_q", "norm"), (r"k_norm", "attn.ln_k", "norm"),
    (r"attention_qkv2", "attn2.qkv", "dense"), (r"attention_proj2", "attn2.proj", "dense"),
    (r"q_norm2", "attn2.ln_q", "norm"), (r"k_norm2", "attn2.ln_k", "norm"),
    (r"mlp/dense1", "mlp.fc1", "dense"), (r"mlp/dense2", "mlp.fc2", "dense"),
)
_VAE_RESNET = (("norm1", "norm1", "norm"), ("conv1", "conv1", "conv"), ("norm2", "norm2", "norm"),
               ("conv2", "conv2", "conv"), ("residual_projection", "nin_shortcut", "conv"))
_VAE_ATTENTION = (("group_norm", "norm", "norm"), ("query_conv2d", "q", "conv"), ("key_conv2d", "k", "conv"),
                  ("value_conv2d", "v", "conv"), ("output_conv2d", "proj_out", "conv"))
_CLIP_LAYER = (
    ("attention/query_dense", "self_attn.q_proj", "mha_in"), ("attention/key_dense", "self_attn.k_proj", "mha_in"),
    ("attention/value_dense", "self_attn.v_proj", "mha_in"), ("attention/output_dense", "self_attn.out_proj", "mha_out"),
    ("layer_norm_1", "layer_norm1", "norm"), ("layer_norm_2", "layer_norm2", "norm"),
    ("dense_1", "mlp.fc1", "dense"), ("dense_2", "mlp.fc2", "dense"),
)
_T5_LAYER = (
    ("self_attention/query_projector", "layer.0.SelfAttention.q", "dense"),
    ("self_attention/key_projector", "layer.0.SelfAttention.k", "dense"),
    ("self_attention/value_projector", "layer.0.SelfAttention.v", "dense"),
    ("self_attention/output_projector", "layer.0.SelfAttention.o", "dense"),
    ("self_attention", "layer.0.SelfAttention.relative_attention_bias", "embedding"),  # (buckets, heads)
    ("self_attention_layer_norm", "layer.0.layer_norm", "norm"),
    ("input_projector", "layer.1.DenseReluDense.wi_0", "dense"),  # the activated half of the gated GELU
    ("gate_projector", "layer.1.DenseReluDense.wi_1", "dense"),
    ("output_projector", "layer.1.DenseReluDense.wo", "dense"),
    ("layer_norm", "layer.1.layer_norm", "norm"),
)


def _running_index(blocks_per_level):
    """Running block number -> (level, block in level), for KerasHub's flat VAE `blocks` lists."""
    return [(level, j) for level, n in enumerate(blocks_per_level) for j in range(n)]


def key_table(config):
    """`[(regex over a KerasHub layer path, target name or function of the match, kind)]`.

    The CLIP encoders are saved as `clip_text_encoder` (CLIP-L) then `clip_text_encoder_1` (CLIP-G),
    in the order the backbone creates them; their shapes are checked against `config.json` later.
    """
    vae = config["vae"]["config"]
    encoder_blocks = _running_index(vae["encoder_num_blocks"])
    decoder_blocks = _running_index(vae["decoder_num_blocks"])
    last = len(vae["decoder_num_blocks"]) - 1
    num = lambda m, i=1: int(m.group(i) or 0)  # noqa: E731
    mm, rules = "layers/mm_di_t/layers/", []
    rules += [
        (mm + r"patch_embedding/patch_embedding", MMDIT_PREFIX + "x_embedder.proj", "conv"),
        (mm + r"adjustable_position_embedding", MMDIT_PREFIX + "pos_embed", "table"),
        (mm + r"dense", MMDIT_PREFIX + "context_embedder", "dense"),
        (mm + r"dense_1", MMDIT_PREFIX + "final_layer.linear", "dense"),
        (mm + r"mlp/dense1", MMDIT_PREFIX + "y_embedder.mlp.0", "dense"),
        (mm + r"mlp/dense2", MMDIT_PREFIX + "y_embedder.mlp.2", "dense"),
        (mm + r"timestep_embedding/mlp/dense1", MMDIT_PREFIX + "t_embedder.mlp.0", "dense"),
        (mm + r"timestep_embedding/mlp/dense2", MMDIT_PREFIX + "t_embedder.mlp.2", "dense"),
        (mm + r"adaptive_layer_normalization/dense", MMDIT_PREFIX + "final_layer.adaLN_modulation.1", "dense"),
    ]
    for source, target, kind in _MMDIT_BLOCK:
        rules.append((mm + rf"mm_di_t_block{_N}/(x_block|context_block)/{source}",
                      lambda m, t=target: f"{MMDIT_PREFIX}joint_blocks.{num(m)}.{m.group(2)}.{t}", kind))
    for part, blocks, sampler, stage in (("encoder", encoder_blocks, "downsamples", "down"),
                                         ("decoder", decoder_blocks, "upsamples", "up")):
        flip = (lambda level: last - level) if part == "decoder" else (lambda level: level)
        base = f"layers/vae_{part}/"
        rules += [
            (base + "input_projection", f"{VAE_PREFIX}{part}.conv_in", "conv"),
            (base + "output_projection", f"{VAE_PREFIX}{part}.conv_out", "conv"),
            (base + "output_norm", f"{VAE_PREFIX}{part}.norm_out", "norm"),
            (base + rf"{sampler}/conv2d{_N}",
             lambda m, p=part, s=stage, f=flip: f"{VAE_PREFIX}{p}.{s}.{f(num(m))}.{s}sample.conv", "conv"),
        ]
        for source, target, kind in _VAE_RESNET:
            rules.append((base + rf"blocks/res_net_block{_N}/{source}",
                          lambda m, p=part, s=stage, b=blocks, f=flip, t=target:
                          f"{VAE_PREFIX}{p}.{s}.{f(b[num(m)][0])}.block.{b[num(m)][1]}.{t}", kind))
            for i in (0, 1):
                rules.append((base + rf"mid_block_{i}/{source}", f"{VAE_PREFIX}{part}.mid.block_{i + 1}.{target}", kind))
        for source, target, kind in _VAE_ATTENTION:
            rules.append((base + f"mid_attention/{source}", f"{VAE_PREFIX}{part}.mid.attn_1.{target}", kind))
    for name, suffix in (("clip_l", ""), ("clip_g", "_1")):
        prefix, base = TEXT_PREFIXES[name] + "text_model.", f"layers/clip_text_encoder{suffix}/layers/"
        rules += [
            (base + "token_and_position_embedding/token_embedding", prefix + "embeddings.token_embedding", "embedding"),
            (base + "token_and_position_embedding/position_embedding", prefix + "embeddings.position_embedding",
             "embedding"),
            (base + "layer_normalization", prefix + "final_layer_norm", "norm"),
            (f"layers/clip_projection{suffix}/dense", TEXT_PREFIXES[name] + "text_projection", "dense"),
        ]
        for source, target, kind in _CLIP_LAYER:
            rules.append((base + rf"clip_encoder_layer{_N}/{source}",
                          lambda m, p=prefix, t=target: f"{p}encoder.layers.{num(m)}.{t}", kind))
    t5, base = TEXT_PREFIXES["t5"], "layers/t5_encoder/layers/"
    rules += [(base + "reversible_embedding", t5 + "shared", "embedding"),
              (base + "t5_layer_norm", t5 + "encoder.final_layer_norm", "norm")]
    for source, target, kind in _T5_LAYER:
        rules.append((base + rf"t5_transformer_layer{_N}/{source}",
                      lambda m, t=target: f"{t5}encoder.block.{num(m)}.{t}", kind))
    return [(re.compile(pattern + r"/vars/(\d+)$"), target, kind) for pattern, target, kind in rules]


def _rename(path, table):
    """A stored variable path -> (original name, transform), or None when no rule matches."""
    for pattern, target, kind in table:
        match = pattern.match(path)
        if match is None:
            continue
        index = int(match.group(match.re.groups))
        suffixes = KINDS[kind]
        if index >= len(suffixes):
            return None
        name = target(match) if callable(target) else target
        suffix, transform = suffixes[index]
        return (f"{name}.{suffix}" if suffix else name), transform
    return None


# --- The .weights.h5 files --------------------------------------------------------------------------

def _weight_files(folder):
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, SHARDS_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                values = json.load(f)["weight_map"].values()  # a file name, or a list when a layer spans files
            shards = sorted({name for v in values for name in ([v] if isinstance(v, str) else v)})
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid Keras sharded-weights index ({e!r}).") from None
        return [os.path.join(folder, shard if shard.endswith(".h5") else shard + ".weights.h5") for shard in shards]
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"No weights in the KerasHub preset {folder}: expected {WEIGHTS_FILE} or {SHARDS_FILE}.")


def _datasets(path):
    """`{variable path: shape}` of one `.weights.h5` file (reads the index only)."""
    import h5py

    found = {}
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.__setitem__(name, obj.shape) if isinstance(obj, h5py.Dataset) else None)
    except OSError as e:
        raise CheckpointError(f"{path} is not a readable Keras .weights.h5 file ({e}).") from None
    return found


def _reader(path, name, transform):
    def read():
        import h5py

        with h5py.File(path, "r") as f:
            return np.ascontiguousarray(transform(f[name][()]))

    return read


def _stored_to_torch_shape(shape, transform):
    return transform(np.broadcast_to(np.zeros((), np.bool_), shape)).shape  # a view: no memory


def open_tensors(folder, config):
    """The preset's tensors as one `TensorSource` with original SD3 single-file names, PyTorch layout.

    Raises:
        CheckpointError: a stored variable that no rule of `key_table` maps (the message names it).
    """
    table = key_table(config)
    shapes, readers, unmatched = {}, {}, []
    for path in _weight_files(folder):
        for name, shape in _datasets(path).items():
            renamed = _rename(name, table)
            if renamed is None:
                unmatched.append(name)
                continue
            key, transform = renamed
            shapes[key] = tuple(_stored_to_torch_shape(shape, transform))
            readers[key] = _reader(path, name, transform)
    if unmatched:
        more = f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
        raise CheckpointError(
            f"The KerasHub preset {folder} has {len(unmatched)} variable(s) keras_sd3 does not know: "
            + ", ".join(f"'{k}'" for k in sorted(unmatched)[:5]) + more
            + ". Is it a keras-hub StableDiffusion3Backbone preset?")
    return TensorSource(shapes, readers)


def configure(config, mmdit_config, vae_config, clip_configs, t5_config=None):
    """The configs inferred from the tensors, completed with `config.json`'s own values.

    Returns:
        `(mmdit_config, vae_config, {"clip_l": ..., "clip_g": ...[, "t5": ...]})`.

    Raises:
        CheckpointError: a T5 encoder that is not a gated-GELU T5 v1.1.
    """
    vae = config["vae"]["config"]
    heads = config["mmdit_num_heads"]
    mmdit_config = dataclasses.replace(
        mmdit_config, num_attention_heads=heads, attention_head_dim=config["mmdit_hidden_dim"] // heads,
        sample_size=config["image_shape"][0] // 8)
    vae_config = dataclasses.replace(vae_config, scaling_factor=vae["scale"], shift_factor=vae["shift"])
    encoders = {}
    for name, clip_config in clip_configs.items():
        encoder = config[name]["config"]
        # KerasHub pools at the argmax of the ids: keras_sd3's eos_token_id=2 rule.
        encoders[name] = dataclasses.replace(
            clip_config, num_attention_heads=encoder["num_heads"], hidden_act=encoder["intermediate_activation"],
            eos_token_id=2)
    if t5_config is not None:
        encoders["t5"] = _configure_t5(config["t5"]["config"], t5_config)
    return mmdit_config, vae_config, encoders


def _configure_t5(encoder, t5_config):
    activation = T5_ACTIVATIONS.get(encoder["activation"])
    if activation is None or not encoder["use_gated_activation"]:
        raise CheckpointError(
            f"The KerasHub T5 encoder has activation {encoder['activation']!r} (gated: "
            f"{encoder['use_gated_activation']}); keras_sd3 reads gated {' or '.join(map(repr, T5_ACTIVATIONS))}.")
    return dataclasses.replace(t5_config, dense_act_fn=activation, layer_norm_epsilon=encoder["layer_norm_epsilon"])


def tokenizer_assets(folder):
    """`{"clip_l": (vocab dict, merges list, pad token), "clip_g": ...}` from the preset's CLIP assets."""
    found = {}
    for name in ("clip_l", "clip_g"):
        assets = os.path.join(folder, "assets", f"{name}_tokenizer")
        config_path = os.path.join(folder, f"{name}_tokenizer.json")
        if not os.path.isdir(assets):
            raise CheckpointError(f"The KerasHub preset {folder} has no {name} tokenizer assets ({assets}).")
        with open(os.path.join(assets, "vocabulary.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(assets, "merges.txt"), encoding="utf-8") as f:
            merges = [m for m in f.read().splitlines() if m and not m.startswith("#version")]
        pad_with_end = False
        if os.path.isfile(config_path):
            with open(config_path) as f:
                pad_with_end = json.load(f)["config"].get("pad_with_end_token", False)
        # KerasHub's CLIP tokenizer pads with id 0 unless `pad_with_end_token`.
        pad = "<|endoftext|>" if pad_with_end else next(t for t, i in vocab.items() if i == 0)
        found[name] = (vocab, [tuple(m.split(" ")) for m in merges], pad)
    return found


def t5_tokenizer_asset(folder):
    """`(SentencePiece model path, sequence length)` of the preset's T5 preprocessor, or None without one."""
    spm = os.path.join(folder, "assets", "t5_tokenizer", "vocabulary.spm")
    if not os.path.isfile(spm):
        return None
    length = 256  # keras-hub's T5Preprocessor default
    config_path = os.path.join(folder, "t5_preprocessor.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            length = json.load(f)["config"].get("sequence_length") or length
    return spm, length
