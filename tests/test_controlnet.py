"""SD3 / SD3.5 ControlNets vs diffusers: the model, the MMDiT's residual rule, the pipeline end to end,
strict loading, compilation and input checks, on tiny random checkpoints."""

import dataclasses
import os
from unittest import mock

import keras
import numpy as np
import pytest
import torch
from conftest import IMAGE_SHAPE, LATENT_SHAPE, TINY_MMDIT, assert_close, random_inputs, randomize, to_nchw, to_nhwc
from safetensors.numpy import load_file, save_file
from tiny_text import build_pipeline

from keras_sd3.models import SD3ControlNet, StableDiffusion3ControlNet, StableDiffusion3TextToImage
from keras_sd3.weights import CheckpointError

H, W, _ = IMAGE_SHAPE
TOLERANCE = 2 / 255
PROMPTS = ["a red circle on a blue background", "a small green triangle in the top left"]
NET = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
           caption_projection_dim=128, pooled_projection_dim=192, out_channels=16)
VARIANTS = {  # InstantX SD3 (own position table, joint blocks) and Stability SD3.5 (neither)
    "sd3": dict(NET, joint_attention_dim=256, pos_embed_max_size=12),
    "sd35": dict(NET, joint_attention_dim=None, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
                 force_zeros_for_pooled_projection=False),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import SD3ControlNetModel

    folder = str(tmp_path_factory.mktemp("controlnet"))
    pipe = build_pipeline(os.path.join(folder, "sd3"), with_t5=True)
    text_to_image = StableDiffusion3TextToImage.from_preset(os.path.join(folder, "sd3"), image_shape=IMAGE_SHAPE)
    torch_nets, nets = {}, {}
    for i, name in enumerate(["sd3", "sd3_b", "sd35", "sd35_b"]):
        torch_nets[name] = randomize(SD3ControlNetModel(**VARIANTS[name.split("_")[0]]), 20 + i)
        torch_nets[name].save_pretrained(os.path.join(folder, name))
        nets[name] = SD3ControlNet.from_preset(os.path.join(folder, name))
    return dict(pipe=pipe, backbone=text_to_image.backbone, preprocessor=text_to_image.preprocessor,
                torch_nets=torch_nets, nets=nets, folder=folder, tasks={})


def task_for(setup, names):
    key = tuple(names)
    if key not in setup["tasks"]:
        setup["tasks"][key] = StableDiffusion3ControlNet(
            setup["backbone"], setup["preprocessor"], [setup["nets"][n] for n in names])
    return setup["tasks"][key]


def noise(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *LATENT_SHAPE)).astype(np.float32)


def control_image(seed):
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    p = np.random.default_rng(seed).uniform(0, 6, 3)
    return np.stack([np.sign(np.sin(5 * x + 3 * y + q)) * 0.9 for q in p], -1).astype(np.float32)


