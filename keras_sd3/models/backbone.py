"""`StableDiffusion3Backbone`: the MMDiT and the VAE behind KerasHub's step API.

Every task is a loop over these steps, and each step works eagerly, inside `keras.ops.fori_loop`, and
under `jax.jit` with a `keras.StatelessScope` (step counts and guidance may be traced tensors).
"""

import dataclasses

import keras
from keras import ops

from keras_sd3 import sampling
from keras_sd3.models.config import MMDiTConfig, VAEConfig
from keras_sd3.models.mmdit import MMDiT
from keras_sd3.models.vae import VAE
from keras_sd3.weights import load_layer_weights, open_checkpoint


def _check_image_shape(image_shape, mmdit_config, vae_config):
    height, width, channels = image_shape
    multiple = vae_config.downsample_factor * mmdit_config.patch_size
    limit = multiple * mmdit_config.pos_embed_max_size
    if channels != 3 or height % multiple or width % multiple or height > limit or width > limit:
        raise ValueError(
            f"image_shape {tuple(image_shape)} is not supported by this model: expected (H, W, 3) "
            f"with H and W multiples of {multiple} and at most {limit}."
        )


class StableDiffusion3Backbone(keras.Model):
    """The SD3 / SD3.5 diffusion model (`diffuser`) and autoencoder (`vae`).

    Args:
        mmdit_config: an `MMDiTConfig` (or its dict).
        vae_config: a `VAEConfig` (or its dict).
        image_shape: `(height, width, 3)` of generated images.
        dtype: Keras dtype or policy, e.g. "float32", "bfloat16", "float16", "mixed_bfloat16".
            Norms, softmax and the sampler always run in float32.

    Example:
        >>> backbone = StableDiffusion3Backbone.from_preset("path/to/sd3-diffusers", image_shape=(512, 512, 3))
        >>> latents = backbone.denoise_step(latents, embeddings, step, num_steps, guidance_scale=7.0)
    """

    def __init__(self, mmdit_config, vae_config, image_shape=(1024, 1024, 3), dtype=None, **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        if isinstance(mmdit_config, dict):
            mmdit_config = MMDiTConfig(**mmdit_config)
        if isinstance(vae_config, dict):
            vae_config = VAEConfig(**vae_config)
        _check_image_shape(image_shape, mmdit_config, vae_config)
        self.mmdit_config, self.vae_config = mmdit_config, vae_config
        self.image_shape = tuple(image_shape)
        self.diffuser = MMDiT(mmdit_config, dtype=self.dtype_policy, name="diffuser")
        self.vae = VAE(vae_config, dtype=self.dtype_policy, name="vae")
        self.built = True

    @classmethod
    def from_preset(cls, source, image_shape=(1024, 1024, 3), dtype=None):
        """Builds the backbone and loads its weights from a diffusers folder or a single `.safetensors` file.

        Raises:
            CheckpointError: the source is not an SD3 checkpoint, or a tensor is missing, unexpected
                or mis-shaped (the message names it).
        """
        checkpoint = open_checkpoint(source)
        backbone = cls(checkpoint.mmdit_config, checkpoint.vae_config, image_shape=image_shape, dtype=dtype)
        load_layer_weights(backbone.diffuser, checkpoint.mmdit, f"MMDiT of {checkpoint.path}")
        load_layer_weights(backbone.vae, checkpoint.vae, f"VAE of {checkpoint.path}")
        return backbone

    @property
    def latent_shape(self):
        """`(H / f, W / f, latent_channels)` of the latents for `image_shape`."""
        factor = self.vae_config.downsample_factor
        return (self.image_shape[0] // factor, self.image_shape[1] // factor, self.vae_config.latent_channels)

    def get_config(self):
        return {
            "mmdit_config": dataclasses.asdict(self.mmdit_config),
            "vae_config": dataclasses.asdict(self.vae_config),
            "image_shape": self.image_shape,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "name": self.name,
        }

    def call(self, inputs):
        """Velocity for `{"latents", "context", "pooled", "timestep"}` (all batched)."""
        return self.diffuser(inputs["latents"], inputs["context"], inputs["pooled"], inputs["timestep"])

    def predict_velocity(self, latents, context, pooled, sigma, skip_layers=()):
        """MMDiT velocity (float32) at noise level `sigma` (a scalar) for a batch of latents."""
        timestep = ops.broadcast_to(sampling.sigma_to_timestep(sigma), ops.shape(latents)[:1])
        dtype = self.compute_dtype
        velocity = self.diffuser(
            ops.cast(latents, dtype), ops.cast(context, dtype), ops.cast(pooled, dtype), timestep, skip_layers=skip_layers
        )
        return ops.cast(velocity, "float32")

    def encode_image_step(self, images):
        """(B, H, W, 3) images in [-1, 1] -> scaled latents `(mean - shift) * scale`, float32."""
        mean = ops.cast(self.vae.encode(ops.cast(images, self.compute_dtype)), "float32")
        return (mean - self.vae_config.shift_factor) * self.vae_config.scaling_factor

    def add_noise_step(self, latents, noises, step, num_steps):
        """Latents noised to the level before `step` of `num_steps` (image-to-image start)."""
        return sampling.add_noise(latents, noises, sampling.sigma(step, num_steps))

    def denoise_step(self, latents, embeddings, step, num_steps, guidance_scale=None):
        """One Euler step from `step` to `step + 1` of `num_steps`.

        Args:
            latents: (B, h, w, C) latents.
            embeddings: `(positive, negative, positive_pooled, negative_pooled)` from `encode_text_step`.
            step, num_steps: ints or int tensors.
            guidance_scale: None for no classifier-free guidance (only the positive pair is used),
                else a float or scalar tensor `g` giving `v = v_neg + g * (v_pos - v_neg)`.

        Returns:
            float32 latents after the step.
        """
        positive, negative, positive_pooled, negative_pooled = embeddings
        sigma_now = sampling.sigma(step, num_steps)
        sigma_next = sampling.sigma(ops.add(step, 1), num_steps)
        if guidance_scale is None:
            velocity = self.predict_velocity(latents, positive, positive_pooled, sigma_now)
        else:
            velocity = self.predict_velocity(
                ops.concatenate([latents, latents], axis=0),
                ops.concatenate([positive, negative], axis=0),
                ops.concatenate([positive_pooled, negative_pooled], axis=0),
                sigma_now,
            )
            v_positive, v_negative = ops.split(velocity, 2, axis=0)
            velocity = sampling.classifier_free_guidance(v_positive, v_negative, guidance_scale)
        return sampling.euler_step(latents, velocity, sigma_now, sigma_next)

    def decode_step(self, latents):
        """Scaled latents -> (B, H, W, 3) float32 images in about [-1, 1] (not clipped)."""
        latents = ops.cast(latents, "float32") / self.vae_config.scaling_factor + self.vae_config.shift_factor
        return ops.cast(self.vae.decode(ops.cast(latents, self.compute_dtype)), "float32")
