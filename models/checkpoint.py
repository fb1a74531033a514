"""Import PySlowFast / MultiTrain ``.pyth`` checkpoints into the MViTv2 backbone."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .mvit import resize_rel_pos

_SPATIAL, _TEMPORAL = "pos_embed_spatial", "pos_embed_temporal"


def _read_state(path_or_dict) -> dict[str, torch.Tensor]:
    if isinstance(path_or_dict, (str, os.PathLike)):
        ckpt = torch.load(path_or_dict, map_location="cpu", weights_only=True)
    else:
        ckpt = path_or_dict
    # PySlowFast keeps the weights under "model_state", our train.py checkpoints under "model".
    state = None
    if isinstance(ckpt, dict):
        state = ckpt.get("model_state", ckpt.get("model", ckpt))
    if not isinstance(state, dict):
        raise ValueError(f"no state dict in checkpoint (type {type(ckpt).__name__})")
    return state


def _strip(state: dict) -> dict:
    """Drop DDP's "module." and our own "backbone." prefixes (a MultiTrain checkpoint keeps
    the backbone under backbone.*; its heads then are not backbone keys)."""
    out = {}
    for k, v in state.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    if any(k.startswith("backbone.") for k in out):
        out = {(k[len("backbone."):] if k.startswith("backbone.") else f"<non-backbone>{k}"): v
               for k, v in out.items()}
    return out


def _skipped(key: str, skip) -> bool:
    # Whole dotted components only: "head" must not swallow "heads.k400".
    return key.startswith("<non-backbone>") or any(key == p or key.startswith(p + ".")
                                                   for p in skip)


def resize_spatial(table: torch.Tensor, hw: int) -> torch.Tensor:
    """(1, H·W, D) as a square grid, bicubic to hw tokens."""
    old = round(table.shape[1] ** 0.5)
    new = round(hw ** 0.5)
    if old * old != table.shape[1] or new * new != hw:
        raise ValueError(f"cannot resize non-square spatial table {tuple(table.shape)} to {hw}")
    grid = table.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # (1, D, H, W)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, hw, -1).to(table.dtype)


def resize_temporal(table: torch.Tensor, t: int) -> torch.Tensor:
    """(1, T, D) linearly to t entries."""
    seq = table.transpose(1, 2).float()  # (1, D, T)
    seq = F.interpolate(seq, size=t, mode="linear", align_corners=False)
    return seq.transpose(1, 2).to(table.dtype)


def _adapt(key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Interpolated tensor when the mismatch is one we know how to resample, else None."""
    if key == _SPATIAL and value.ndim == 3 and value.shape[2] == target.shape[2]:
        return resize_spatial(value, target.shape[1])
    if key == _TEMPORAL and value.ndim == 3 and value.shape[2] == target.shape[2]:
        return resize_temporal(value, target.shape[1])
    if ".attn.rel_pos_" in key and value.ndim == 2 and value.shape[1] == target.shape[1]:
        return resize_rel_pos(value.float(), target.shape[0]).to(value.dtype)
    return None


def _mismatch_error(missing, unexpected, bad, target_state, source) -> ValueError:
    lines = ["checkpoint does not match the backbone:"]
    if missing:
        lines.append("  missing in checkpoint: " + ", ".join(
            f"{k} {tuple(target_state[k].shape)}" for k in missing))
    if unexpected:
        lines.append("  unexpected in checkpoint: " + ", ".join(
            f"{k} {tuple(source[k].shape)}" for k in unexpected))
    if bad:
        lines.append("  shape mismatch (checkpoint vs model): " + ", ".join(
            f"{k} {tuple(source[k].shape)} vs {tuple(target_state[k].shape)}" for k in bad))
    hints = []
    names = set(missing) | set(unexpected)
    if "cls_token" in names:
        hints.append(f"cls_embed={'cls_token' in unexpected}")
    if any(".rel_pos_" in k for k in names):
        hints.append(f"rel_pos={any('.rel_pos_' in k for k in unexpected)}")
    if any(k.startswith("pos_embed") for k in names):
        hints.append(f"abs_pos={any(k.startswith('pos_embed') for k in unexpected)}")
    todo = "  fix: build the backbone with the checkpoint's architecture"
    todo += f" (build_backbone(..., {', '.join(hints)}))" if hints else " (preset, depth, widths)"
    lines.append(todo + ", or pass skip=(...) with the prefixes to leave at their init")
    return ValueError("\n".join(lines))


def load_pyslowfast(model: nn.Module, path_or_dict, skip=("head",)) -> dict:
    """Load a PySlowFast/MultiTrain checkpoint into a backbone or a MultiTrainModel's .backbone.

    Accepts a path (torch.load weights_only) or a dict; the state is under "model_state" if
    present. Keys with a `skip` prefix (dotted components) are ignored. Position tables are
    resampled when frames or crop differ (spatial bicubic on the 2-D grid, temporal linear),
    rel_pos tables linearly. Any other difference raises ONE ValueError naming every missing,
    unexpected and shape-mismatched tensor. Returns {"loaded", "interpolated", "skipped"}.
    """
    backbone = getattr(model, "backbone", model)
    source = _strip(_read_state(path_or_dict))
    target = backbone.state_dict()
    skipped = sorted(k.replace("<non-backbone>", "") for k in source if _skipped(k, skip))
    source = {k: v for k, v in source.items() if not _skipped(k, skip)}
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    new_state, interpolated, bad = {}, [], []
    for k, v in source.items():
        if k not in target:
            continue
        if v.shape != target[k].shape:
            resized = _adapt(k, v, target[k])
            if resized is None:
                bad.append(k)
                continue
            interpolated.append(f"{k} {tuple(v.shape)} -> {tuple(resized.shape)}")
            v = resized
        new_state[k] = v
    if missing or unexpected or bad:
        raise _mismatch_error(missing, unexpected, bad, target, source)
    backbone.load_state_dict(new_state, strict=True)
    return {"loaded": sorted(new_state), "interpolated": interpolated, "skipped": skipped}
