"""keras_sd3 on 8 forced XLA CPU devices against one device: run by test_distribution.py as

    KERAS_BACKEND=jax python tests/distribution_check.py FOLDER > results.json

(`XLA_FLAGS=--xla_force_host_platform_device_count=8` is set here, before jax starts, so the rest of the
suite keeps its one device.) Prints one JSON object of measurements; the test holds the tolerances.

- ModelParallel on (2, 4) and (4, 2) meshes (and (1, 8) for SD3), tiny checkpoints of the three variants with 8 heads
  everywhere (written here with diffusers / transformers): `encode_text_step`, `denoise_step` with
  guidance and skip-layer guidance, `decode_step` -> the largest difference relative to the largest
  value of one device's output; every variable's sharding against the distribution's layout map; the size of each
  device's shard of every split variable; the bytes that went from the host to one device while loading
  (a whole tensor on one device first, then split, would count; straight into shards does not).
- The SD3 tiny model quantized (int8, int4) on meshes 2x4 and 1x8 against one device, and its shardings.
- The real models' shapes (no values) on the same meshes: every variable's layout against a fresh
  `get_layout_map(mesh)` (CLIP's 77 positions are not split; T5's 32,128-row vocabulary is).
- DataParallel over the 8 devices on the embedded model: text-to-image of 8 prompts, ControlNet images of 3
  prompts (padded to 8) and a 16-frame circular walk -> the largest pixel difference to one device;
  programs traced by a second call.
- Bad meshes -> the error messages; a head count the model axis does not divide -> the warnings.
"""

import json
import os
import sys
import warnings

# (optimisation level 0: both sides compile the same way, and this takes a third less time)
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (" --xla_force_host_platform_device_count=8"
                                                             " --xla_backend_optimization_level=0")
os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import conftest  # noqa: E402
import tiny_text  # noqa: E402
from keras_sd3 import distribution, explore, sampling  # noqa: E402
from keras_sd3.backend import compile_function  # noqa: E402
from keras_sd3.models import (  # noqa: E402
    ControlNetConfig, SD3ControlNet, StableDiffusion3Backbone, StableDiffusion3ControlNet, StableDiffusion3TextToImage)
from keras_sd3.text.preprocessor import StableDiffusion3TextToImagePreprocessor  # noqa: E402

MESHES = {"sd3": ((2, 4), (4, 2), (1, 8)), "sd35_medium": ((2, 4), (4, 2)), "sd35_large": ((2, 4), (4, 2))}
PROMPTS = ["a red circle on a blue background", "a small green square"]
EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_sd3", "embedded",
                        "sd3_tiny_shapes")


def eight_heads():
    """Tiny configs whose every attention has 8 heads (so that 4 and 8 devices divide them)."""
    for config in conftest.VARIANTS.values():
        config.update(num_attention_heads=8, attention_head_dim=16)  # hidden 128 = caption_projection_dim
    tiny_text.CLIP_L = dict(tiny_text.CLIP_L, num_attention_heads=8)
    tiny_text.CLIP_G = dict(tiny_text.CLIP_G, num_attention_heads=8)
    tiny_text.T5 = dict(tiny_text.T5, num_heads=8)


def set_mesh(shape):
    if shape is None:
        keras.distribution.set_distribution(None)
        return
    mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], keras.distribution.list_devices())
    layout_map = StableDiffusion3Backbone.get_layout_map(mesh)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))


class HostToOneDevice:
    """Counts the bytes of NumPy arrays that reach a device other than through a sharding over the mesh."""

    def __enter__(self):
        self.bytes, self.real = 0, (jax.device_put, jax.numpy.asarray, jax.numpy.array)
        put, asarray, array = self.real

        def device_put(x, device=None, *args, **kwargs):
            if not isinstance(device, jax.sharding.NamedSharding):
                self.count(x)
            return put(x, device, *args, **kwargs)

        def counted(function):
            return lambda x, *args, **kwargs: (self.count(x), function(x, *args, **kwargs))[1]

        jax.device_put, jax.numpy.asarray, jax.numpy.array = device_put, counted(asarray), counted(array)
        return self

    def count(self, x):
        if isinstance(x, np.ndarray) and x.size > 1:
            self.bytes += x.nbytes

    def __exit__(self, *exc):
        jax.device_put, jax.numpy.asarray, jax.numpy.array = self.real