def test_mmdit_adds_residuals_as_diffusers(setup):
    # 3 blocks: 1, 2 or 3 residuals are spread by diffusers' interval rule; the last block gets none.
    pipe, backbone = setup["pipe"], setup["backbone"]
    latents, context, pooled = random_inputs(batch=2, seed=3)
    timestep = np.array([500.0, 20.0], np.float32)
    tokens = (LATENT_SHAPE[0] // 2) * (LATENT_SHAPE[1] // 2)
    for count in (1, 2, 3):
        residuals = [np.random.default_rng(count + i).standard_normal((2, tokens, 128)).astype(np.float32)
                     for i in range(count)]
        ours = backbone.diffuser(latents, context, pooled, timestep,
                                 controlnet_residuals=[keras.ops.convert_to_tensor(r) for r in residuals])
        with torch.no_grad():
            expected = pipe.transformer(
                hidden_states=to_nchw(latents), encoder_hidden_states=torch.from_numpy(context),
                pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(timestep),
                block_controlnet_hidden_states=[torch.from_numpy(r) for r in residuals], return_dict=False)[0]
        assert_close(keras.ops.convert_to_numpy(ours), to_nhwc(expected))


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_controlnet_matches_diffusers(setup, name):
    from diffusers import StableDiffusion3ControlNetPipeline

    torch_net = setup["torch_nets"][name]
    StableDiffusion3ControlNetPipeline(**setup["pipe"].components, controlnet=torch_net)  # SD3.5: borrows pos_embed
    latents, context, pooled = random_inputs(batch=2, seed=4)
    cond = np.random.default_rng(5).standard_normal(latents.shape).astype(np.float32)
    timestep = np.array([700.0, 100.0], np.float32)
    joint = torch_net.config.joint_attention_dim is not None
    ours = setup["nets"][name](latents, cond, context, pooled, timestep, patch_embed=setup["backbone"].diffuser.pos_embed)
    with torch.no_grad():
        expected = torch_net(
            hidden_states=to_nchw(latents), controlnet_cond=to_nchw(cond), conditioning_scale=1.0,
            encoder_hidden_states=torch.from_numpy(context) if joint else None,
            pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(timestep), return_dict=False)[0]
    assert len(ours) == len(expected) == 2
    for a, b in zip(ours, expected):
        assert_close(keras.ops.convert_to_numpy(a), b.numpy())


def reference(setup, names, latents, images, **kwargs):
    from diffusers import StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    nets = [setup["torch_nets"][n] for n in names]
    pipe = StableDiffusion3ControlNetPipeline(**setup["pipe"].components, controlnet=nets[0] if len(nets) == 1 else nets)
    pipe.set_progress_bar_config(disable=True)
    cond = [to_nchw(image[None]) for image in images]
    scale = kwargs["controlnet_conditioning_scale"]
    if len(nets) > 1 and not isinstance(scale, list):  # diffusers' multi-ControlNet needs a list
        kwargs["controlnet_conditioning_scale"] = [scale] * len(nets)
    with mock.patch.object(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean), \
            torch.no_grad():
        return pipe(latents=to_nchw(latents), control_image=cond[0] if len(cond) == 1 else cond, height=H, width=W,
                    output_type="np", **kwargs).images


def assert_images_close(ours, expected):
    ours = np.asarray(ours, np.float64) / 255.0
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    error = np.max(np.abs(ours - expected))
    assert error <= TOLERANCE, f"max abs difference {error * 255:.2f}/255 > 2/255"


@pytest.mark.parametrize(
    "names, prompts, scale, start, end, guidance, steps",
    [
        (["sd3"], PROMPTS, 0.5, 0.0, 1.0, 5.0, 3),
        (["sd35"], PROMPTS[0], 1.0, 0.2, 0.8, 4.0, 5),
        (["sd3", "sd3_b"], PROMPTS[:1], [0.5, 1.0], [0.2, 0.0], [0.8, 1.0], 1.0, 5),
        (["sd35", "sd35_b"], PROMPTS, 1.0, 0.2, 0.8, 5.0, 3),
    ],
)
def test_pipeline_matches_diffusers(setup, names, prompts, scale, start, end, guidance, steps):
    batch = 1 if isinstance(prompts, str) else len(prompts)
    latents, images = noise(batch, seed=len(names) + steps), [control_image(i) for i in range(len(names))]
    task = task_for(setup, names)
    settings = dict(num_steps=steps, guidance_scale=guidance, controlnet_conditioning_scale=scale,
                    control_guidance_start=start, control_guidance_end=end, latents=latents)
    ours = task.generate({"prompts": prompts, "control_images": images if len(names) > 1 else images[0]}, **settings)
    expected = reference(setup, names, latents, images, prompt=prompts, num_inference_steps=steps,
                         guidance_scale=guidance, controlnet_conditioning_scale=scale, control_guidance_start=start,
                         control_guidance_end=end)
    assert_images_close(ours[None] if isinstance(prompts, str) else ours, expected)
    without = task.generate({"prompts": prompts, "control_images": images},
                            **dict(settings, controlnet_conditioning_scale=0.0))
    assert np.max(np.abs(ours.astype(int) - without.astype(int))) > 2  # the ControlNet did something


def test_changing_scales_steps_prompts_does_not_recompile(setup):
    task = task_for(setup, ["sd3"])
    images = control_image(0)
    calls = [
        dict(inputs={"prompts": "a cat", "control_images": images}, num_steps=2, controlnet_conditioning_scale=0.5),
        dict(inputs={"prompts": "a dog", "control_images": images}, num_steps=3, controlnet_conditioning_scale=1.0,
             control_guidance_start=0.2, control_guidance_end=0.8, guidance_scale=3.0),
    ]
    task.generate(**calls[0])
    traces, programs = task.control_compiled.traces, len(task.control_compiled._programs)
    for call in calls[1:]:
        task.generate(**call)
    assert len(task.control_compiled._programs) == programs
    if keras.config.backend() != "torch":  # torch runs eagerly: every call runs the Python body
        assert task.control_compiled.traces == traces, "new scales, windows, steps or prompts recompiled"


def test_single_file_loads_like_the_folder_and_strictly(setup, tmp_path):
    for name in ("sd3", "sd35"):
        tensors = load_file(os.path.join(setup["folder"], name, "diffusion_pytorch_model.safetensors"))
        path = str(tmp_path / f"{name}.safetensors")
        save_file(tensors, path)
        net = SD3ControlNet.from_preset(path)
        assert net.config == dataclasses.replace(setup["nets"][name].config, sample_size=128)  # not in the tensors
        for a, b in zip(net.weights, setup["nets"][name].weights):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    key = "transformer_blocks.1.attn.to_k.weight"
    broken = {
        "missing": ({k: v for k, v in tensors.items() if k != "controlnet_blocks.1.bias"}, "controlnet_blocks.1.bias"),
        "unexpected": ({**tensors, "extra.weight": np.zeros(3, np.float32)}, "extra.weight"),
        "shape": ({**tensors, key: tensors[key][:, :-1]}, key),
    }
    for kind, (state, name) in broken.items():
        path = str(tmp_path / f"{kind}.safetensors")
        save_file(state, path)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            SD3ControlNet.from_preset(path)


@pytest.mark.parametrize(
    "names, control_images, message",
    [
        (["sd3"], np.zeros((32, 32, 3), np.float32), r"control image 0 is 32 x 32 pixels but the output is 48 x 80"),
        (["sd3", "sd35"], [np.zeros((H, W, 3), np.float32)], r"Got 1 control image\(s\) for 2 ControlNet"),
        (["sd3"], [np.zeros((H, W, 3), np.float32)] * 2, r"Got 2 control image\(s\) for 1 ControlNet"),
    ],
)
def test_bad_control_images_raise_before_model_work(setup, names, control_images, message):
    task = task_for(setup, names) if names != ["sd3", "sd35"] else StableDiffusion3ControlNet(
        setup["backbone"], setup["preprocessor"], [setup["nets"]["sd3"], setup["nets"]["sd35"]])
    with mock.patch.object(task, "encode", side_effect=AssertionError("model work before the check")):
        with pytest.raises(ValueError, match=message):
            task.generate({"prompts": "x", "control_images": control_images})


def test_bad_settings_raise(setup):
    task = task_for(setup, ["sd3"])
    inputs = {"prompts": "x", "control_images": control_image(0)}
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 2 values for 1 ControlNets"):
        task.generate(inputs, controlnet_conditioning_scale=[1.0, 0.5])
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        task.generate(inputs, control_guidance_start=0.8, control_guidance_end=0.2)
    with pytest.raises(ValueError, match="unknown key"):
        task.generate({**inputs, "images": control_image(0)})
