"""Key maps from the original single-file SD3 / SD3.5 checkpoints to diffusers names (SPEC §2.2, §6).

Each map is a table of `(pattern, targets, transform)`: the first rule whose regex matches an original
key renames it to each target (a `re` replacement template); `transform` rewrites the tensor (split a
fused qkv into q / k / v, swap adaLN halves, squeeze 1x1 convs). Reading stays lazy: a renamed source
reads the original tensor only when the renamed one is asked for.
"""

import re

import numpy as np

from keras_sd3.models.clip import CLIPConfig
from keras_sd3.models.config import MMDiTConfig, VAEConfig
from keras_sd3.models.t5 import T5Config
from keras_sd3.weights.safetensors_file import CheckpointError, TensorSource

_COPY = (lambda shape: tuple(shape), lambda a: a)
_SWAP_HALVES = (lambda shape: tuple(shape), lambda a: np.concatenate(np.split(a, 2, axis=0)[::-1], axis=0))
_SQUEEZE_1X1 = (lambda shape: tuple(shape[:2]), lambda a: a.reshape(a.shape[:2]))  # 1x1 conv -> Linear


def _row_part(index, parts):
    def shape_fn(shape):
        return (shape[0] // parts, *shape[1:])

    def array_fn(a):
        rows = a.shape[0] // parts
        return a[index * rows : (index + 1) * rows]

    return shape_fn, array_fn


def _qkv(prefix, names):
    """A rule splitting a fused `{prefix}.qkv` into three diffusers projections."""
    return prefix + r"\.qkv\.(weight|bias)", names, "qkv"


def mmdit_rules(last_block):
    """The MMDiT key map; the last block's context adaLN has (shift, scale) swapped to diffusers order."""
    blk, out = r"joint_blocks\.(\d+)\.", r"transformer_blocks.\1."
    return [
        (r"pos_embed", ["pos_embed.pos_embed"], _COPY),
        (r"x_embedder\.proj\.(weight|bias)", [r"pos_embed.proj.\1"], _COPY),
        (r"t_embedder\.mlp\.0\.(weight|bias)", [r"time_text_embed.timestep_embedder.linear_1.\1"], _COPY),
        (r"t_embedder\.mlp\.2\.(weight|bias)", [r"time_text_embed.timestep_embedder.linear_2.\1"], _COPY),
        (r"y_embedder\.mlp\.0\.(weight|bias)", [r"time_text_embed.text_embedder.linear_1.\1"], _COPY),
        (r"y_embedder\.mlp\.2\.(weight|bias)", [r"time_text_embed.text_embedder.linear_2.\1"], _COPY),
        (r"context_embedder\.(weight|bias)", [r"context_embedder.\1"], _COPY),
        _qkv(blk + r"x_block\.attn", [out + f"attn.to_{n}.\\2" for n in "qkv"]),
        _qkv(blk + r"context_block\.attn", [out + f"attn.add_{n}_proj.\\2" for n in "qkv"]),
        _qkv(blk + r"x_block\.attn2", [out + f"attn2.to_{n}.\\2" for n in "qkv"]),
        (blk + r"x_block\.attn\.ln_(q|k)\.weight", [out + r"attn.norm_\2.weight"], _COPY),
        (blk + r"context_block\.attn\.ln_(q|k)\.weight", [out + r"attn.norm_added_\2.weight"], _COPY),
        (blk + r"x_block\.attn2\.ln_(q|k)\.weight", [out + r"attn2.norm_\2.weight"], _COPY),
        (blk + r"x_block\.attn\.proj\.(weight|bias)", [out + r"attn.to_out.0.\2"], _COPY),
        (blk + r"x_block\.attn2\.proj\.(weight|bias)", [out + r"attn2.to_out.0.\2"], _COPY),
        (blk + r"context_block\.attn\.proj\.(weight|bias)", [out + r"attn.to_add_out.\2"], _COPY),
        (blk + r"x_block\.adaLN_modulation\.1\.(weight|bias)", [out + r"norm1.linear.\2"], _COPY),
        (
            rf"joint_blocks\.({last_block})\.context_block\.adaLN_modulation\.1\.(weight|bias)",
            [out + r"norm1_context.linear.\2"],
            _SWAP_HALVES,
        ),
        (blk + r"context_block\.adaLN_modulation\.1\.(weight|bias)", [out + r"norm1_context.linear.\2"], _COPY),
        (blk + r"x_block\.mlp\.fc1\.(weight|bias)", [out + r"ff.net.0.proj.\2"], _COPY),
        (blk + r"x_block\.mlp\.fc2\.(weight|bias)", [out + r"ff.net.2.\2"], _COPY),
        (blk + r"context_block\.mlp\.fc1\.(weight|bias)", [out + r"ff_context.net.0.proj.\2"], _COPY),
        (blk + r"context_block\.mlp\.fc2\.(weight|bias)", [out + r"ff_context.net.2.\2"], _COPY),
        (r"final_layer\.linear\.(weight|bias)", [r"proj_out.\1"], _COPY),
        (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", [r"norm_out.linear.\1"], _SWAP_HALVES),
    ]


def vae_rules(num_levels):
    """The VAE key map; decoder levels are stored in reverse order in the original layout."""
    resnet = r"\.(norm1|conv1|norm2|conv2)\.(weight|bias)"
    rules = [(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", [r"\1.\2.\3"], _COPY)]
    rules.append((r"(encoder|decoder)\.norm_out\.(weight|bias)", [r"\1.conv_norm_out.\2"], _COPY))
    rules.append((r"(encoder|decoder)\.mid\.block_1\.(.*)", [r"\1.mid_block.resnets.0.\2"], _COPY))
    rules.append((r"(encoder|decoder)\.mid\.block_2\.(.*)", [r"\1.mid_block.resnets.1.\2"], _COPY))
    attn = r"(encoder|decoder)\.mid\.attn_1\."
    rules.append((attn + r"norm\.(weight|bias)", [r"\1.mid_block.attentions.0.group_norm.\2"], _COPY))
    for original, name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rules.append((attn + original + r"\.weight", [rf"\1.mid_block.attentions.0.{name}.weight"], _SQUEEZE_1X1))
        rules.append((attn + original + r"\.bias", [rf"\1.mid_block.attentions.0.{name}.bias"], _COPY))
    for level in range(num_levels):
        up = num_levels - 1 - level
        rules += [
            (rf"encoder\.down\.{level}\.block\.(\d+){resnet}", [rf"encoder.down_blocks.{level}.resnets.\1.\2.\3"], _COPY),
            (rf"encoder\.down\.{level}\.block\.(\d+)\.nin_shortcut\.(weight|bias)",
             [rf"encoder.down_blocks.{level}.resnets.\1.conv_shortcut.\2"], _COPY),
            (rf"encoder\.down\.{level}\.downsample\.conv\.(weight|bias)",
             [rf"encoder.down_blocks.{level}.downsamplers.0.conv.\1"], _COPY),
            (rf"decoder\.up\.{level}\.block\.(\d+){resnet}", [rf"decoder.up_blocks.{up}.resnets.\1.\2.\3"], _COPY),
            (rf"decoder\.up\.{level}\.block\.(\d+)\.nin_shortcut\.(weight|bias)",
             [rf"decoder.up_blocks.{up}.resnets.\1.conv_shortcut.\2"], _COPY),
            (rf"decoder\.up\.{level}\.upsample\.conv\.(weight|bias)",
             [rf"decoder.up_blocks.{up}.upsamplers.0.conv.\1"], _COPY),
        ]
    return rules


def rename(source, rules, what):
    """Applies a key map to a `TensorSource`; an original key no rule matches is an error."""
    shapes, readers, forms = {}, {}, {}
    compiled = [(re.compile(p), targets, t) for p, targets, t in rules]
    for key in source.keys():
        for pattern, targets, transform in compiled:
            match = pattern.fullmatch(key)
            if match:
                break
        else:
            raise CheckpointError(f"The {what} has a tensor this model does not use: '{key}'.")
        if transform == "qkv":
            parts = [_row_part(i, 3) for i in range(3)]
        else:
            parts = [transform] * len(targets)
        for target, (shape_fn, array_fn) in zip(targets, parts):
            name = match.expand(target)
            shapes[name] = shape_fn(source.shapes[key])
            readers[name] = lambda key=key, array_fn=array_fn: array_fn(source.read(key))
            if key in source.forms:  # (rows of GGUF blocks and float8 values split and reorder as values do)
                forms[name] = source.forms[key]
    return TensorSource(shapes, readers, forms)


def _require(source, key, what):
    if key not in source:
        raise CheckpointError(f"The {what} is not an SD3 / SD3.5 checkpoint: tensor '{key}' is missing.")
    return source.shapes[key]


def infer_mmdit_config(source):
    """Infers the MMDiT variant from original-layout tensor names and shapes (SPEC §1.3)."""
    what = "MMDiT in this checkpoint (prefix 'model.diffusion_model.')"
    dim, in_channels, patch, _ = _require(source, "x_embedder.proj.weight", what)
    table = _require(source, "pos_embed", what)
    blocks = {int(k.split(".")[1]) for k in source.keys() if k.startswith("joint_blocks.")}
    if not blocks:
        raise CheckpointError(f"The {what} has no 'joint_blocks.*' tensors.")
    heads = dim // 64
    return MMDiTConfig(
        num_layers=max(blocks) + 1,
        num_attention_heads=heads,
        attention_head_dim=64,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=_require(source, "final_layer.linear.weight", what)[0] // patch**2,
        joint_attention_dim=_require(source, "context_embedder.weight", what)[1],
        caption_projection_dim=dim,
        pooled_projection_dim=_require(source, "y_embedder.mlp.0.weight", what)[1],
        pos_embed_max_size=int(round(table[1] ** 0.5)),
        qk_norm=any(".ln_q." in k for k in source.keys()),
        dual_attention_layers=tuple(sorted(b for b in blocks if f"joint_blocks.{b}.x_block.attn2.qkv.weight" in source)),
    )


def infer_vae_config(source):
    """Infers the VAE layout from original-layout tensors; constants are SD3's (SPEC §1.4)."""
    what = "VAE in this checkpoint (prefix 'first_stage_model.')"
    levels = sorted({int(k.split(".")[2]) for k in source.keys() if k.startswith("encoder.down.")})
    if not levels:
        raise CheckpointError(f"The {what} has no 'encoder.down.*' tensors.")
    channels = tuple(_require(source, f"encoder.down.{i}.block.0.conv2.weight", what)[0] for i in levels)
    per_block = len({k.split(".")[4] for k in source.keys() if k.startswith("encoder.down.0.block.")})
    return VAEConfig(
        block_out_channels=channels,
        layers_per_block=per_block,
        latent_channels=_require(source, "decoder.conv_in.weight", what)[1],
    )


def _count(source, prefix):
    """Number of distinct indices `i` in keys `{prefix}{i}.*`."""
    return len({k[len(prefix) :].split(".")[0] for k in source.keys() if k.startswith(prefix)})


def infer_clip_config(source, hidden_act, what):
    """Infers a CLIP text encoder from transformers-named tensors (heads of 64, eos = last id)."""
    vocab, hidden = _require(source, "text_model.embeddings.token_embedding.weight", what)
    projection = source.shapes.get("text_projection.weight", (hidden, hidden))[0]
    return CLIPConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_require(source, "text_model.encoder.layers.0.mlp.fc1.weight", what)[0],
        num_hidden_layers=_count(source, "text_model.encoder.layers."),
        num_attention_heads=hidden // 64,
        max_position_embeddings=_require(source, "text_model.embeddings.position_embedding.weight", what)[0],
        hidden_act=hidden_act,
        projection_dim=projection,
        eos_token_id=vocab - 1,
    )


def infer_t5_config(source, what):
    """Infers a T5 encoder from transformers-named tensors."""
    vocab, d_model = _require(source, "shared.weight", what)
    buckets, heads = _require(source, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", what)
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=_require(source, "encoder.block.0.layer.0.SelfAttention.q.weight", what)[0] // heads,
        d_ff=_require(source, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", what)[0],
        num_layers=_count(source, "encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


_GROUP = re.compile(r"\([^()]*\)")  # a group of a rule's pattern: (\d+), (weight|bias), (q|k), (23)


def _inverse_rule(pattern, target):
    """One rule read backwards: (regex of the diffusers name, template of the original name).

    Group i of `pattern` becomes the named group `g{i}` of the regex (where `target` has `\\i`) and
    `\\g<g{i}>` in the template; the patterns hold nothing but escaped dots besides their groups.
    """
    groups = _GROUP.findall(pattern)
    pieces = re.split(r"\\(\d)", target)  # literal, group number, literal, ...
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<g{p}>{groups[int(p) - 1][1:-1]})"
                    for i, p in enumerate(pieces))
    names = iter(range(1, len(groups) + 1))
    template = _GROUP.sub(lambda _: rf"\g<g{next(names)}>", pattern).replace(r"\.", ".")
    return re.compile(regex), template


def to_original_mmdit(source, config):
    """The MMDiT's diffusers-named tensors under their original single-file names (lazily).

    The inverse of `rename(..., mmdit_rules(config.num_layers - 1), ...)`, derived from the same
    table: q / k / v projections are fused again into one `qkv` (rows in q, k, v order) and the swapped
    adaLN halves are swapped back (the other transforms are their own inverses). Tensors are read with
    `source.read_float`, so stored forms (GGUF blocks, float8) come out as float values.

    Args:
        source: a `TensorSource` with diffusers names (a `Checkpoint`'s `mmdit.tensors`).
        config: its `MMDiTConfig`.

    Returns:
        A `TensorSource` with original names (no `model.diffusion_model.` prefix).

    Raises:
        CheckpointError: a tensor has no original name, or a fused qkv misses one of its parts.
    """
    inverse = [(*_inverse_rule(pattern, target), transform, index)
               for pattern, targets, transform in mmdit_rules(config.num_layers - 1)
               for index, target in enumerate(targets)]
    shapes, readers, fused = {}, {}, {}
    for key in source.keys():
        for regex, template, transform, index in inverse:
            match = regex.fullmatch(key)
            if match:
                break
        else:
            raise CheckpointError(f"The MMDiT has a tensor with no original single-file name: '{key}'.")
        name = match.expand(template)
        if transform == "qkv":
            fused.setdefault(name, [None] * 3)[index] = key
            continue
        shapes[name] = source.shapes[key]
        readers[name] = lambda key=key, array_fn=transform[1]: array_fn(source.read_float(key))
    for name, keys in fused.items():
        if None in keys:
            raise CheckpointError(f"The MMDiT has only some of the q / k / v parts of '{name}': {keys}.")
        rows = sum(source.shapes[k][0] for k in keys)
        shapes[name] = (rows, *source.shapes[keys[0]][1:])
        readers[name] = lambda keys=keys: np.concatenate([source.read_float(k) for k in keys])
    return TensorSource(shapes, readers)
