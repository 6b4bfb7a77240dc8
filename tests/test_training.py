"""Training: the rectified-flow objective in closed form, losses equal to diffusers-computed ones, fit()
lowering them, the synthetic dataset and its analyser, and the diffusers-format export."""

import keras
import numpy as np
import pytest
import torch
from conftest import IMAGE_SHAPE, LATENT_SHAPE, TINY_MMDIT, reference_velocity, to_nchw
from tiny_text import build_pipeline

from keras_sd3.models import StableDiffusion3Backbone
from keras_sd3.training import evaluate, shapes, trainer
from keras_sd3.weights.export import save_diffusers_folder


def test_logit_normal_timesteps():
    t = trainer.logit_normal(np.random.default_rng(0), 20000)
    logits = np.log(t / (1 - t))
    assert 0 < t.min() and t.max() < 1
    assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1.0) < 0.03  # N(0, 1) in logit space


def test_rectified_flow_example_closed_form():
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 3, 4, 4, 2))
    x_t, velocity = trainer.rectified_flow_example(x0, noise, np.array([0.0, 1.0, 0.25]))
    np.testing.assert_allclose(x_t[0], x0[0])
    np.testing.assert_allclose(x_t[1], noise[1])
    np.testing.assert_allclose(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])
    np.testing.assert_allclose(velocity, noise - x0)


def test_flow_matching_batches_are_seeded_and_consistent():
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((10, *LATENT_SHAPE)).astype(np.float32)
    contexts, pooled = rng.standard_normal((3, 5, 8)), rng.standard_normal((3, 6))
    batches = trainer.FlowMatchingBatches(latents, contexts, pooled, [0, 1] * 5, 2, batch_size=400, steps=3, seed=4,
                                          caption_dropout=0.25)
    inputs, velocity = batches[1]
    again, _ = batches[1]
    np.testing.assert_array_equal(inputs["latents"], again["latents"])
    t = inputs["timestep"] / 1000.0
    x0 = inputs["latents"] - t[:, None, None, None] * velocity  # x_t = x0 + t v
    distances = np.abs(x0[:, None] - latents[None]).max(axis=(2, 3, 4))
    assert np.all(distances.min(axis=1) < 1e-4)  # every x0 is a training latent
    dropped = np.all(inputs["pooled"] == pooled[2], axis=1).mean()
    assert 0.18 < dropped < 0.32  # the empty caption about 25 % of the time


