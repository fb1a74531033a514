"""Mixup / CutMix across a multi-dataset batch with per-dataset soft targets (SPEC section 3).

Partner of sample i is B-1-i (the flipped batch, as timm pairs samples; with an odd batch the
middle clip is its own partner and stays unmixed). Pixels mix whatever the partners' datasets.
Targets follow the MultiTrain authors by default: sample i of dataset d gets lam * smooth(y_i)
for d, plus (1 - lam) * smooth(y_partner) when the partner is of d too; the other datasets get
nothing from it (mask 0), so a head never learns from a clip of another dataset's label space.
With cross_dataset=True (`data.mixup_cross_dataset`) the partner's dataset also gets
(1 - lam) * smooth(y_partner) and its mask for sample i.

The batch's draws (lam, mixup or CutMix, the box) come from a host numpy Generator the caller
seeds per step, as timm draws them from numpy: nothing is read back from the device, and a
resumed run mixes identically.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) -> (B, C): (1 - eps) * onehot + eps / C."""
    out = torch.full((labels.numel(), num_classes), smoothing / num_classes,
                     device=labels.device, dtype=torch.float32)
    out.scatter_add_(1, labels.view(-1, 1).long(),
                     torch.full((labels.numel(), 1), 1.0 - smoothing, device=labels.device))
    return out


class MixupCutmix:
    def __init__(self, num_classes: dict, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1,
                 cross_dataset: bool = False):
        self.names = list(num_classes)
        self.num_classes = dict(num_classes)
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, label_smoothing
        self.cross_dataset = cross_dataset

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, rng: np.random.Generator) -> tuple[float, bool]:
        """(lam, use_cutmix) of one batch, in timm's order of draws; lam 1 means no mixing."""
        if not self.enabled or rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = bool(rng.random() < self.switch_prob)
        else:
            cutmix = self.cutmix_alpha > 0
        lam = float(rng.beta(*(2 * [self.cutmix_alpha if cutmix else self.mixup_alpha])))
        return lam, cutmix

    @staticmethod
    def cut_box(lam: float, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a box of area ~(1 - lam) centred uniformly (clipped), as timm."""
        r = math.sqrt(1.0 - lam)
        ch, cw = int(h * r), int(w * r)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        return y0, y1, x0, x1

    def __call__(self, video: torch.Tensor, dataset_ids: torch.Tensor, labels: torch.Tensor,
                 rng: np.random.Generator):
        """video (B, 3, T, H, W) -> (video, {name: (B, C_d)}, masks (B, N)), all on video's device."""
        lam, cutmix = self.draw(rng)
        if lam < 1.0:
            if cutmix:
                h, w = video.shape[-2:]
                y0, y1, x0, x1 = self.cut_box(lam, h, w, rng)
                pasted = video[..., y0:y1, x0:x1].flip(0)  # partner i <-> B-1-i, box only
                video = video.clone()
                video[..., y0:y1, x0:x1] = pasted  # the same box on every frame
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
            else:
                video = video * lam + video.flip(0) * (1.0 - lam)
        return (video,) + self.targets(dataset_ids, labels, lam)

    def targets(self, dataset_ids: torch.Tensor, labels: torch.Tensor, lam: float):
        """Per-dataset mixed soft targets and the (B, N) masks; partner of i is B-1-i."""
        labels = labels.long()
        out, masks = {}, []
        for d, name in enumerate(self.names):
            own = dataset_ids == d  # (B,)
            safe = torch.where(own, labels, torch.zeros_like(labels))  # labels of d only
            soft = smooth_one_hot(safe, self.num_classes[name], self.smoothing) * own[:, None]
            if lam < 1.0:
                partner = soft.flip(0)
                if not self.cross_dataset:
                    partner = partner * own[:, None]  # only a partner of the same dataset counts
                soft = lam * soft + (1.0 - lam) * partner
            out[name] = soft
            masks.append(own.float() if not self.cross_dataset or lam == 1.0
                         else (own | own.flip(0)).float())
        return out, torch.stack(masks, 1)
