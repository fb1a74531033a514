"""Frame-index sampling and the multi-dataset sampler (plain numpy, no DALI).

Everything random here is drawn from generators seeded by (seed, epoch, sample id), so a run
resumed from a checkpoint sees exactly the clips and the order of the uninterrupted run.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np


def sample_rng(seed: int, epoch: int, sample_id: int, stream: int = 0) -> np.random.Generator:
    """The generator of one training sample; `stream` separates independent uses (e.g. retries)."""
    return np.random.default_rng([int(seed), int(epoch), int(sample_id), int(stream)])


def _clamp(idx: np.ndarray, lo: int, hi: int) -> np.ndarray:
    # Clamping to the last frame pads short videos by repeating it (SlowFast's behaviour).
    return np.clip(idx, lo, max(lo, hi - 1)).astype(np.int32)


def _bounds(n: int, start_frame: int, end_frame: Optional[int]) -> tuple[int, int]:
    """[start, end) of the frames a sample may use: the video, or an ActivityNet segment."""
    end = n if end_frame is None else min(int(end_frame), n)
    start = max(0, min(int(start_frame), end - 1))
    return start, max(end, start + 1)


def clip_size(T: int, stride: int, fps: float, target_fps: float) -> float:
    """Source frames a clip spans: PySlowFast measures the stride at target_fps (30), so a
    25 fps video spans fewer frames than a 30 fps one for the same time; target_fps 0 counts
    source frames (every stride-th frame)."""
    if target_fps > 0 and fps > 0:
        return max(1.0, stride * T / target_fps * fps)
    return float((T - 1) * stride + 1)


def _linspace_clip(first: float, size: float, T: int, start: int, end: int) -> np.ndarray:
    """T indices spaced linearly over [first, first + size - 1] (frames relative to `start`),
    clamped to the span and truncated, exactly as PySlowFast's temporal_sampling (torch
    linspace in float32, clamp, .long())."""
    import torch
    idx = torch.linspace(first, first + size - 1, T).clamp(0, end - start - 1).long().numpy()
    return (idx + start).astype(np.int32)


def clip_indices(num_frames_video: int, T: int, stride: int, rng: Optional[np.random.Generator],
                 start_frame: int = 0, end_frame: Optional[int] = None, fps: float = 0.0,
                 target_fps: float = 0.0) -> np.ndarray:
    """T frame indices of a training clip from a random start inside [start_frame, end_frame).

    With target_fps > 0 (the reference, PySlowFast's decoder) the clip spans
    stride * T * fps / target_fps source frames, starts at a uniform random (real) offset and
    takes T linearly spaced frames in it. target_fps 0: `stride` source frames apart from a
    random integer start. rng None takes the centred clip. Segments (ActivityNet) pass their
    frame bounds; clips longer than the video repeat its last frame. Returns int32 (T,).
    """
    start, end = _bounds(num_frames_video, start_frame, end_frame)
    if target_fps > 0 and fps > 0:
        size = clip_size(T, stride, fps, target_fps)
        room = max(end - start - size, 0.0)
        first = float(rng.uniform(0, room)) if rng is not None else room / 2
        return _linspace_clip(first, size, T, start, end)
    span = (T - 1) * stride + 1
    room = end - start - span  # last valid offset of the clip start
    if room <= 0:
        first = start
    elif rng is None:
        first = start + room // 2
    else:
        first = start + int(rng.integers(0, room + 1))
    return _clamp(first + stride * np.arange(T), start, end)


def uniform_indices(n: int, T: int, rng: Optional[np.random.Generator],
                    start_frame: int = 0, end_frame: Optional[int] = None) -> np.ndarray:
    """SSv2 sampling: T equal segments over the video, a random frame in each (rng) or the middle."""
    return uniform_view_indices(n, T, rng, 0, 1, start_frame, end_frame)


def uniform_view_indices(n: int, T: int, rng: Optional[np.random.Generator], view: int,
                         num_views: int, start_frame: int = 0,
                         end_frame: Optional[int] = None) -> np.ndarray:
    """PySlowFast's SSv2 sampling (ssv2.py get_seq_frames): segment i spans frames
    round(s*i)..round(s*(i+1)) with s = (length - 1) / T; training takes a random frame of it
    (both ends included), testing the middle one, (lo + hi) // 2. Test view `view` of
    `num_views` takes the frame at (view + 0.5) / num_views of each segment (one view: the
    middle)."""
    start, end = _bounds(n, start_frame, end_frame)
    seg = (end - start - 1) / T
    lo = np.round(seg * np.arange(T)).astype(np.int64)  # np.round halves to even, as the reference
    hi = np.round(seg * np.arange(1, T + 1)).astype(np.int64)
    if rng is not None:
        pos = lo + rng.integers(0, hi - lo + 1)
    else:
        pos = lo + (hi - lo) * (2 * view + 1) // (2 * num_views)
    return _clamp(start + pos, start, end)


def test_clip_indices(n: int, T: int, stride: int, num_clips: int, sampling: str = "stride",
                      start_frame: int = 0, end_frame: Optional[int] = None, fps: float = 0.0,
                      target_fps: float = 0.0) -> np.ndarray:
    """(num_clips, T) indices of the test clips. "stride": PySlowFast's offset sampling
    (DATA.USE_OFFSET_SAMPLING, on in the MViTv2 recipe): clip k starts at
    k * floor(room / (num_clips - 1)), a single clip at floor(room / 2); "uniform": shifted
    uniform samplings."""
    if sampling == "uniform":
        return np.stack([uniform_view_indices(n, T, None, k, num_clips, start_frame, end_frame)
                         for k in range(num_clips)])
    start, end = _bounds(n, start_frame, end_frame)
    size = clip_size(T, stride, fps, target_fps)
    room = max(end - start - size, 0.0)
    if num_clips == 1:
        firsts = [math.floor(room / 2)]
    else:
        firsts = [k * math.floor(room / (num_clips - 1)) for k in range(num_clips)]
    if target_fps > 0 and fps > 0:
        return np.stack([_linspace_clip(f, size, T, start, end) for f in firsts])
    return np.stack([_clamp(start + f + stride * np.arange(T), start, end) for f in firsts])


test_clip_indices.__test__ = False  # not a pytest test despite its name


class MultiDatasetSampler:
    """Mixed-dataset epoch ordering, sharded over ranks by global batch.

    Epoch e: dataset d contributes n_d = round(w_d / sum(w) * sum(sizes)) draws taken from its
    own permutation (cycled when n_d > size); all draws are shuffled together, truncated to a
    multiple of batch_size * world_size, and rank r takes global batches' slices r. Weights of
    0 everywhere mean proportional to size, so every video appears exactly once per epoch.
    """

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("sizes and weights must be non-empty and of equal length")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"every dataset needs at least one video, got sizes {sizes}")
        self.sizes = [int(s) for s in sizes]
        w = np.asarray(weights, dtype=np.float64)
        # A 0 weight means "proportional to size" (the authors' shuffled concatenation).
        self.weights = np.where(w > 0, w, 0.0) if (w > 0).all() else np.asarray(sizes, np.float64)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        total = sum(self.sizes)
        self.draws = [int(round(x)) for x in self.weights / self.weights.sum() * total]
        global_batch = batch_size * world_size
        self.steps_per_epoch = sum(self.draws) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{sum(self.draws)} samples per epoch is less than one global batch "
                             f"({global_batch})")
        self.epoch, self.step = 0, 0

    def global_order(self, epoch: int) -> np.ndarray:
        """(N, 3) int64 rows (dataset, video, global sample id) in epoch order, all ranks."""
        rng = np.random.default_rng([int(self.seed), int(epoch), 0x5A3])
        parts = []
        for d, (size, n) in enumerate(zip(self.sizes, self.draws)):
            reps = -(-n // size)
            vids = np.concatenate([rng.permutation(size) for _ in range(reps)])[:n]
            parts.append(np.stack([np.full(n, d), vids], axis=1))
        order = np.concatenate(parts)[rng.permutation(sum(self.draws))]
        order = order[: self.steps_per_epoch * self.batch_size * self.world_size]
        return np.concatenate([order, np.arange(len(order))[:, None]], axis=1).astype(np.int64)

    def batch(self, epoch: int, step: int, order: Optional[np.ndarray] = None) -> np.ndarray:
        """This rank's (batch_size, 3) rows of global batch `step`."""
        order = self.global_order(epoch) if order is None else order
        gb = self.batch_size * self.world_size
        lo = step * gb + self.rank * self.batch_size
        return order[lo: lo + self.batch_size]

    def iter_epoch(self, epoch: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (step, rows) from the restored step when `epoch` is the saved one, else from 0;
        the position is advanced as batches are handed out."""
        start = self.step if epoch == self.epoch else 0
        self.epoch, self.step = epoch, start
        order = self.global_order(epoch)
        for step in range(start, self.steps_per_epoch):
            rows = self.batch(epoch, step, order)
            self.step = step + 1
            yield step, rows
        self.epoch, self.step = epoch + 1, 0  # a finished epoch resumes at the next one

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for _, rows in self.iter_epoch(self.epoch):
            for d, v, s in rows:
                yield int(d), int(v), int(s)

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "step": int(self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