def steps(backbone, ids, negative_ids, latents):
    slg = sampling.SkipLayerGuidance(layers=(1,), scale=2.0, start=0.0, stop=1.0)

    def run(ids, negative_ids, latents):
        embeddings = backbone.encode_text_step(ids, negative_ids)
        denoised = backbone.denoise_step(latents, embeddings, 1, 4, guidance_scale=5.0, skip_layer_guidance=slg)
        return (*embeddings, denoised, backbone.decode_step(latents))

    outputs = compile_function(backbone, run)(ids, negative_ids, latents)
    return [np.asarray(keras.ops.convert_to_numpy(x), np.float64) for x in outputs]


def map_axes(layout_map, variable):
    layout = layout_map[variable.path]
    return tuple(layout.axes) if layout is not None else (None,) * len(variable.shape)


def real_shapes():
    """The real models (CLIP-L, CLIP-G, T5-XXL, the three MMDiTs; shapes only, no values) under meshes
    2x4, 4x2, 1x8: the variables whose layout differs from a fresh `get_layout_map(mesh)`'s entry, and the
    layouts of CLIP's 77-row position table and T5's 32,128-row vocabulary there."""
    from keras_sd3.models import SD3_MEDIUM, SD3_VAE, SD35_LARGE, SD35_MEDIUM, CLIPConfig, T5Config

    clip_g = CLIPConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        hidden_act="gelu", projection_dim=1280)
    results = {}
    for name, mmdit in (("sd3", SD3_MEDIUM), ("sd35_medium", SD35_MEDIUM), ("sd35_large", SD35_LARGE)):
        for shape in ((2, 4), (4, 2), (1, 8)):
            set_mesh(shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 38 heads over 4 or 8 devices: split by columns
                with keras.StatelessScope(initialize_variables=False):
                    backbone = StableDiffusion3Backbone(mmdit, SD3_VAE, CLIPConfig(), clip_g, T5Config(), dtype="bfloat16")
            fresh = StableDiffusion3Backbone.get_layout_map(keras.distribution.distribution().device_mesh)
            layouts = {v.path: tuple(v._layout.axes) for v in backbone.variables}
            results[f"{name} {shape[0]}x{shape[1]}"] = {
                "wrong": [f"{v.path}: {layouts[v.path]} != {map_axes(fresh, v)}" for v in backbone.variables
                          if layouts[v.path] != map_axes(fresh, v)],
                "clip_positions": layouts["clip_g/text_model/embeddings/position_embedding/weight"],
                "t5_vocabulary": layouts["t5/shared/weight"],
                "mmdit_positions": layouts["diffuser/pos_embed/pos_embed"],
            }
    set_mesh(None)
    return results


def shardings(backbone, layout_map):
    """(variables whose sharding differs from the layout map's, split variables whose per-device shard is
    not 1/model of them, number of split variables)."""
    wrong, uneven, split = [], [], 0
    model = dict(zip(layout_map.device_mesh.axis_names, layout_map.device_mesh.shape))["model"]
    for variable in backbone.variables:
        axes = map_axes(layout_map, variable)
        spec = tuple(variable.value.sharding.spec) + (None,) * (len(variable.shape) - len(variable.value.sharding.spec))
        if spec != axes:
            wrong.append(f"{variable.path}: {spec} != {axes}")
        if "model" in axes:
            split += 1
            if any(s.data.size * model != np.prod(variable.shape) for s in variable.value.addressable_shards):
                uneven.append(variable.path)
    return wrong, uneven, split


def model_parallel(root):
    eight_heads()
    rng = np.random.default_rng(0)
    results = {}
    for variant in sorted(conftest.VARIANTS):
        folder = os.path.join(root, variant)
        tiny_text.build_pipeline(folder, with_t5=True, variant=variant)
        preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset(folder)
        ids, negative_ids = preprocessor.generate_preprocess(PROMPTS), preprocessor.generate_preprocess(["", "blurry"])
        latents = rng.standard_normal((2, *conftest.LATENT_SHAPE)).astype("float32")
        set_mesh(None)
        expected = steps(StableDiffusion3Backbone.from_preset(folder, image_shape=conftest.IMAGE_SHAPE), ids,
                         negative_ids, latents)
        for shape in MESHES[variant]:
            set_mesh(shape)
            with HostToOneDevice() as host:
                backbone = StableDiffusion3Backbone.from_preset(folder, image_shape=conftest.IMAGE_SHAPE)
            wrong, uneven, split = shardings(backbone, keras.distribution.distribution()._layout_map)
            got = steps(backbone, ids, negative_ids, latents)
            names = ("positive", "negative", "positive_pooled", "negative_pooled", "denoise", "decode")
            results[f"{variant} {shape[0]}x{shape[1]}"] = {
                "relative_difference": {n: float(np.abs(g - e).max() / np.abs(e).max())
                                        for n, g, e in zip(names, got, expected)},
                "wrong_shardings": wrong, "uneven_shards": uneven, "split_variables": split,
                "bytes_host_to_one_device": host.bytes,
            }
    set_mesh(None)
    return results


def quantized_parallel(root):
    """The SD3 tiny model (written by `model_parallel`) loaded with quantize="int8" and "int4" on meshes 2x4
    and 1x8 against the same quantized model on one device, and its shardings against the layout map."""
    folder = os.path.join(root, "sd3")
    preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset(folder)
    ids, negative_ids = preprocessor.generate_preprocess(PROMPTS), preprocessor.generate_preprocess(["", "blurry"])
    latents = np.random.default_rng(1).standard_normal((2, *conftest.LATENT_SHAPE)).astype("float32")
    results = {}
    for mode in ("int8", "int4"):
        set_mesh(None)
        load = lambda: StableDiffusion3Backbone.from_preset(folder, image_shape=conftest.IMAGE_SHAPE, quantize=mode)  # noqa: E731
        expected = steps(load(), ids, negative_ids, latents)
        for shape in ((2, 4), (1, 8)):
            set_mesh(shape)
            backbone = load()
            wrong, uneven, _ = shardings(backbone, keras.distribution.distribution()._layout_map)
            got = steps(backbone, ids, negative_ids, latents)
            split = [v.path for v in backbone.variables if v.dtype == "int8" or v.path.endswith("/kernel_scale")]
            split = [p for p in split if "model" in map_axes(keras.distribution.distribution()._layout_map,
                                                            next(v for v in backbone.variables if v.path == p))]
            results[f"{mode} {shape[0]}x{shape[1]}"] = {
                "relative_difference": max(float(np.abs(g - e).max() / np.abs(e).max()) for g, e in zip(got, expected)),
                "wrong_shardings": wrong, "uneven_shards": uneven,
                "split_int_kernels": sum(1 for p in split if p.endswith("/kernel")),
                "split_scales": sum(1 for p in split if p.endswith("/kernel_scale")),
            }
    set_mesh(None)
    return results


def data_parallel():
    prompts = [f"a {c} {s} on a white background" for c in ("red", "blue") for s in ("circle", "square", "triangle", "star")]
    results = {}
    for split in (False, True):
        if split:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
        task = StableDiffusion3TextToImage.from_preset(EMBEDDED)
        images = task.generate(prompts, num_steps=4, seed=0)
        frames = explore.circular_walk(task, "a red circle on a blue background", 16, seed=1, num_steps=2)
        traces = task.compiled.traces
        task.generate(prompts[::-1], num_steps=3, seed=2)  # other prompts and steps: no new program
        controlled, seen = controlnet_images(task.backbone, task.preprocessor, prompts[:3])
        results[split] = (images.astype(int), frames.astype(int), task.compiled.traces - traces, controlled, seen)
    (images, frames, _, controlled, _), (split_images, split_frames, new_traces, split_controlled, seen) = (
        results[False], results[True])
    set_mesh(None)
    return {"images": int(np.abs(images - split_images).max()), "frames": int(np.abs(frames - split_frames).max()),
            "shapes": [list(split_images.shape), list(split_frames.shape)], "new_traces": new_traces,
            "controlnet": int(np.abs(controlled - split_controlled).max()), "controlnet_shape": list(split_controlled.shape),
            "controlnet_callback_batches": seen["callback"], "controlnet_split_batches": seen["split"],
            "controlnet_changes_images": int(np.abs(controlled[:3] - images[:3]).max())}


def controlnet_images(backbone, preprocessor, prompts):
    """Images of a random SD3.5-style ControlNet (2 blocks) on the embedded model, 3 prompts (padded to
    the 8 devices when split), and the batch sizes its step callback saw and that were split over devices."""
    config = backbone.mmdit_config
    net = SD3ControlNet(ControlNetConfig(
        num_layers=2, num_attention_heads=config.num_attention_heads, attention_head_dim=config.attention_head_dim,
        joint_attention_dim=None, pooled_projection_dim=config.pooled_projection_dim, use_pos_embed=False,
        force_zeros_for_pooled_projection=False))
    rng = np.random.default_rng(3)
    for variable in net.weights:
        variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))
    control = np.stack([*np.meshgrid(*[np.linspace(-1, 1, 64)] * 2), np.zeros((64, 64))], -1).astype("float32")
    seen, split, split_batch = [], [], distribution.split_batch
    distribution.split_batch = lambda x: split.append(tuple(x.shape)) or split_batch(x)  # what goes to the devices
    try:
        images = StableDiffusion3ControlNet(backbone, preprocessor, net).generate(
            {"prompts": prompts, "control_images": control}, num_steps=4, seed=0,
            callback=lambda step, steps, latents: seen.append(latents.shape[0]))
    finally:
        distribution.split_batch = split_batch
    return images.astype(int), {"callback": sorted(set(seen)), "split": sorted({s[0] for s in split})}


