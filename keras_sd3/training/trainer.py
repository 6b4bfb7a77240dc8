"""Training with Keras' `fit()`: the VAE (reconstruction + KL) and the MMDiT (rectified flow, SD3 paper).

Both are plain Keras models trained by `fit()` on any backend: all randomness of the objective
(noise, timesteps, caption dropout) is drawn by the NumPy data pipeline, so the model side is a
standard loss on (inputs, target) pairs and needs no backend-specific training step.

Rectified flow (Esser et al., 2024): for clean scaled latents x0 and noise e ~ N(0, I), the model
sees `x_t = (1 - t) x0 + t e` at timestep `1000 t` and regresses the velocity `v = e - x0`;
`t = sigmoid(n)`, `n ~ N(mean, std)` (logit-normal, mean 0 and std 1 in the paper).
"""

import keras
import numpy as np
from keras import ops

from keras_sd3.models.layers import Attention
from keras_sd3.sampling.flow_match import NUM_TRAIN_TIMESTEPS
from keras_sd3.tasks.task import from_uint8


def logit_normal(rng, count, mean=0.0, std=1.0):
    """`count` timesteps in (0, 1): sigmoid of N(mean, std) draws."""
    return 1.0 / (1.0 + np.exp(-(mean + std * rng.standard_normal(count))))


def rectified_flow_example(x0, noise, t):
    """-> (x_t, target velocity) for clean latents `x0` (B, ...), noise of the same shape, t (B,)."""
    t = t.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1.0 - t) * x0 + t * noise, noise - x0


class FlowMatchingBatches(keras.utils.PyDataset):
    """Batches of `({"latents", "context", "pooled", "timestep"}, velocity)` for `backbone.fit`.

    Args:
        latents: (N, h, w, C) scaled clean latents (`encode_image_step` of the training images).
        contexts, pooled: text embeddings of each distinct caption, (K, T, D) and (K, P).
        caption_ids: (N,) index of each image's caption in `contexts`.
        empty_id: index of the empty prompt's embeddings (used with probability `caption_dropout`,
            which teaches the unconditional velocity that classifier-free guidance needs).
        batch_size, steps: batch size and number of batches (one epoch).
        seed: batch `i` is drawn from `(seed, i)`, whatever the order or number of workers.
    """

    def __init__(self, latents, contexts, pooled, caption_ids, empty_id, batch_size, steps, seed=0,
                 caption_dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.latents, self.contexts, self.pooled = latents, contexts, pooled
        self.caption_ids, self.empty_id = np.asarray(caption_ids), empty_id
        self.batch_size, self.steps, self.seed, self.caption_dropout = batch_size, steps, seed, caption_dropout

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, index))
        rows = rng.integers(0, len(self.latents), self.batch_size)
        x0 = self.latents[rows]
        t = logit_normal(rng, self.batch_size)
        x_t, velocity = rectified_flow_example(x0, rng.standard_normal(x0.shape), t)
        captions = np.where(rng.random(self.batch_size) < self.caption_dropout, self.empty_id, self.caption_ids[rows])
        inputs = {
            "latents": x_t.astype(np.float32),
            "context": self.contexts[captions],
            "pooled": self.pooled[captions],
            "timestep": (NUM_TRAIN_TIMESTEPS * t).astype(np.float32),
        }
        return inputs, velocity.astype(np.float32)


def freeze_all_but_mmdit(backbone):
    """The VAE and text encoders are frozen (the SD3 recipe); the MMDiT's own flags are left as they
    are (all trainable, or only the adapters after `enable_lora`)."""
    for name in ("vae", "clip_l", "clip_g", "t5"):
        if getattr(backbone, name, None) is not None:
            getattr(backbone, name).trainable = False


