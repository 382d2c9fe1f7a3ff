"""The data path: on-device augmentation, drawn per image."""

from __future__ import annotations

import pytest
import torch

from stages import loaders, params
from stages.common import UserError, machine_cores
from stages.params import Train

# ---------------------------------------------------------------- augmentation

def batch(n: int = 64, size: int = 8) -> torch.Tensor:
    """Images whose every pixel is distinct, so any move of a pixel shows."""
    return torch.arange(n * 3 * size * size, dtype=torch.float32).view(n, 3, size, size)


def test_augmentation_off_is_identity():
    x = batch()
    assert torch.equal(loaders.augment(x, Train(flip=False, translate=0)), x)


def test_flip_is_drawn_per_image():
    torch.manual_seed(0)
    x = batch()
    out = loaders.augment(x, Train(flip=True, translate=0))
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))  # each image is itself or its mirror
    assert 10 < sum(flipped) < 54                       # and the coin is tossed per image


def test_translate_shifts_each_image_within_bounds():
    torch.manual_seed(0)
    x, pixels = batch(size=8), 2
    out = loaders.augment(x, Train(flip=False, translate=pixels))
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = set()
    for o, i in zip(out, x):
        # The centre of a shifted image is the input's centre moved by (dy, dx), |d| <= pixels.
        found = [(dy, dx) for dy in range(-pixels, pixels + 1) for dx in range(-pixels, pixels + 1)
                 if torch.equal(o[:, 2:6, 2:6], i[:, 2 + dy:6 + dy, 2 + dx:6 + dx])]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 5  # drawn per image, not once per batch


# ---------------------------------------------------------------- workers

def test_auto_workers_follow_the_device_and_the_cores():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device name needs no GPU
    assert loaders.loader_workers("auto", cpu, cores=64) == 0  # the main process is fastest
    assert loaders.loader_workers("auto", cuda, cores=16) == 4  # the H200 box of issue 13
    assert loaders.loader_workers("auto", cuda, cores=6) == 1
    assert loaders.loader_workers("auto", cuda, cores=2) == 1  # always at least one
    assert loaders.loader_workers("auto", cuda, cores=128) == loaders.MAX_AUTO_WORKERS == 8
    # DDP processes on one machine share its cores.
    assert loaders.loader_workers("auto", cuda, processes=4, cores=64) == 4
    assert loaders.loader_workers("auto", cuda, processes=8, cores=16) == 1
    assert 1 <= loaders.loader_workers("auto", cuda) <= 8  # this machine's own cores
    assert machine_cores() >= 1


def test_explicit_workers_win_and_bad_ones_are_refused():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert loaders.loader_workers(3, cpu, cores=2) == 3
    assert loaders.loader_workers(0, cuda, cores=64) == 0
    assert loaders.loader_workers(12, cuda, cores=16) == 12  # no cap on a number given
    for bad in ("four", "4", -1, 2.5, True, None):  # refused when params.yaml is read
        with pytest.raises(UserError, match=r"train.workers is .*: use auto or a whole number "
                                            r">= 0$"):
            params.parse({"train": {"workers": bad}})


def test_random_resized_crop_zooms_each_image_into_a_box_of_its_own():
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(64, 3, 32, 32).contiguous()
    out = loaders.augment(ramp, Train(crop_scale=0.1, translate=0))
    assert out.shape == ramp.shape
    assert out.min() >= 0 and out.max() <= 1  # bilinear inside the image: no new values
    spans = out[:, 0, 16].amax(1) - out[:, 0, 16].amin(1)  # how much of the ramp a row shows
    assert (spans < 0.99).float().mean() > 0.7    # most images are cut (a wide box may span it)
    assert spans.min() < 0.5                      # some to a small box
    assert len({round(v, 4) for v in spans.tolist()}) > 32  # and each to its own box
    same = loaders.augment(ramp, Train(crop_scale=1.0, translate=0))
    assert torch.equal(same, ramp)                # 1: off


def test_color_jitter_scales_pixels_per_image_within_range():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    pixels = torch.rand(64, 3, 8, 8)
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    meta = {"mean": mean, "std": std}
    out = loaders.augment(x, Train(color_jitter=0.4, translate=0), meta)
    back = out * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5   # still pixels after clamping
    change = (back.mean((1, 2, 3)) / pixels.mean((1, 2, 3)))
    assert change.std() > 0.05                                # drawn per image
    assert torch.allclose(loaders.augment(x, Train(color_jitter=0.0, translate=0), meta), x)


def test_color_jitter_composed_equals_brightness_then_contrast_then_saturation():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    pixels = torch.rand(16, 3, 8, 8) * 0.6 + 0.2  # away from 0 and 1: no clamping in between
    torch.manual_seed(7)
    out = loaders.color_jitter((pixels - m) / s, 0.3, mean, std)
    torch.manual_seed(7)  # the same factors, applied one step at a time
    bright, contrast, saturation = torch.empty(3, 16, 1, 1, 1).uniform_(0.7, 1.3)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    p = pixels * bright
    level = (p * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    p = (p - level) * contrast + level
    grey = (p * luma).sum(1, keepdim=True)
    p = (p - grey) * saturation + grey
    expected = (p.clamp(0, 1) - m) / s
    assert torch.allclose(out, expected, atol=1e-5)


def test_training_crops_come_from_the_whole_stored_image_at_the_models_size():
    """Stored 16 px for a 12 px model: off, training sees eval's centre crop; a random-resized
    crop is cut from anywhere in the stored image, the margin included, and resized to 12."""
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(256, 3, 16, 16).contiguous()
    meta = {"image_size": 16, "crop_size": 12}
    off = loaders.augment(ramp, Train(translate=0), meta)
    assert torch.equal(off, ramp[..., 2:14, 2:14])
    cut = loaders.augment(ramp, Train(crop_scale=0.3, translate=0), meta)
    assert cut.shape == (256, 3, 12, 12)
    left, right = cut[:, 0, 6, 0], cut[:, 0, 6, -1]
    assert left.min() < ramp[0, 0, 0, 2] and right.max() > ramp[0, 0, 0, 13]  # the margin
    assert len({round(v, 4) for v in left.tolist()}) > 64  # each image its own box
