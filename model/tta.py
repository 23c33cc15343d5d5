"""The eight symmetries of a square (the dihedral group D4), for augmentation and test-time views.

A dermoscopy image has no preferred orientation, and flips / quarter turns are exact pixel
permutations (no interpolation). One encoding everywhere: op k in 0..7 flips left-right when
k >= 4, then turns by k % 4 quarter turns (`torch.rot90` over (H, W), counter-clockwise).
Training draws ops per sample (`dihedral`); evaluation, batch prediction and the app average the
first n test-time views in `TTA_OPS` order (`tta_views`), so `--tta 2` adds the mirror image and
`--tta 4` the vertical flip and one quarter turn.
"""

from __future__ import annotations

import torch

NUM_VIEWS = 8
# Test-time view v is op TTA_OPS[v]: identity, hflip, vflip, rot90, rot180, rot270, transpose,
# anti-transpose (the order the shipped evaluations used).
TTA_OPS: tuple[int, ...] = (0, 4, 6, 1, 2, 3, 5, 7)


def dihedral_view(x: torch.Tensor, op: int) -> torch.Tensor:
    """x (..., H, W) under one symmetry `op` in 0..7 (see the module docstring); a non-square x
    comes back (..., W, H) for odd quarter turns."""
    if not 0 <= op < NUM_VIEWS:
        raise ValueError(f"dihedral op must be in 0..{NUM_VIEWS - 1}, got {op}.")
    if op >= 4:
        x = x.flip(-1)
    return torch.rot90(x, op % 4, dims=(-2, -1)) if op % 4 else x


def dihedral(x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Sample i of the square batch x (B, C, H, H) under symmetry ops[i] (B,) in 0..7: flipped
    left-right when ops[i] >= 4, then turned by ops[i] % 4 quarter turns. Returns a new tensor."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square inputs, got {tuple(x.shape[-2:])}")
    if ops.shape != x.shape[:1]:
        raise ValueError(f"ops must hold one op per sample, shape ({x.shape[0]},), got {tuple(ops.shape)}")
    out = torch.where((ops >= 4).view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
    turns = ops % 4
    for k in (1, 2, 3):
        rows = turns == k
        if rows.any():
            out[rows] = torch.rot90(out[rows], k, (-2, -1))
    return out


def tta_views(pixel_values: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The first `n` (1..8) test-time views of (B, C, H, W) pixel values, identity first, each contiguous."""
    if not 1 <= n <= NUM_VIEWS:
        raise ValueError(f"the number of test-time views must be in 1..{NUM_VIEWS}, got {n}.")
    return [dihedral_view(pixel_values, op).contiguous() for op in TTA_OPS[:n]]
