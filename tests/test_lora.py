"""LoRA adapters vs diffusers' `load_lora_weights` on a tiny random pipeline: PEFT and kohya files,
scales, several LoRAs, trainer export, no recompilation, exact unload, strict refusal."""

import copy
import json
import os

import keras
import numpy as np
import pytest
import torch
from conftest import IMAGE_SHAPE, LATENT_SHAPE, to_nchw
from safetensors.numpy import load_file, save_file
from tiny_text import build_pipeline

from keras_sd3.lora import LoraError
from keras_sd3.models import StableDiffusion3TextToImage

H, W, _ = IMAGE_SHAPE
PROMPT = "a red circle on a blue background"
STEPS, GUIDANCE = 3, 5.0
TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def peft_lora(model, targets, rank, alpha, seed, alpha_pattern=None):
    """PEFT adapters on a copy of `model` with random non-zero A and B -> (state dict, LoraConfig)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, alpha_pattern=alpha_pattern or {})
    model = inject_adapter_in_model(config, copy.deepcopy(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator) / np.sqrt(p.shape[1]))
    return get_peft_model_state_dict(model), config


def write_diffusers_lora(folder, pipe, file_name, seed, rank=4, alpha=8, text=True, alpha_pattern=None):
    """A LoRA written by `StableDiffusion3Pipeline.save_lora_weights` (transformer, optionally CLIP-L / G)."""
    from diffusers import StableDiffusion3Pipeline

    layers, metadata = {}, {}
    parts = [("transformer", pipe.transformer, TRANSFORMER_TARGETS, alpha_pattern)]
    if text:
        parts += [("text_encoder", pipe.text_encoder, TEXT_TARGETS, None), ("text_encoder_2", pipe.text_encoder_2, TEXT_TARGETS, None)]
    for i, (part, model, targets, pattern) in enumerate(parts):
        layers[part], config = peft_lora(model, targets, rank, alpha, seed + i, pattern)
        metadata[part] = config.to_dict()
    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=layers["transformer"], text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"), weight_name=file_name,
        transformer_lora_adapter_metadata=metadata["transformer"],
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
        text_encoder_2_lora_adapter_metadata=metadata.get("text_encoder_2"),
    )
    return os.path.join(folder, file_name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lora"))
    pipe = build_pipeline(os.path.join(folder, "model"), with_t5=True)
    files = {
        "a": write_diffusers_lora(folder, pipe, "a.safetensors", seed=1, alpha_pattern={"ff.net.2": 2.0}),
        "b": write_diffusers_lora(folder, pipe, "b.safetensors", seed=5, rank=2, alpha=2, text=False),
    }
    task = StableDiffusion3TextToImage.from_preset(os.path.join(folder, "model"), image_shape=IMAGE_SHAPE)
    return folder, task, files


def latents_noise(seed=0):
    return np.random.default_rng(seed).standard_normal((1, *LATENT_SHAPE)).astype(np.float32)


def ours(task, output="images"):
    return task.generate(PROMPT, num_steps=STEPS, guidance_scale=GUIDANCE, latents=latents_noise(), output=output)


def diffusers_images(folder, loras):
    """diffusers' pipeline with `loras` = [(file, weight)] loaded under names "l0", "l1", ..."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(folder, "model"))
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"l{i}")
        names.append(f"l{i}")
    if loras:
        pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    with torch.no_grad():
        return pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    latents=to_nchw(latents_noise()), output_type="np").images[0]


def max_difference(ours_uint8, expected):
    return np.max(np.abs(np.asarray(ours_uint8, np.float64) / 255.0 - expected))


def assert_images_close(ours_uint8, expected):
    error = max_difference(ours_uint8, expected)
    assert error <= 2 / 255, f"max abs difference {error * 255:.2f}/255 > 2/255"


def test_peft_lora_matches_diffusers_at_two_scales(setup):
    folder, task, files = setup
    base = diffusers_images(folder, [])
    name = task.backbone.load_lora(files["a"])
    try:
        assert name == "a" and task.backbone.lora_names == ["a"]
        full = ours(task)
        assert_images_close(full, diffusers_images(folder, [(files["a"], 1.0)]))
        assert max_difference(full, base) > 10 / 255  # the LoRA changes the picture
        task.backbone.set_lora_scale("a", 0.5)
        assert_images_close(ours(task), diffusers_images(folder, [(files["a"], 0.5)]))
    finally:
        task.backbone.unload_lora("a")


