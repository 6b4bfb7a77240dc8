"""Guidance: classifier-free guidance and SD3.5's skip-layer guidance, as pure functions."""

import dataclasses

from keras import ops


def classifier_free_guidance(positive, negative, guidance_scale):
    """`negative + g * (positive - negative)`, in float32."""
    positive, negative = ops.cast(positive, "float32"), ops.cast(negative, "float32")
    return negative + ops.cast(guidance_scale, "float32") * (positive - negative)


@dataclasses.dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (SD3.5): `v = v_cfg + scale * (v_positive - v_skip)` at steps
    `num_steps * start < step < num_steps * stop`, where `v_skip` is the positive velocity with the
    blocks `layers` skipped. Defaults are diffusers' (for SD3.5 Medium).
    """

    layers: tuple = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if not 0.0 <= self.start <= self.stop <= 1.0:
            raise ValueError(f"Need 0 <= start <= stop <= 1 for skip-layer guidance, got {self.start}, {self.stop}.")

    def is_active(self, step, num_steps):
        """Boolean scalar: whether `step` of `num_steps` gets the extra pass."""
        step, num_steps = ops.cast(step, "float32"), ops.cast(num_steps, "float32")
        return ops.logical_and(step > num_steps * self.start, step < num_steps * self.stop)

    def apply(self, guided, positive, skipped):
        """The guided velocity plus the skip-layer term, in float32."""
        return guided + self.scale * (ops.cast(positive, "float32") - ops.cast(skipped, "float32"))
