"""Architecture configs for the MMDiT and the VAE, with the three real SD3 / SD3.5 variants."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Hyper-parameters of the SD3 MMDiT (diffusers' `SD3Transformer2DModel` config names).

    Attributes:
        num_layers: number of joint blocks.
        num_attention_heads: heads; hidden size is `num_attention_heads * attention_head_dim`.
        attention_head_dim: size of one head.
        patch_size: latent patch size.
        in_channels, out_channels: latent channels.
        joint_attention_dim: width of the text context fed to `context_embedder`.
        caption_projection_dim: width after `context_embedder` (equals the hidden size).
        pooled_projection_dim: width of the pooled text embedding.
        pos_embed_max_size: side P of the stored P x P position table.
        qk_norm: RMS-normalise queries and keys (SD3.5).
        dual_attention_layers: blocks with an extra image-only attention (SD3.5 Medium, MMDiT-X).
        sample_size: native latent size (128 latents = 1024 px), the default image size.
    """

    num_layers: int = 24
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 192
    qk_norm: bool = False
    dual_attention_layers: tuple = ()
    sample_size: int = 128

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.caption_projection_dim != self.hidden_size:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({self.hidden_size})."
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are outside [0, {self.num_layers}).")

    @property
    def hidden_size(self):
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config):
        """Builds a config from a diffusers `transformer/config.json` dict."""
        qk_norm = config.get("qk_norm")
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"Unsupported qk_norm {qk_norm!r}; expected None or 'rms_norm'.")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "qk_norm"]
        values = {name: config[name] for name in names if config.get(name) is not None}
        return cls(qk_norm=qk_norm == "rms_norm", **values)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of the SD3 AutoencoderKL (diffusers config names).

    Attributes:
        block_out_channels: channels of each resolution level (encoder order).
        layers_per_block: resnets per encoder level (the decoder has one more).
        latent_channels: latent channels (16 for SD3).
        norm_num_groups: GroupNorm groups.
        in_channels, out_channels: image channels.
        scaling_factor, shift_factor: `z = (mean - shift) * scale` for the diffusion model.
    """

    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}.")

    @property
    def downsample_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config):
        """Builds a config from a diffusers `vae/config.json` dict."""
        for flag in ("use_quant_conv", "use_post_quant_conv"):
            if config.get(flag):
                raise ValueError(f"SD3 VAEs have no quant convs, but this config sets {flag}=True.")
        if config.get("mid_block_add_attention") is False:
            raise ValueError("SD3 VAEs have mid-block attention, but this config disables it.")
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: config[name] for name in names if config.get(name) is not None})


SD3_MEDIUM = MMDiTConfig()
SD35_MEDIUM = MMDiTConfig(pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13)))
SD35_LARGE = MMDiTConfig(
    num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm=True
)
SD3_VAE = VAEConfig()
