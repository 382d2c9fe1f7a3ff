"""The data path: on-device augmentation, drawn per image."""

from __future__ import annotations

import torch

from stages import loaders

# ---------------------------------------------------------------- augmentation

def batch(n: int = 64, size: int = 8) -> torch.Tensor:
    """Images whose every pixel is distinct, so any move of a pixel shows."""
    return torch.arange(n * 3 * size * size, dtype=torch.float32).view(n, 3, size, size)


def test_augmentation_off_is_identity():
    x = batch()
    assert torch.equal(loaders.augment(x, flip=False, translate=0), x)


def test_flip_is_drawn_per_image():
    torch.manual_seed(0)
    x = batch()
    out = loaders.augment(x, flip=True, translate=0)
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))  # each image is itself or its mirror
    assert 10 < sum(flipped) < 54                       # and the coin is tossed per image


def test_translate_shifts_each_image_within_bounds():
    torch.manual_seed(0)
    x, pixels = batch(size=8), 2
    out = loaders.augment(x, flip=False, translate=pixels)
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = set()
    for o, i in zip(out, x):
        # The centre of a shifted image is the input's centre moved by (dy, dx), |d| <= pixels.
        found = [(dy, dx) for dy in range(-pixels, pixels + 1) for dx in range(-pixels, pixels + 1)
                 if torch.equal(o[:, 2:6, 2:6], i[:, 2 + dy:6 + dy, 2 + dx:6 + dx])]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 5  # drawn per image, not once per batch
