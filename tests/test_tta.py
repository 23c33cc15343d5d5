"""model/tta.py: the eight symmetries of a square, per sample (training) and as test-time views."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from model.tta import NUM_VIEWS, TTA_OPS, dihedral, dihedral_view, tta_views


def test_dihedral_gives_the_eight_symmetries_of_a_square() -> None:
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3).repeat(8, 1, 1, 1)
    original = x.clone()
    out = dihedral(x, torch.arange(8))
    assert torch.equal(x, original)  # a new tensor: the input is left as it was
    for op in range(8):
        expected = x[op].flip(-1) if op >= 4 else x[op]
        expected = torch.rot90(expected, op % 4, (-2, -1))
        assert torch.equal(out[op], expected) and torch.equal(out[op], dihedral_view(x[op], op))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8  # all distinct
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.zeros(1, 3, 4, 5), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="one op per sample"):
        dihedral(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long))


def test_tta_views_are_the_eight_distinct_symmetries_in_the_shipped_order():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = tta_views(x, NUM_VIEWS)
    assert len(views) == 8 and sorted(TTA_OPS) == list(range(8))
    # identity, hflip, vflip, rot90, rot180, rot270, transpose, anti-transpose: what --tta n meant before
    expected = [x, x.flip(-1), x.flip(-2), torch.rot90(x, 1, (-2, -1)), torch.rot90(x, 2, (-2, -1)),
                torch.rot90(x, 3, (-2, -1)), x.transpose(-2, -1), torch.rot90(x, 2, (-2, -1)).transpose(-2, -1)]
    for got, want in zip(views, expected):
        assert torch.equal(got, want)
    for a, b in itertools.combinations(views, 2):
        assert not torch.equal(a, b)
    for v in views:  # pixel permutations, nothing interpolated
        assert torch.equal(v.flatten().sort().values, x.flatten())
    # closed under composition: a group (D4)
    for i, j in itertools.product(range(8), repeat=2):
        assert any(torch.equal(dihedral_view(views[i], j), v) for v in views)
    for n in (0, 9):
        with pytest.raises(ValueError, match="1..8"):
            tta_views(x, n)
    with pytest.raises(ValueError, match="0..7"):
        dihedral_view(x, 8)


def _tta_probabilities(logits_fn, pixel_values: torch.Tensor, n_views: int) -> np.ndarray:
    with torch.no_grad():
        probs = [torch.softmax(logits_fn(v), -1) for v in tta_views(pixel_values, n_views)]
    return torch.stack(probs).mean(0).numpy()


def test_tta_of_invariant_model_equals_no_tta():
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 4)

    def pooled_model(px: torch.Tensor) -> torch.Tensor:  # global average pool: flip/rotation invariant
        return head(px.mean(dim=(-2, -1)))

    px = torch.randn(2, 3, 8, 8)
    no_tta = _tta_probabilities(pooled_model, px, 1)
    np.testing.assert_allclose(_tta_probabilities(pooled_model, px, 8), no_tta, atol=1e-6)
    np.testing.assert_allclose(no_tta, torch.softmax(pooled_model(px), -1).detach().numpy(), atol=1e-6)


def test_full_tta_is_invariant_for_any_model():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    px = torch.randn(2, 3, 8, 8)
    ref = _tta_probabilities(conv, px, 8)
    assert not np.allclose(_tta_probabilities(conv, px, 1), ref)  # the model itself is not invariant
    for k in range(8):
        np.testing.assert_allclose(_tta_probabilities(conv, dihedral_view(px, k), 8), ref, atol=1e-6)
