"""Mixup / CutMix across a multi-dataset batch with per-dataset soft targets (SPEC section 3).

Partner of sample i is B-1-i (the flipped batch, as timm pairs samples). The target of sample
i for dataset d is lam * smooth(onehot(y_i)) when i belongs to d plus (1 - lam) *
smooth(onehot(y_partner)) when the partner belongs to d; a dataset neither belongs to gets
zeros. masks[i, d] = 1 where dataset d has target mass for sample i. All randomness comes from
the caller's torch.Generator (seeded per step) so resumed runs mix identically.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) -> (B, C): (1 - eps) * onehot + eps / C."""
    out = torch.full((labels.numel(), num_classes), smoothing / num_classes,
                     device=labels.device, dtype=torch.float32)
    out.scatter_add_(1, labels.view(-1, 1).long(),
                     torch.full((labels.numel(), 1), 1.0 - smoothing, device=labels.device))
    return out


def _dev(generator: Optional[torch.Generator]) -> torch.device:
    # Random numbers must be drawn on the generator's device (train.py seeds a CUDA one).
    return generator.device if generator is not None else torch.device("cpu")


def _rand(generator: Optional[torch.Generator]) -> float:
    return float(torch.rand(1, generator=generator, device=_dev(generator)).item())


def _beta(alpha: float, generator: Optional[torch.Generator]) -> float:
    # torch's Beta sampler ignores generators, so the (CPU) generator seeds a numpy draw.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_dev(generator)).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


class MixupCutmix:
    def __init__(self, num_classes: dict, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1):
        self.names = list(num_classes)
        self.num_classes = dict(num_classes)
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, label_smoothing

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, generator: Optional[torch.Generator]) -> tuple[float, bool]:
        """(lam, use_cutmix) of one batch; lam 1 means no mixing."""
        if not self.enabled or _rand(generator) >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = _rand(generator) < self.switch_prob
        else:
            cutmix = self.cutmix_alpha > 0
        lam = _beta(self.cutmix_alpha if cutmix else self.mixup_alpha, generator)
        return lam, cutmix

    @staticmethod
    def cut_box(lam: float, h: int, w: int, generator) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a box of area ~(1 - lam) centred uniformly (clipped)."""
        r = math.sqrt(1.0 - lam)
        ch, cw = int(h * r), int(w * r)
        cy = int(torch.randint(0, h, (1,), generator=generator, device=_dev(generator)).item())
        cx = int(torch.randint(0, w, (1,), generator=generator, device=_dev(generator)).item())
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        return y0, y1, x0, x1

    def __call__(self, video: torch.Tensor, dataset_ids: torch.Tensor, labels: torch.Tensor,
                 generator: Optional[torch.Generator] = None):
        """video (B, 3, T, H, W) -> (video, {name: (B, C_d)}, masks (B, N))."""
        lam, cutmix = self.draw(generator)
        b = video.shape[0]
        partner = torch.arange(b - 1, -1, -1, device=video.device)  # i <-> B-1-i
        if lam < 1.0:
            if cutmix:
                h, w = video.shape[-2:]
                y0, y1, x0, x1 = self.cut_box(lam, h, w, generator)
                video = video.clone()
                # Same box on every frame; the partner's pixels fill it.
                video[..., y0:y1, x0:x1] = video[partner][..., y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
            else:
                video = video * lam + video[partner] * (1.0 - lam)
        return (video,) + self.targets(dataset_ids, labels, lam, partner)

    def targets(self, dataset_ids: torch.Tensor, labels: torch.Tensor, lam: float,
                partner: torch.Tensor):
        """Per-dataset mixed soft targets and the (B, N) masks."""
        dev = labels.device
        dataset_ids, labels = dataset_ids.to(dev), labels.long()
        out, masks = {}, []
        for d, name in enumerate(self.names):
            own = (dataset_ids == d)
            safe = torch.where(own, labels, torch.zeros_like(labels))  # labels of d only
            soft = smooth_one_hot(safe, self.num_classes[name], self.smoothing) * own[:, None]
            mixed = lam * soft + (1.0 - lam) * soft[partner] if lam < 1.0 else soft
            out[name] = mixed
            masks.append((mixed.sum(1) > 0).float())
        return out, torch.stack(masks, 1)
