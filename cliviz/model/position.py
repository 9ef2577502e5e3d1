"""Where each visual-memory token sits in the image: the AGF read's fixed 2-D sin-cos position code.

The read is a softmax-weighted average of values; without a position code in its keys and values
it can find an object (attend to its patches) but not say *where* it is — measured on
cli-staged-tiny, position and relation questions were answered by one constant word, at ln 2 loss.
Adding a parameter-free code of each memory token's place before the key/value projection lets
the same read report it (docs/design.md §1).

Coordinates are patch centres normalised to [0, 1] over the image, so one formula covers every
tower: the tiny CLIP's 8 x 8 grid, CLIP-L/14-336's 24 x 24, SigLIP's 27 x 27, and LLaVA-OneVision's
anyres memory (the base crop's grid, then every high-resolution crop at its place in the full
image; unpadded; newline tokens get no code). A memory row without a place (a CLS token, a newline,
padding) carries NaN coordinates and gets a zero code.
"""

from __future__ import annotations

import torch


def sincos_code(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """`coords [..., 2]` (row, column in [0, 1]; NaN: no place) -> `[..., dim]`.

    Half the channels encode the row, half the column, each as sin/cos pairs at `dim/4`
    frequencies (MAE's code on a continuous grid). Every channel has amplitude 1, the scale of the
    LayerNorm-ed features a projector emits; rows without a place are zero.
    """
    quarter = dim // 4
    if quarter < 1:
        raise ValueError(f"a 2-D sin-cos code needs at least 4 channels, got {dim}")
    # Wavelengths from 2 (the whole image, monotonic) down to 1/16 of it (neighbouring patches of a
    # 27 x 27 grid differ), log-spaced.
    steps = torch.arange(quarter, dtype=torch.float32, device=coords.device) / max(quarter - 1, 1)  # [dim/4]
    freqs = torch.pi * 32.0**steps  # [dim/4]
    missing = torch.isnan(coords).any(-1, keepdim=True)  # [..., 1]
    xy = torch.nan_to_num(coords.float(), nan=0.0)  # [..., 2]
    angles = xy.unsqueeze(-1) * freqs  # [..., 2, dim/4]
    code = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [..., dim] (row half, column half)
    if code.shape[-1] < dim:
        code = torch.nn.functional.pad(code, (0, dim - code.shape[-1]))
    return code.masked_fill(missing, 0.0)


def grid_coordinates(grid: int, device: torch.device | None = None) -> torch.Tensor:
    """Patch centres of a `grid x grid` raster in raster order, `[grid*grid, 2]` (row, column) in [0, 1]."""
    centres = (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) / grid  # [grid]
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)  # [grid*grid, 2]


def llava_coordinates(n_memory: int, grid: int, has_cls: bool) -> torch.Tensor:
    """Coordinates of a LLaVA memory row `[N, 2]`: the tower's patch raster, CLS (kept by the `full`
    feature strategy) first and without a place."""
    coords = grid_coordinates(grid)
    if has_cls:
        coords = torch.cat([torch.full((1, 2), float("nan")), coords])
    if coords.shape[0] != n_memory:
        raise ValueError(f"a memory of {n_memory} tokens does not match the tower's {grid} x {grid} patch grid")
    return coords


def renormalise_high_res(coords: torch.Tensor, n_base: int, grid: int) -> torch.Tensor:
    """Anyres crops tile a padded canvas; after unpadding, the kept patches cover the image. Map the
    kept high-resolution coordinates (rows after the `n_base` base-crop rows) affinely onto the same
    span of patch centres as the base crop, `[0.5/grid, 1 - 0.5/grid]` per axis, so that a place in
    the image has one code whichever crop shows it."""
    out = coords.clone()
    high = out[n_base:]
    placed = ~torch.isnan(high).any(-1)
    if placed.sum() < 2:
        return out
    lo, hi = 0.5 / grid, 1.0 - 0.5 / grid
    for axis in range(2):
        values = high[placed, axis]
        span = (values.max() - values.min()).clamp_min(1e-6)
        high[placed, axis] = lo + (values - values.min()) / span * (hi - lo)
    out[n_base:] = high
    return out
