"""Spatial sampling and random erasing equal the reference (PySlowFast's transform.py and
random_erasing.py, timm's RandomErasing): the reference formulas transcribed with the same
generator draw the same boxes, and the erased clips keep the reference's statistics."""
import math

import numpy as np
import pytest
import torch

from dali_pipes import pipeline as P
from dali_pipes.erasing import RandomErasing
from helpers import timm_data_module


def reference_scale_crop(rng, height, width, crop, lo, hi, inverse):
    """transform.py random_short_side_scale_jitter + random_crop (np.random for the offsets)."""
    size = int(round(1.0 / rng.uniform(1.0 / hi, 1.0 / lo))) if inverse else int(round(rng.uniform(lo, hi)))
    if width < height:
        new_w, new_h = size, int(math.floor(float(height) / width * size))
    else:
        new_h, new_w = size, int(math.floor(float(width) / height * size))
    y = int(rng.integers(0, new_h - crop)) if new_h > crop else 0
    x = int(rng.integers(0, new_w - crop)) if new_w > crop else 0
    return new_h, new_w, y, x


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("hw", [(240, 320), (640, 360), (256, 256)])
def test_scale_jitter_and_crop_are_pyslowfasts(inverse, hw):
    h, w = hw
    for s in range(200):
        p = P.draw_train_params(np.random.default_rng(s), h, w, 224, "scale", [256, 320],
                                [0.08, 1], False, 0, 0, 0, inverse_scale=inverse)
        new_h, new_w, y, x = reference_scale_crop(np.random.default_rng(s), h, w, 224, 256, 320, inverse)
        np.testing.assert_allclose(p["roi_start"], [y / new_h, x / new_w], atol=1e-6)
        np.testing.assert_allclose(p["roi_end"], [(y + 224) / new_h, (x + 224) / new_w], atol=1e-6)
    # inverse-uniform favours small sizes: its median is the harmonic middle, 284.4, not 288
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(4000):  # the short side, read off the crop window of a square frame
        (y0, _), (y1, _) = P._scale_crop(rng, 256, 256, 224, [256, 320], inverse)
        sizes.append(round(224 / (y1 - y0)))
    median = np.median(sizes)
    assert (283 <= median <= 286) if inverse else (287 <= median <= 289)


def reference_rrc(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """transform.py _get_param_spatial_crop (log_scale, no switch_hw)."""
    for _ in range(10):
        target = rng.uniform(*scale) * height * width
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("hw,area", [((240, 320), (0.08, 1.0)), ((100, 1000), (0.9, 1.0)),
                                     ((1000, 100), (0.9, 1.0)), ((300, 300), (1.5, 2.0))])
def test_random_resized_crop_is_pyslowfasts_including_the_fallback(hw, area):
    h, w = hw
    for s in range(100):
        got = P._rrc_box(np.random.default_rng(s), h, w, area)
        assert got == reference_rrc(np.random.default_rng(s), h, w, area), s


def test_random_erasing_draws_like_the_reference():
    """Probability, area and aspect of the boxes against timm's RandomErasing on the same
    frame size (its draws, from Python's random module, over as many trials)."""
    timm_re = timm_data_module("random_erasing")
    import random
    h, w, n = 56, 80, 4000
    ours = RandomErasing(0.25)
    rng = np.random.default_rng(0)
    boxes = [ours.draw(rng, h, w) for _ in range(n)]
    ref = timm_re.RandomErasing(probability=0.25, mode="const", device="cpu")
    random.seed(0)
    ref_boxes = []
    for _ in range(n):
        img = torch.ones(1, h, w)
        ref(img)
        erased = (img == 0)[0]
        if erased.any():
            rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
            ref_boxes.append((int(rows[0]), int(cols[0]), len(rows), len(cols)))
    hit = [b for b in boxes if b]
    assert abs(len(hit) / n - 0.25) < 0.03 and abs(len(ref_boxes) / n - 0.25) < 0.03
    for sample in (hit, ref_boxes):
        area = np.array([bh * bw / (h * w) for _, _, bh, bw in sample])
        aspect = np.array([bh / bw for _, _, bh, bw in sample])
        assert area.min() >= 0.015 and area.max() <= 1 / 3 + 0.03
        assert 0.25 <= aspect.min() and aspect.max() <= 1 / 0.25
    area = lambda s: np.mean([bh * bw / (h * w) for _, _, bh, bw in s])  # noqa: E731
    assert abs(area(hit) - area(ref_boxes)) < 0.02  # same distribution of sizes


def test_random_erasing_is_one_box_for_all_frames_with_fresh_noise():
    torch.manual_seed(0)
    video = torch.full((64, 3, 4, 32, 32), 5.0)  # (B, 3, T, H, W): nothing like N(0, 1)
    out = RandomErasing(0.5)(video, np.random.default_rng(1))
    assert torch.equal(video, torch.full_like(video, 5.0))  # the input is left alone
    erased = out != 5.0  # (B, 3, T, H, W)
    per_clip = erased.flatten(1).any(1)
    assert 20 <= int(per_clip.sum()) <= 44  # about half of 64
    noise = []
    for b in per_clip.nonzero().flatten().tolist():
        box = erased[b, 0, 0]
        assert all(torch.equal(erased[b, c, t], box) for c in range(3) for t in range(4))
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert int(box.sum()) == len(rows) * len(cols)  # a rectangle
        patch = out[b][:, :, box]  # (3, T, pixels)
        assert not torch.equal(patch[:, 0], patch[:, 1])  # drawn anew for every frame
        noise.append(patch.flatten())
    noise = torch.cat(noise)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    again = RandomErasing(0.5)(video, np.random.default_rng(1))
    assert torch.equal(again != 5.0, erased)  # the boxes follow the step's generator