def enable_lora(backbone, rank=4, targets=("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out")):
    """Fine-tunes only low-rank adapters: Keras' `Dense.enable_lora(rank)` on the MMDiT's attention
    projections named in `targets`; every other MMDiT weight is frozen, so `train_mmdit` then trains
    the adapters alone. Exporting (`save_diffusers_folder`) writes the merged kernels.

    Returns:
        The number of layers given an adapter.
    """
    count = 0
    for layer in backbone.diffuser._flatten_layers():
        if not isinstance(layer, Attention):
            continue
        for name in targets:
            value = getattr(layer, name, None)
            for dense in value if isinstance(value, list) else [value]:
                if isinstance(dense, keras.layers.Dense) and dense.trainable:  # (not the unused last add_q_proj)
                    dense.enable_lora(rank)
                    count += 1
    for variable in backbone.diffuser.weights:
        variable.trainable = "lora_kernel" in variable.path
    return count


def cosine_schedule(learning_rate, steps, warmup):
    return keras.optimizers.schedules.CosineDecay(
        0.0, max(steps - warmup, 1), alpha=0.05, warmup_target=learning_rate, warmup_steps=warmup
    )


def train_mmdit(backbone, batches, learning_rate=1e-3, warmup=100, verbose=2, callbacks=None):
    """Trains `backbone.diffuser` on `FlowMatchingBatches` with AdamW and a warm-up cosine schedule.

    Returns:
        The Keras `History` (`history.history["loss"]`: the mean squared velocity error).
    """
    freeze_all_but_mmdit(backbone)
    optimizer = keras.optimizers.AdamW(cosine_schedule(learning_rate, len(batches), warmup), weight_decay=0.0,
                                       clipnorm=1.0)
    backbone.compile(optimizer=optimizer, loss="mse")
    return backbone.fit(batches, epochs=1, verbose=verbose, callbacks=callbacks)


class VAETrainer(keras.Model):
    """The VAE as a `keras.Model` for `fit(images, images)`: MSE reconstruction + `kl_weight` x KL.

    The encoder's moments are split into mean and log-variance; the decoder sees a sample
    `mean + exp(logvar / 2) * e`; the KL to N(0, I) is averaged over latent elements.
    """

    def __init__(self, vae, kl_weight=1e-4, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.vae, self.kl_weight = vae, kl_weight
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        moments = self.vae.encoder(images)
        mean, logvar = ops.split(moments, 2, axis=-1)
        logvar = ops.clip(logvar, -30.0, 20.0)
        latents = mean
        if training:
            latents = mean + ops.exp(0.5 * logvar) * keras.random.normal(ops.shape(mean), seed=self.seed_generator)
        kl = 0.5 * ops.mean(ops.square(mean) + ops.exp(logvar) - 1.0 - logvar)
        self.add_loss(self.kl_weight * kl)
        return self.vae.decoder(latents)


def train_vae(vae, images, steps, batch_size=16, learning_rate=1e-3, kl_weight=1e-4, seed=0, verbose=2):
    """Trains `vae` on uint8 images (N, H, W, 3) for `steps` batches.

    Returns:
        The Keras `History`.
    """
    data = from_uint8(images)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(data), steps * batch_size)
    trainer = VAETrainer(vae, kl_weight, seed)
    optimizer = keras.optimizers.Adam(cosine_schedule(learning_rate, steps, min(100, steps // 10)), clipnorm=1.0)
    trainer.compile(optimizer=optimizer, loss="mse")
    return trainer.fit(data[rows], data[rows], batch_size=batch_size, epochs=1, shuffle=False, verbose=verbose)


def encode_in_batches(encode, images, batch_size=64):
    """`encode` (e.g. `backbone.encode_image_step`) over uint8 images (N, H, W, 3), `batch_size` at a time -> numpy."""
    data = from_uint8(images)
    return np.concatenate([ops.convert_to_numpy(encode(data[i : i + batch_size])) for i in range(0, len(data), batch_size)])


def latent_statistics(backbone, images):
    """(shift, scale) making the VAE posterior means of `images` zero-mean and unit-variance (SD3's factors)."""
    means = encode_in_batches(backbone.vae.encode, images)
    return float(means.mean()), float(1.0 / means.std())
