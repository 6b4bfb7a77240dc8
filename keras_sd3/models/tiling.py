"""The VAE on overlapping tiles, as diffusers' `AutoencoderKL.enable_tiling()`: big pictures in small memory.

A picture larger than one tile is cut into tiles of `tile_sample_size` pixels (`tile_sample_size / f`
latents, f the VAE's factor 8) whose starts are `tile * (1 - overlap)` apart; the last tiles of a row
or column are cut short by the picture's edge (so a side has at most three tile sizes: the full one
and up to two edge ones). Each tile is encoded or decoded alone, then blended linearly with its upper
and left neighbours (already blended themselves) over `overlap` of the output tile, and its first
`(1 - overlap)` part kept: the order and arithmetic of diffusers' `tiled_decode` / `_tiled_encode`, so
that for the same tile size the pictures equal diffusers' tiled ones. Only one row of tiles is held
at a time.

The work per tile is a function of its shape: called outside a compiled program, each tile shape
gets one compiled program (`tile_program`); inside one (a caller tracing the whole decode), the tiles
are traced in line.
"""

import dataclasses

from keras import ops

from keras_sd3 import backend


@dataclasses.dataclass(frozen=True)
class VAETiling:
    """Tile size in pixels (a multiple of the VAE's factor) and the fraction of a tile that overlaps
    the next; diffusers' `tile_sample_min_size` and `tile_overlap_factor`."""

    tile_sample_size: int = 512
    overlap: float = 0.25

    def check(self, factor):
        """Raises ValueError unless the tile is a positive multiple of `factor` and 0 <= overlap < 1."""
        size = self.tile_sample_size
        if isinstance(size, bool) or not isinstance(size, int) or size < factor or size % factor:
            raise ValueError(f"tile_sample_size must be a positive multiple of the VAE's factor {factor} "
                             f"(e.g. 512), got {size!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)) or not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be a fraction in [0, 1) (e.g. 0.25), got {self.overlap!r}")

    def plan(self, factor, decode):
        """`(input tile, input step, output blend width, output kept)` for decoding (latents in) or
        encoding (pixels in), as diffusers computes them."""
        sample, latent = self.tile_sample_size, self.tile_sample_size // factor
        tile_in, tile_out = (latent, sample) if decode else (sample, latent)
        blend = int(tile_out * self.overlap)
        return tile_in, int(tile_in * (1 - self.overlap)), blend, tile_out - blend


def _ramp(length, axis):
    shape = [1, 1, 1, 1]
    shape[axis] = length
    return ops.reshape(ops.arange(length, dtype="float32") / float(length), shape)


def _blend(previous, tile, extent, axis):
    """`tile` with its first `extent` rows (axis 1) or columns (axis 2) faded in from `previous`'s last."""
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    tail = _take(previous, previous.shape[axis] - extent, previous.shape[axis], axis)
    head, rest = _take(tile, 0, extent, axis), _take(tile, extent, tile.shape[axis], axis)
    weight = _ramp(extent, axis)
    return ops.concatenate([tail * (1.0 - weight) + head * weight, rest], axis=axis)


def _take(x, start, stop, axis):
    index = [slice(None)] * 4
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def tiled(function, x, tiling, factor, decode):
    """`function` (a (B, h, w, C) -> (B, h', w', C') map: the VAE's decode or encode) over the tiles of
    `x` (B, H, W, C), blended as diffusers does. Returns float32."""
    tile, step, extent, keep = tiling.plan(factor, decode)
    height, width = x.shape[1], x.shape[2]
    rows, above = [], None
    for i in range(0, height, step):
        row = []
        for j in range(0, width, step):
            out = ops.cast(function(x[:, i : i + tile, j : j + tile]), "float32")
            if above is not None:
                out = _blend(above[len(row)], out, extent, 1)
            if row:
                out = _blend(row[-1], out, extent, 2)
            row.append(out)
        rows.append(ops.concatenate([_take(t, 0, keep, 1)[:, :, :keep] for t in row], axis=2))
        above = row
    return ops.concatenate(rows, axis=1)


def needs_tiles(tiling, shape, factor, decode):
    """Whether a (B, H, W, C) input is larger than one tile (else the plain path is taken)."""
    if tiling is None:
        return False
    limit = tiling.tile_sample_size // factor if decode else tiling.tile_sample_size
    return shape[1] > limit or shape[2] > limit


class VAETilingMethods:
    """The backbone's tiling API (`StableDiffusion3Backbone` mixes it in): its `vae`, `vae_config` and
    `compute_dtype` are read."""

    vae_tiling = None  # a `VAETiling` while tiling is on
    def enable_vae_tiling(self, tile_sample_size=512, overlap=0.25):
        """Encodes and decodes pictures larger than `tile_sample_size` pixels on overlapping tiles, as
        diffusers' `vae.enable_tiling()` (`keras_sd3.models.tiling`; diffusers' own tile for SD3's VAE
        is its `sample_size`, 1024: pass 1024 for its pictures). Raises ValueError for a tile that is
        not a positive multiple of the VAE's factor (8) or an overlap outside [0, 1)."""
        tiling = VAETiling(tile_sample_size, overlap)
        tiling.check(self.vae_config.downsample_factor)
        self.vae_tiling, self._tile_programs = tiling, {}

    def disable_vae_tiling(self):
        """Back to encoding and decoding whole pictures."""
        self.vae_tiling = None

    def uses_vae_tiles(self, shape, decode=True):
        """Whether `decode_step` (or `encode_image_step`, `decode=False`) of a (B, H, W, C) input of
        `shape` works on tiles: tiling is on and the input is larger than one tile."""
        return needs_tiles(self.vae_tiling, shape, self.vae_config.downsample_factor, decode)

    def _vae(self, kind, x):
        """The VAE's `kind` ("decode" / "encode") of unscaled `x`, float32; on tiles where they apply."""
        run = lambda t: getattr(self.vae, kind)(ops.cast(t, self.compute_dtype))  # noqa: E731
        decode = kind == "decode"
        if not self.uses_vae_tiles(tuple(x.shape), decode):
            return ops.cast(run(x), "float32")
        if not backend.is_traced(x):  # one compiled program per tile shape
            if kind not in self._tile_programs:
                self._tile_programs[kind] = backend.compile_function(self.vae, run)
            run = self._tile_programs[kind]
        return tiled(run, x, self.vae_tiling, self.vae_config.downsample_factor, decode)