@pytest.mark.filterwarnings("error:Gradients do not exist")  # every trained weight is used
def test_fit_loss_is_the_diffusers_velocity_error_and_decreases(sd3_reference):
    folder, transformer, _ = sd3_reference
    backbone = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((4, *LATENT_SHAPE)).astype(np.float32)
    contexts = rng.standard_normal((2, 7, TINY_MMDIT["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((2, TINY_MMDIT["pooled_projection_dim"])).astype(np.float32)
    batches = trainer.FlowMatchingBatches(latents, contexts, pooled, [0, 0, 0, 0], 1, batch_size=4, steps=4, seed=0)
    inputs, velocity = batches[0]
    predicted = reference_velocity(transformer, inputs["latents"], inputs["context"], inputs["pooled"],
                                   inputs["timestep"])
    expected = np.mean((predicted - velocity) ** 2)
    trainer.freeze_all_but_mmdit(backbone)
    backbone.compile(loss="mse")
    loss = backbone.evaluate(inputs, velocity, verbose=0)
    assert abs(loss - expected) <= 1e-4 * expected  # the Keras loss is diffusers' velocity MSE
    history = trainer.train_mmdit(backbone, batches, learning_rate=3e-3, warmup=1, verbose=0)
    history = backbone.fit(batches, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * expected, (expected, losses)
    assert all(not v.trainable for v in backbone.vae.weights)


def test_vae_trainer_loss_matches_diffusers_and_decreases(sd3_reference):
    folder, _, vae = sd3_reference
    backbone = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE)
    images = np.random.default_rng(4).uniform(-1, 1, (2, *IMAGE_SHAPE)).astype(np.float32)
    model = trainer.VAETrainer(backbone.vae, kl_weight=0.01)
    model.compile(loss="mse")
    loss = model.evaluate(images, images, verbose=0)  # not training: the decoder sees the mean
    with torch.no_grad():
        posterior = vae.encode(to_nchw(images)).latent_dist
        recon = vae.decode(posterior.mean).sample.permute(0, 2, 3, 1).numpy()
        kl = float(posterior.kl().sum()) / posterior.mean.numel()  # diffusers sums; keras_sd3 averages
    expected = np.mean((recon - images) ** 2) + 0.01 * kl
    assert abs(loss - expected) <= 1e-4 * expected
    uint8 = ((images + 1) * 127.5).astype(np.uint8)
    history = trainer.train_vae(backbone.vae, uint8, steps=12, batch_size=2, learning_rate=2e-3, verbose=0)
    assert history.history["loss"][-1] < loss


def test_shapes_dataset_is_seeded_and_the_analyser_reads_it():
    images, captions, scenes = shapes.shapes_dataset(60, seed=3, size=64)
    again, captions_again, _ = shapes.shapes_dataset(60, seed=3, size=64)
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again and images.shape == (60, 64, 64, 3) and images.dtype == np.uint8
    assert {s.shape for s in scenes} == set(shapes.SHAPES)
    for caption, scene in zip(captions, scenes):
        assert caption.startswith("a ") and f"{scene.color} {scene.shape}" in caption
        assert caption.endswith(f"on a {scene.background} background")
    expected = [{"shape": s.shape, "color": s.color, "background": s.background} for s in scenes]
    result = evaluate.score(images, expected)
    assert result["color_accuracy"] == 1.0 and result["shape_accuracy"] == 1.0  # ground truth reads back
    blank = np.full((64, 64, 3), 245, np.uint8)
    assert evaluate.analyse(blank) == {"background": "white", "color": None, "shape": None}


def test_export_is_read_back_identically_by_diffusers_and_keras_sd3(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = build_pipeline(str(tmp_path / "source"), with_t5=False)
    backbone = StableDiffusion3Backbone.from_preset(str(tmp_path / "source"), image_shape=IMAGE_SHAPE)
    tokenizers = {"clip_l": str(tmp_path / "source" / "tokenizer"), "clip_g": str(tmp_path / "source" / "tokenizer_2")}
    save_diffusers_folder(backbone, str(tmp_path / "export"), tokenizers)
    absent = dict.fromkeys(("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"))
    exported = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "export"), **absent)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        original, written = getattr(pipe, name).state_dict(), getattr(exported, name).state_dict()
        for key, value in original.items():
            if key.endswith("position_ids"):
                continue
            assert torch.equal(written[key], value), f"{name}.{key} changed in the export"
    reloaded = StableDiffusion3Backbone.from_preset(str(tmp_path / "export"), image_shape=IMAGE_SHAPE)
    assert reloaded.t5_zero_tokens == backbone.t5_zero_tokens
    for old, new in zip(backbone.weights, reloaded.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(old), keras.ops.convert_to_numpy(new))


def test_fresh_position_table_is_diffusers_sincos():
    from diffusers import SD3Transformer2DModel

    from keras_sd3.models.config import MMDiTConfig
    from keras_sd3.models.mmdit import MMDiT

    config = dict(TINY_MMDIT, num_layers=1)
    reference = SD3Transformer2DModel(**config).pos_embed.pos_embed.detach().numpy()
    ours = keras.ops.convert_to_numpy(MMDiT(MMDiTConfig(**config)).pos_embed.pos_embed)
    np.testing.assert_allclose(ours, reference, atol=1e-6)


@pytest.mark.parametrize("size", [32])
def test_render_draws_the_named_shape(size):
    scene = shapes.ShapeScene("triangle", "red", "blue", "big", "in the center", (0.5, 0.5), 0.6, True)
    image = shapes.render(scene, size)
    assert tuple(image[size // 2, size // 2]) == shapes.COLORS["red"]
    assert tuple(image[1, 1]) == shapes.COLORS["blue"]
    assert evaluate.analyse(image)["shape"] == "triangle"


@pytest.mark.filterwarnings("error:Gradients do not exist")  # every trained weight is used
def test_lora_fine_tuning_trains_only_the_adapters_and_exports_merged(sd3_reference, tmp_path):
    folder, _, _ = sd3_reference
    backbone = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE)
    kernel = backbone.diffuser.transformer_blocks[0].attn.to_q._kernel
    before = keras.ops.convert_to_numpy(kernel).copy()
    # The last block has no context output (no to_add_out) and does not use its context queries (add_q_proj).
    assert trainer.enable_lora(backbone, rank=2) == 3 * 8 - 2
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((4, *LATENT_SHAPE)).astype(np.float32)
    contexts = rng.standard_normal((1, 7, TINY_MMDIT["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((1, TINY_MMDIT["pooled_projection_dim"])).astype(np.float32)
    batches = trainer.FlowMatchingBatches(latents, contexts, pooled, [0] * 4, 0, batch_size=4, steps=3, seed=0)
    trainer.train_mmdit(backbone, batches, learning_rate=1e-2, warmup=1, verbose=0)
    trained = {v.path for v in backbone.trainable_variables}
    assert len(trained) == 2 * 22 and all("lora_kernel" in path for path in trained)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernel), before)  # the base kernel is frozen
    merged = keras.ops.convert_to_numpy(backbone.diffuser.transformer_blocks[0].attn.to_q.kernel)
    assert np.abs(merged - before).max() > 0  # the adapter changed the effective kernel
