"""LoRA files: the key tables of the diffusers / PEFT and kohya (sd-scripts) formats, reading and writing.

A file is read into `LoraWeights` keyed by the diffusers name of the layer they adapt
(`("transformer", "transformer_blocks.0.attn.to_q")`), each with `down` (rank, in), `up` (out, rank)
in PyTorch layout and its `alpha`. Every key must match a row of its format's table and name a layer of
the model, or the file is refused with an error that names the key.

- diffusers / PEFT (`StableDiffusion3Pipeline.save_lora_weights`): `{part}.{module}.lora_A.weight`,
  `.lora_B.weight`, optional `.alpha`; alphas otherwise from the `lora_adapter_metadata` JSON of the
  safetensors metadata (`{part}.lora_alpha`, `{part}.alpha_pattern`, `{part}.use_rslora`), else alpha = rank.
- kohya / sd-scripts (`networks/lora_sd3.py`): `lora_unet_{module}.lora_down.weight`, `.lora_up.weight`,
  `.alpha` with the original (SAI) MMDiT names with `_` for `.` (`joint_blocks_0_x_block_attn_qkv`, a
  fused q / k / v whose `lora_up` rows are split in three); `lora_te1_` / `lora_te2_` for CLIP-L / G;
  `lora_transformer_{diffusers module}` for the split q / k / v layout (OneTrainer). Scale alpha / rank
  with rank = rows of `lora_down`.
"""

import collections
import dataclasses
import json
import re

import numpy as np

from keras_sd3.errors import CheckpointError
from keras_sd3.weights import original_keys
from keras_sd3.weights.safetensors_file import open_safetensors

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PARTS = ("transformer", "text_encoder", "text_encoder_2")  # diffusers' names of the MMDiT, CLIP-L, CLIP-G

# Key tables: (regex of a whole key, part, role); group 1 is the module name in that format.
DIFFUSERS_KEYS = [
    (rf"{part}\.(.+)\.{suffix}", part, role)
    for part in PARTS
    for suffix, role in ((r"lora_A\.weight", "down"), (r"lora_B\.weight", "up"), (r"alpha", "alpha"))
]
KOHYA_KEYS = [
    (rf"{prefix}_(\w+)\.{suffix}", part, role)
    for prefix, part in (("lora_unet", "sai"), ("lora_transformer", "transformer"), ("lora_te1", "text_encoder"),
                         ("lora_te2", "text_encoder_2"))
    for suffix, role in ((r"lora_down\.weight", "down"), (r"lora_up\.weight", "up"), (r"alpha", "alpha"))
]
DIFFUSERS = (DIFFUSERS_KEYS, "expected {transformer,text_encoder,text_encoder_2}.MODULE.{lora_A.weight,lora_B.weight,alpha}")
KOHYA = (KOHYA_KEYS, "expected {lora_unet,lora_transformer,lora_te1,lora_te2}_MODULE.{lora_down.weight,lora_up.weight,alpha}")
# kohya module names of the original MMDiT -> its dotted names (then `original_keys.mmdit_rules`).
KOHYA_SAI_MODULES = [
    (r"joint_blocks_(\d+)_(x_block|context_block)_(attn2?)_(qkv|proj)", r"joint_blocks.\1.\2.\3.\4"),
    (r"joint_blocks_(\d+)_(x_block|context_block)_mlp_(fc1|fc2)", r"joint_blocks.\1.\2.mlp.\3"),
    (r"joint_blocks_(\d+)_(x_block|context_block)_adaLN_modulation_1", r"joint_blocks.\1.\2.adaLN_modulation.1"),
    (r"(t_embedder|y_embedder)_mlp_(0|2)", r"\1.mlp.\2"),
    (r"context_embedder", r"context_embedder"),
    (r"final_layer_linear", r"final_layer.linear"),
    (r"final_layer_adaLN_modulation_1", r"final_layer.adaLN_modulation.1"),
]


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this model (the message names the key)."""


@dataclasses.dataclass
class LoraWeights:
    """One adapted layer: `delta W = alpha / rank * up @ down`, PyTorch layout.

    Attributes:
        part: "transformer", "text_encoder" or "text_encoder_2".
        module: the layer's diffusers name within the part ("transformer_blocks.0.attn.to_q").
        down: (rank, in) array; up: (out, rank) array; alpha: float.
        key: the file's key for this layer, for error messages.
        underscored: the module name has `_` for `.` (kohya), resolved against the model's own names.
    """

    part: str
    module: str
    down: np.ndarray
    up: np.ndarray
    alpha: float
    key: str
    underscored: bool = False

    @property
    def rank(self):
        return self.down.shape[0]


def read_metadata(path):
    """The `lora_adapter_metadata` dict of a safetensors file (diffusers' layout), or {}."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: unreadable '{METADATA_KEY}' metadata ({e}).")


def _group(keys, table, hint, path):
    """`{(part, module): {role: key}}`; a key no row of `table` matches is an error."""
    compiled = [(re.compile(p), part, role) for p, part, role in table]
    groups = collections.defaultdict(dict)
    for key in keys:
        for pattern, part, role in compiled:
            match = pattern.fullmatch(key)
            if match:
                groups[(part, match.group(1))][role] = key
                break
        else:
            raise LoraError(f"{path}: key '{key}' is not a LoRA key of SD3 ({hint}).")
    return groups


def _peft_alpha(metadata, part, module, rank):
    """PEFT's alpha rule: `alpha_pattern` (a regex matching the module name's end), else `lora_alpha`;
    with `use_rslora` the scale is alpha / sqrt(rank), returned here as the equivalent alpha."""
    config = {k[len(part) + 1 :]: v for k, v in metadata.items() if k.startswith(part + ".")}
    if not config:
        return float(rank)
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise LoraError(f"The LoRA's {part} uses {flag}, which keras_sd3 does not support.")
    alpha = config.get("lora_alpha", 8)  # LoraConfig's default
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha) * (np.sqrt(rank) if config.get("use_rslora") else 1.0)


