"""Random erasing of training clips on the training device, and the batch augmentation that
runs it before Mixup/CutMix (the reference order: erasing is a per-clip transform of the
dataset in PySlowFast and timm, mixup works on the collated batch).

PySlowFast's RandomErasing with cube=True (slowfast/datasets/random_erasing.py, after timm's):
with probability `prob` a clip gets one box, the same on every frame, of area
U(min_area, max_area) of the frame and aspect exp(U(log min_aspect, log 1/min_aspect)), found in
up to 100 tries (a box must be strictly smaller than the frame); "pixel" mode fills it with
N(0, 1) noise in normalised units, drawn anew for every frame. The MViTv2 recipe (AUG.RE_PROB
0.25, RE_MODE pixel, RE_COUNT 1) is the default. Box draws come from the step's host generator
(no device sync, reproduced on resume); the noise from torch's generator on the device.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


class RandomErasing:
    def __init__(self, prob: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, tries: int = 100):
        self.prob, self.min_area, self.max_area, self.tries = prob, min_area, max_area, tries
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def draw(self, rng: np.random.Generator, height: int, width: int) -> Optional[tuple]:
        """(top, left, h, w) of one clip's box, or None (not erased, or no box fitted)."""
        if self.prob <= 0 or rng.random() > self.prob:
            return None
        area = height * width
        for _ in range(self.tries):
            target = rng.uniform(self.min_area, self.max_area) * area
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        return None

    def __call__(self, video: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """video (B, 3, T, H, W) normalised -> the same with each clip's box (if any) erased."""
        boxes = [self.draw(rng, *video.shape[-2:]) for _ in range(video.shape[0])]
        if not any(boxes):
            return video
        video = video.clone()
        for b, box in enumerate(boxes):
            if box is not None:
                top, left, h, w = box
                noise = torch.randn((*video.shape[1:3], h, w), device=video.device,
                                    dtype=video.dtype)  # (3, T, h, w): fresh for every frame
                video[b, :, :, top:top + h, left:left + w] = noise
        return video


class BatchAugment:
    """What the training step does to a batch before the model: random erasing per clip, then
    Mixup/CutMix over the batch with the per-dataset targets."""

    def __init__(self, mixup, erasing: Optional[RandomErasing] = None):
        self.mixup, self.erasing = mixup, erasing

    def __call__(self, video, dataset_ids, labels, rng: np.random.Generator):
        """-> (video (B, 3, T, H, W), {dataset: (B, C_d)} targets, (B, N) masks)."""
        if self.erasing is not None:
            video = self.erasing(video, rng)
        return self.mixup(video, dataset_ids, labels, rng)