def test_two_loras_match_diffusers(setup):
    folder, task, files = setup
    task.backbone.load_lora(files["a"], scale=0.8)
    task.backbone.load_lora(files["b"], scale=1.5, name="second")
    try:
        expected = diffusers_images(folder, [(files["a"], 0.8), (files["b"], 1.5)])
        assert_images_close(ours(task), expected)
    finally:
        task.backbone.unload_lora("a")
        task.backbone.unload_lora("second")


def to_kohya(path, out_path, split):
    """Rewrites a diffusers LoRA in kohya naming: original MMDiT names with q / k / v fused into one
    `qkv` adapter (down stacked, up block-diagonal, alpha x 3 for rank x 3), or diffusers names
    (`lora_transformer_*`, split); alphas as `.alpha` tensors."""
    tensors = load_file(path)
    with open(path, "rb") as f:
        metadata = json.loads(json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]["lora_adapter_metadata"])
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    out = {}

    def put(name, down, up, alpha):
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = np.array(alpha, np.float32)

    def alpha_of(module):
        part, rest = module.split(".", 1)
        pattern = metadata.get(f"{part}.alpha_pattern", {})
        return next((v for k, v in pattern.items() if rest.endswith(k)), metadata[f"{part}.lora_alpha"])

    sai = {"attn.to_out.0": "x_block_attn_proj", "attn.to_add_out": "context_block_attn_proj",
           "ff.net.0.proj": "x_block_mlp_fc1", "ff.net.2": "x_block_mlp_fc2",
           "ff_context.net.0.proj": "context_block_mlp_fc1", "ff_context.net.2": "context_block_mlp_fc2"}
    fused = {"attn.to_q": ("x_block", "to_{}"), "attn.add_q_proj": ("context_block", "add_{}_proj")}
    for module in sorted(modules):
        down, up, alpha = tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"], alpha_of(module)
        part, rest = module.split(".", 1)
        if part != "transformer":
            put({"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part] + rest.replace(".", "_"), down, up, alpha)
            continue
        if split:
            put("lora_transformer_" + rest.replace(".", "_"), down, up, alpha)
            continue
        _, block, layer = rest.split(".", 2)
        if layer in sai:
            put(f"lora_unet_joint_blocks_{block}_{sai[layer]}", down, up, alpha)
        elif layer in fused:
            stream, template = fused[layer]
            names = [f"transformer.transformer_blocks.{block}.attn.{template.format(n)}" for n in "qkv"]
            downs = [tensors[n + ".lora_A.weight"] for n in names]
            ups = [tensors[n + ".lora_B.weight"] for n in names]
            rank, rows = downs[0].shape[0], ups[0].shape[0]
            block_up = np.zeros((3 * rows, 3 * rank), np.float32)
            for i, u in enumerate(ups):
                block_up[i * rows : (i + 1) * rows, i * rank : (i + 1) * rank] = u
            put(f"lora_unet_joint_blocks_{block}_{stream}_attn_qkv", np.concatenate(downs), block_up, 3 * alpha)
    fused_away = 0 if split else 4 * len({m.split(".")[2] for m in modules if ".to_q" in m})  # 6 -> 2 per block
    assert len(out) == 3 * (len(modules) - fused_away)
    save_file(out, out_path)
    return out_path


@pytest.mark.parametrize("split", [False, True], ids=["fused_qkv", "split_qkv"])
def test_kohya_lora_gives_the_same_images(setup, split):
    folder, task, files = setup
    kohya = to_kohya(files["a"], os.path.join(folder, f"kohya_{split}.safetensors"), split)
    assert any("qkv" in k for k in load_file(kohya)) != split
    task.backbone.load_lora(files["a"])
    expected = ours(task, output="latents")
    task.backbone.unload_lora("a")
    task.backbone.load_lora(kohya, name="kohya")
    try:
        np.testing.assert_allclose(ours(task, output="latents"), expected, rtol=0, atol=1e-4)
    finally:
        task.backbone.unload_lora("kohya")


def test_trainer_lora_loads_in_diffusers(setup, tmp_path):
    from keras_sd3.training.trainer import enable_lora

    folder, _, _ = setup
    task = StableDiffusion3TextToImage.from_preset(os.path.join(folder, "model"), image_shape=IMAGE_SHAPE)
    assert enable_lora(task.backbone, rank=2) > 0
    rng = np.random.default_rng(0)
    for variable in task.backbone.diffuser.weights:
        if "lora_kernel" in variable.path:
            variable.assign(0.3 * rng.standard_normal(variable.shape).astype(np.float32))
    task.backbone.diffuser.transformer_blocks[0].attn.to_q.lora_alpha = 6  # alpha != rank somewhere
    path = str(tmp_path / "trained.safetensors")
    task.backbone.save_lora(path)
    assert_images_close(ours(task), diffusers_images(folder, [(path, 1.0)]))


def test_scale_change_does_not_recompile_and_old_tasks_see_loras(setup):
    folder, task, files = setup
    before = ours(task, output="latents")
    task.backbone.load_lora(files["b"], name="b")
    try:
        with_lora = ours(task, output="latents")
        assert not np.allclose(with_lora, before)  # built before load_lora, the task sees it
        traces = task.compiled.traces
        task.backbone.set_lora_scale("b", 0.0)
        np.testing.assert_allclose(ours(task, output="latents"), before, rtol=0, atol=1e-5)
        task.backbone.set_lora_scale("b", 1.0)
        np.testing.assert_array_equal(ours(task, output="latents"), with_lora)
        if keras.config.backend() != "torch":  # torch runs eagerly: every call counts as a trace
            assert task.compiled.traces == traces
    finally:
        task.backbone.unload_lora("b")


def test_unload_and_fuse(setup):
    folder, _, files = setup
    task = StableDiffusion3TextToImage.from_preset(os.path.join(folder, "model"), image_shape=IMAGE_SHAPE)
    base = ours(task, output="latents")
    task.backbone.load_lora(files["a"], scale=0.7)
    task.backbone.load_lora(files["b"])
    unfused = ours(task, output="latents")
    task.backbone.unload_lora("b")
    task.backbone.unload_lora("a")
    np.testing.assert_array_equal(ours(task, output="latents"), base)
    assert task.backbone.lora_names == []
    task.backbone.load_lora(files["a"], scale=0.7)
    task.backbone.load_lora(files["b"])
    count = len(task.backbone.weights)
    task.backbone.fuse_loras()
    assert task.backbone.lora_names == [] and len(task.backbone.weights) < count
    np.testing.assert_allclose(ours(task, output="latents"), unfused, rtol=0, atol=1e-4)


def test_refused_files_leave_the_model_unchanged(setup):
    folder, task, files = setup
    before = ours(task, output="latents")
    tensors = load_file(files["b"])
    bad_key = dict(tensors, **{"transformer.transformer_blocks.0.attn.to_zz.lora_A.weight": np.zeros((2, 128), np.float32),
                               "transformer.transformer_blocks.0.attn.to_zz.lora_B.weight": np.zeros((128, 2), np.float32)})
    unknown = dict(tensors, **{"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": np.zeros(128, np.float32)})
    key = "transformer.transformer_blocks.1.attn.to_k.lora_A.weight"
    shape = dict(tensors, **{key: np.zeros((2, 64), np.float32)})
    cases = [(bad_key, "to_zz.lora_A.weight"), (unknown, "lora_magnitude_vector"), (shape, "to_k.lora_A.weight")]
    for i, (content, named) in enumerate(cases):
        path = os.path.join(folder, f"bad{i}.safetensors")
        save_file(content, path)
        with pytest.raises(LoraError, match=named.replace(".", r"\.")):
            task.backbone.load_lora(path)
        assert task.backbone.lora_names == []
    np.testing.assert_array_equal(ours(task, output="latents"), before)


def test_save_lora_round_trips_a_loaded_adapter(setup, tmp_path):
    from keras_sd3.lora import read_lora

    folder, task, files = setup
    task.backbone.load_lora(files["a"], scale=0.3)
    try:
        task.backbone.save_lora(tmp_path / "copy.safetensors", "a")
    finally:
        task.backbone.unload_lora("a")

    def deltas(path):
        return {(w.part, w.module): w.alpha / w.rank * (w.up @ w.down) for w in read_lora(str(path), last_block=2)}

    original, copy_ = deltas(files["a"]), deltas(tmp_path / "copy.safetensors")
    assert original.keys() == copy_.keys() and len(original) == 12 + 12 + 9 + 2 * 3 * 5  # MMDiT blocks, CLIPs
    for key, delta in original.items():
        np.testing.assert_allclose(copy_[key], delta, rtol=1e-6, atol=1e-7)