def _sai_targets(module, last_block, key):
    """kohya's original-MMDiT module name -> [(diffusers module, up-rows transform)]."""
    for pattern, dotted in KOHYA_SAI_MODULES:
        match = re.fullmatch(pattern, module)
        if match:
            break
    else:
        raise LoraError(f"LoRA key '{key}' names no linear layer of the SD3 MMDiT ('{module}').")
    original = match.expand(dotted) + ".weight"
    for rule, targets, transform in original_keys.mmdit_rules(last_block):
        rule_match = re.fullmatch(rule, original)
        if rule_match:
            break
    else:
        raise LoraError(f"LoRA key '{key}' names no linear layer of the SD3 MMDiT ('{original}').")
    if transform == "qkv":
        transforms = [original_keys._row_part(i, 3)[1] for i in range(3)]
    else:
        transforms = [transform[1]] * len(targets)
    return [(rule_match.expand(t)[: -len(".weight")], f) for t, f in zip(targets, transforms)]


def read_lora(path, last_block):
    """Reads a diffusers / PEFT or kohya LoRA file into a list of `LoraWeights`.

    Args:
        path: a `.safetensors` file.
        last_block: index of the MMDiT's last block (whose context adaLN halves kohya stores swapped).

    Raises:
        LoraError: unknown key, a module without both matrices, or an unreadable file.
    """
    source = open_safetensors(path)
    keys = list(source.keys())
    if not keys:
        raise LoraError(f"{path} holds no tensors.")
    kohya = any(re.match(r"lora_(unet|te\d|transformer)_", k) for k in keys)
    groups = _group(keys, *(KOHYA if kohya else DIFFUSERS), path)
    metadata = {} if kohya else read_metadata(path)
    weights = []
    for (part, module), roles in groups.items():
        for role in ("down", "up"):
            if role not in roles:
                present = next(iter(roles.values()))
                raise LoraError(f"{path}: '{present}' has no matching {role} matrix in the file.")
        down, up = (source.read(roles[r]).astype(np.float32) for r in ("down", "up"))
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(
                f"{path}: '{roles['up']}' {up.shape} and '{roles['down']}' {down.shape} are not the two "
                "matrices (out, rank) and (rank, in) of a linear LoRA."
            )
        rank = down.shape[0]
        if "alpha" in roles:
            alpha = float(np.asarray(source.read(roles["alpha"]), np.float64).reshape(-1)[0])
        else:
            alpha = float(rank) if kohya else _peft_alpha(metadata, part, module, rank)
        if part == "sai":
            for target, rows in _sai_targets(module, last_block, roles["down"]):
                weights.append(LoraWeights("transformer", target, down, rows(up), alpha, roles["down"]))
        else:
            weights.append(LoraWeights(part, module, down, up, alpha, roles["down"], underscored=kohya))
    return weights


def write_lora(path, weights):
    """Writes `LoraWeights` in the diffusers / PEFT format (what diffusers' `load_lora_weights` reads).

    Ranks and alphas go into the `lora_adapter_metadata` JSON as PEFT `LoraConfig`s per part
    (`r`, `lora_alpha`, and `rank_pattern` / `alpha_pattern` for the layers that differ).
    """
    from safetensors.numpy import save_file

    tensors, metadata = {}, {}
    for part in PARTS:
        mine = [w for w in weights if w.part == part]
        if not mine:
            continue
        for w in mine:
            tensors[f"{part}.{w.module}.lora_A.weight"] = np.ascontiguousarray(w.down, np.float32)
            tensors[f"{part}.{w.module}.lora_B.weight"] = np.ascontiguousarray(w.up, np.float32)
        r = collections.Counter(w.rank for w in mine).most_common(1)[0][0]
        alpha = collections.Counter(w.alpha for w in mine).most_common(1)[0][0]
        config = {
            "r": r, "lora_alpha": alpha, "target_modules": sorted(w.module for w in mine),
            "rank_pattern": {re.escape(w.module): w.rank for w in mine if w.rank != r},
            "alpha_pattern": {re.escape(w.module): w.alpha for w in mine if w.alpha != alpha},
            "use_rslora": False, "use_dora": False, "lora_bias": False, "bias": "none", "lora_dropout": 0.0,
        }
        metadata.update({f"{part}.{k}": v for k, v in config.items()})
    save_file(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
