"""The SD3 VAE (diffusers `AutoencoderKL` with 16 latent channels), channels-last.

Attribute names follow the diffusers state dict (`encoder.down_blocks.0.resnets.1.conv2`, ...).
"""

import keras
from keras import ops

from keras_sd3.backend import upsample_conv
from keras_sd3.models.layers import Attention, GroupNorm, Layer, conv

# The VAE is replicated by `keras_sd3.distribution` (84 M parameters: 168 MB in bfloat16 on every device;
# splitting its convolutions' channels would gather full-resolution feature maps at every layer).
LAYOUT = ()


class ResnetBlock(Layer):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> conv3x3, plus a (1x1-projected) residual."""

    def __init__(self, in_channels, out_channels, groups, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.norm1 = GroupNorm(in_channels, groups, dtype=policy)
        self.conv1 = conv(out_channels, in_channels, 3, policy)
        self.norm2 = GroupNorm(out_channels, groups, dtype=policy)
        self.conv2 = conv(out_channels, out_channels, 3, policy)
        self.conv_shortcut = conv(out_channels, in_channels, 1, policy) if in_channels != out_channels else None
        self.built = True

    def call(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(Layer):
    """Pad right and bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.conv = conv(channels, channels, 3, self.dtype_policy, strides=2, padding="valid")
        self.built = True

    def call(self, x):
        return self.conv(ops.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(Layer):
    """Nearest-neighbour x2, then a 3x3 conv (computed on the small map: `backend.upsample_conv`)."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.conv = conv(channels, channels, 3, self.dtype_policy)
        self.built = True

    def call(self, x):
        return upsample_conv(x, self.conv.kernel, self.conv.bias)


class SpatialAttention(Attention):
    """Single-head self-attention over all pixels, with GroupNorm in front and a residual."""

    def __init__(self, channels, groups, **kwargs):
        super().__init__(channels, 1, channels, **kwargs)
        self.group_norm = GroupNorm(channels, groups, dtype=self.dtype_policy)

    def call(self, x):
        _, height, width, channels = ops.shape(x)
        tokens = ops.reshape(self.group_norm(x), (-1, height * width, channels))
        out, _ = super().call(tokens)
        return x + ops.reshape(out, (-1, height, width, channels))


class MidBlock(Layer):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels, groups, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.resnets = [ResnetBlock(channels, channels, groups, dtype=policy) for _ in range(2)]
        self.attentions = [SpatialAttention(channels, groups, dtype=policy)]
        self.built = True

    def call(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class ResolutionBlock(Layer):
    """A stack of resnets, then an optional resampler (`downsamplers` or `upsamplers` in the checkpoint)."""

    def __init__(self, in_channels, out_channels, num_resnets, groups, resample=None, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        channels = [in_channels] + [out_channels] * num_resnets
        self.resnets = [ResnetBlock(channels[i], channels[i + 1], groups, dtype=policy) for i in range(num_resnets)]
        if resample == "down":
            self.downsamplers = [Downsample(out_channels, dtype=policy)]
        elif resample == "up":
            self.upsamplers = [Upsample(out_channels, dtype=policy)]
        self.built = True

    def call(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for resampler in getattr(self, "downsamplers", []) + getattr(self, "upsamplers", []):
            x = resampler(x)
        return x


class Encoder(Layer):
    """Image (B, H, W, 3) -> (B, H/f, W/f, 2 * latent_channels) moments (mean ‖ logvar)."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        policy, groups, chans = self.dtype_policy, config.norm_num_groups, config.block_out_channels
        self.conv_in = conv(chans[0], config.in_channels, 3, policy)
        self.down_blocks = [
            ResolutionBlock(
                chans[max(i - 1, 0)], chans[i], config.layers_per_block, groups,
                "down" if i < len(chans) - 1 else None, dtype=policy,
            )
            for i in range(len(chans))
        ]
        self.mid_block = MidBlock(chans[-1], groups, dtype=policy)
        self.conv_norm_out = GroupNorm(chans[-1], groups, dtype=policy)
        self.conv_out = conv(2 * config.latent_channels, chans[-1], 3, policy)
        self.built = True

    def call(self, images):
        x = self.conv_in(images)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))


class Decoder(Layer):
    """Latents (B, h, w, latent_channels) -> image (B, f*h, f*w, 3) in about [-1, 1]."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        policy, groups = self.dtype_policy, config.norm_num_groups
        chans = tuple(reversed(config.block_out_channels))
        self.conv_in = conv(chans[0], config.latent_channels, 3, policy)
        self.mid_block = MidBlock(chans[0], groups, dtype=policy)
        self.up_blocks = [
            ResolutionBlock(
                chans[max(i - 1, 0)], chans[i], config.layers_per_block + 1, groups,
                "up" if i < len(chans) - 1 else None, dtype=policy,
            )
            for i in range(len(chans))
        ]
        self.conv_norm_out = GroupNorm(chans[-1], groups, dtype=policy)
        self.conv_out = conv(config.out_channels, chans[-1], 3, policy)
        self.built = True

    def call(self, latents):
        x = self.mid_block(self.conv_in(latents))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))


class VAE(Layer):
    """The SD3 autoencoder; `encode` returns the posterior mean, `decode` the image.

    The latent shift / scale of SD3 is applied by the backbone's steps, not here.
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.encoder = Encoder(config, dtype=self.dtype_policy)
        self.decoder = Decoder(config, dtype=self.dtype_policy)
        self.built = True

    def encode(self, images):
        """(B, H, W, 3) images in [-1, 1] -> (B, H/f, W/f, latent_channels) posterior mean."""
        moments = self.encoder(images)
        return moments[..., : self.config.latent_channels]

    def decode(self, latents):
        """(B, h, w, latent_channels) unscaled latents -> (B, f*h, f*w, 3) images."""
        return self.decoder(latents)

    def call(self, images):
        return self.decode(self.encode(images))
