"""bench/bench_shift.py's image shifts (what screening images differ in) on a real fixture image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from bench.bench_shift import SHIFTS, small_lesion
from model.imageio import load_image


def test_every_shift_keeps_the_geometry_changes_the_pixels_and_is_repeatable(ham_image_paths):
    image = load_image(ham_image_paths[0], max_side=1024)
    for name, shift in SHIFTS.items():
        out = shift(image, 7)
        assert out.size == image.size and out.mode == "RGB", name
        assert np.array_equal(np.asarray(out), np.asarray(shift(image, 7))), name  # seeded, deterministic
        changed = not np.array_equal(np.asarray(out), np.asarray(image))
        assert changed == (name != "none"), name
    assert not np.array_equal(np.asarray(SHIFTS["noise"](image, 1)), np.asarray(SHIFTS["noise"](image, 2)))


def test_small_lesion_puts_the_half_size_image_in_a_field_of_its_border_colour(ham_image_paths):
    image = load_image(ham_image_paths[0], max_side=1024)
    out = np.asarray(small_lesion(image)).astype(int)
    w, h = image.size
    half = np.asarray(image.resize((w // 2, h // 2), Image.Resampling.BICUBIC)).astype(int)
    top, left = (h - h // 2) // 2, (w - w // 2) // 2
    assert np.array_equal(out[top : top + h // 2, left : left + w // 2], half)
    corner = out[0, 0]
    assert (out[:top] == corner).all() and (out[:, :left] == corner).all()  # one flat field around it