def bad_meshes():
    errors = {}
    mesh = keras.distribution.DeviceMesh((2, 4), ["data", "model"], keras.distribution.list_devices())
    try:
        StableDiffusion3Backbone.get_layout_map(mesh)
    except ValueError as error:
        errors["no batch axis"] = str(error)
    mesh = keras.distribution.DeviceMesh((1, 3), ["batch", "model"], keras.distribution.list_devices()[:3])
    layout_map = StableDiffusion3Backbone.get_layout_map(mesh)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    try:  # widths of 64 and 128 do not split in 3
        StableDiffusion3TextToImage.from_preset(EMBEDDED)
    except ValueError as error:
        errors["width"] = str(error)
    set_mesh(None)
    prompts = ["a red circle on a blue background", "a green square"]
    expected = StableDiffusion3TextToImage.from_preset(EMBEDDED).generate(prompts, num_steps=2, seed=0)
    set_mesh((2, 4))  # the embedded model's MMDiT has 2 heads (width 128): allowed, with a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = StableDiffusion3TextToImage.from_preset(EMBEDDED)
    errors["heads warning"] = [str(w.message) for w in caught if "attention heads" in str(w.message)]
    errors["heads split images"] = int(np.abs(task.generate(prompts, num_steps=2, seed=0).astype(int) - expected).max())
    set_mesh(None)
    return errors


if __name__ == "__main__":
    # (real_shapes last: its variables without values stay queued for Keras' deferred initialisation,
    # which the next StatelessScope would then run)
    print(json.dumps({"devices": len(jax.devices()), "model_parallel": model_parallel(sys.argv[1]),
                      "quantized_parallel": quantized_parallel(sys.argv[1]),
                      "data_parallel": data_parallel(), "errors": bad_meshes(), "real_shapes": real_shapes()}))
