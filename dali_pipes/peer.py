"""The throughput peers: what users run instead of this project, decoding with PyAV (PySlowFast's
default), decord (what the MultiTrain authors used; `decord2` is its maintained successor on the
registry) or torchcodec, with torch augmentation in a torch DataLoader.

They produce the same clips as the DALI training graph, from the same per-sample parameters
(`TrainLoader.make_item`): decode the sampled frames, resize the short side to the drawn size,
crop, RandAugment (`randaug.apply_torch`), flip, normalise to (3, T, crop, crop).
Used by tools/data_throughput.py and bench.py --mode data-peer / data-decord / data-torchcodec.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dali_pipes import randaug
from dali_pipes.decode_av import decode_frames


def augment_clip(frames: np.ndarray, params: dict, crop: int, mean: Sequence[float],
                 std: Sequence[float], geom_interp: str = "nn") -> torch.Tensor:
    """uint8 (T, H, W, 3) frames + draw_train_params output -> float (3, T, crop, crop)."""
    t, h, w, _ = frames.shape
    # The conventional order: whole frame to the drawn short side, then the crop (the DALI
    # graph gets the same pixels by resampling only the crop window).
    (y0, x0), (y1, x1) = params["roi_start"], params["roi_end"]
    rh, rw = round(crop / (y1 - y0)), round(crop / (x1 - x0))  # resized frame size
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False)
    oy, ox = min(round(y0 * rh), rh - crop), min(round(x0 * rw), rw - crop)
    x = x[:, :, oy:oy + crop, ox:ox + crop]
    if "ra_op0" in params:
        # The DALI graph augments uint8 frames: round as its resize does. (T, 3, crop, crop)
        x = randaug.apply_torch(x.round().clamp(0, 255), params, geom_interp)
    if int(params["mirror"]):
        x = x.flip(-1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x.round().clamp(0, 255) - m) / s).permute(1, 0, 2, 3).contiguous()


PEERS = ("pyav", "decord", "torchcodec")
_MODULES = {"pyav": ("av", "av (pip install av)"), "decord": ("decord", "decord2 (pip install decord2)"),
            "torchcodec": ("torchcodec", "torchcodec (its wheels need torch's CUDA libraries)")}


def peer_missing(decoder: str) -> str | None:
    """Why the peer cannot run here (its package is absent), or None."""
    import importlib.util
    module, package = _MODULES[decoder]
    return None if importlib.util.find_spec(module) else f"{package} is not installed"


def decode_clip(decoder: str, path: str, indices, stream_index: int = 0,
                rotation: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 upright frames at `indices` with the peer's decoder."""
    if decoder == "pyav":
        return decode_frames(path, indices, stream_index, rotation=rotation)
    idx = [int(i) for i in indices]
    if decoder == "decord":  # turns rotated files upright itself (checked in the tests)
        import decord
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1).get_batch(idx).asnumpy()
    from torchcodec.decoders import VideoDecoder
    frames = VideoDecoder(path, device="cpu", num_ffmpeg_threads=1).get_frames_at(idx).data
    return frames.permute(0, 2, 3, 1).numpy()  # (T, C, H, W) -> (T, H, W, C)


class PeerDataset(torch.utils.data.Dataset):
    """Sample k -> augmented clip, from `make_item(k)` (an object with .record, .indices,
    .params), so the peer decodes the same frames with the same parameters as DALI."""

    def __init__(self, make_item: Callable, num_samples: int, crop: int, mean, std,
                 geom_interp: str = "nn", decoder: str = "pyav"):
        self.make_item, self.num_samples, self.geom_interp = make_item, num_samples, geom_interp
        self.crop, self.mean, self.std, self.decoder = crop, mean, std, decoder

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, k: int) -> torch.Tensor:
        """(3, T, crop, crop), or (S, 3, T, crop, crop) for S augmented copies of the video."""
        from dali_pipes.pipeline import copy_params, num_copies
        it = self.make_item(k)
        probe = it.record["probe"]
        frames = decode_clip(self.decoder, it.record["path"], it.indices,
                             int(probe.get("stream_index", 0)), int(probe.get("rotation", 0) or 0))
        clips = [augment_clip(frames, copy_params(it.params, c), self.crop, self.mean, self.std,
                              self.geom_interp) for c in range(num_copies(it.params))]
        return clips[0] if len(clips) == 1 else torch.stack(clips)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # one core per worker, as a DataLoader worker usually runs


def peer_loader(dataset: PeerDataset, batch_size: int, workers: int = 2):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       worker_init_fn=_one_thread, persistent_workers=False,
                                       prefetch_factor=2 if workers else None)


class Window:
    """Clips/s and CPU time per clip between batch arrivals, as a steady state: the clock
    starts at the first arrival (that batch, and any work done before it, is not counted)
    and stops at the last, so start-up, prefetched batches and tear-down stay outside.

    cpu_seconds: a callable sampled at the first and last arrival (CPU seconds of everything
    that does the work, e.g. this process and its DataLoader workers); None: no CPU figure."""

    def __init__(self, cpu_seconds: Optional[Callable[[], float]] = None):
        self.cpu_seconds = cpu_seconds
        self.t_first = self.t_last = None
        self.cpu_first = self.cpu_last = None
        self.clips = 0  # counted: arrivals after the first

    def tick(self, clips: int) -> None:
        now = time.perf_counter()
        cpu = self.cpu_seconds() if self.cpu_seconds is not None else None
        if self.t_first is None:
            self.t_first, self.cpu_first = now, cpu
        else:
            self.clips += clips
        self.t_last, self.cpu_last = now, cpu

    @property
    def seconds(self) -> float:
        return (self.t_last - self.t_first) if self.t_first is not None else 0.0

    def rate(self) -> float:
        """Counted clips / seconds between the first and the last arrival (nan before two)."""
        if not self.clips:
            return float("nan")
        return self.clips / max(self.seconds, 1e-9)

    def cpu_ms_per_clip(self) -> float:
        if not self.clips or self.cpu_first is None:
            return float("nan")
        return 1000.0 * (self.cpu_last - self.cpu_first) / self.clips

    def result(self) -> dict:
        return {"clips": self.clips, "seconds": self.seconds, "clips_per_s": self.rate(),
                "cpu_ms_per_clip": self.cpu_ms_per_clip()}


def warmup_rounds(warmup_batches: int, workers: int) -> int:
    """Warm-up batches rounded up to whole rounds of the DataLoader's workers (at least one)."""
    w = max(1, workers)
    return -(-max(1, warmup_batches) // w) * w


def measure_peer(dataset: PeerDataset, batch_size: int, workers: int = 2,
                 warmup_batches: int = 2) -> dict:
    """Clips/s and CPU ms/clip of the peer after its warm-up batches (`warmup_rounds`): the
    clock starts when the last of them arrives (a Window). Workers finish their batches in
    step, so the window holds whole rounds of them; starting it at a batch whose twin from
    the other worker arrives just after would count work done before the clock started (20%
    too fast with 2 workers and 12 batches). The dataset holds warm-up + timed samples."""
    loader = peer_loader(dataset, batch_size, workers)
    it = iter(loader)
    procs = [w.pid for w in getattr(it, "_workers", [])]  # DataLoader worker processes
    window = Window(lambda: time.process_time() + sum(_process_cpu_s(p) for p in procs))
    first = warmup_rounds(warmup_batches, workers) - 1
    for i, batch in enumerate(it):
        if i >= first:
            # (B, 3, T, H, W), or (B, S, 3, T, H, W) with S augmented copies of each video
            window.tick(batch.shape[0] * (batch.shape[1] if batch.dim() == 6 else 1))
    return window.result()


def measure_loader(loader, clips: int) -> dict:
    """Clips/s and CPU ms/clip (this process, DALI's threads included) of a TrainLoader over
    `clips` clips after its first batch (pipeline build and warm-up), across epochs. The
    window closes at the last counted arrival, before the epoch's threads are torn down: a
    batch in flight then is waited for, but it is not the loader's throughput."""
    window, epoch = Window(time.process_time), 0
    while window.clips < clips:
        for batch in loader.epoch(epoch):
            window.tick(batch.video.shape[0])
            if window.clips >= clips:
                break
        epoch += 1
    return window.result()


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc; 0 where unreadable, e.g.
    after it exited: the window then misses that process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peer_dataset(loader, num_samples: int, crop_size: int, mean, std,
                 decoder: str = "pyav") -> PeerDataset:
    """The peer over a DALI TrainLoader's own samples: sample k is the k-th of the loader's
    epoch-0 order (cycling into later epochs), with the loader's frames and parameters."""
    order = loader.sampler.global_order(0)

    def make_item(k, size=len(order)):
        d, v, s = order[k % size]
        return loader.make_item(k // size, int(d), int(v), int(s))

    return PeerDataset(make_item, num_samples, crop_size, mean, std, loader.geom_interp, decoder)


def peer_throughput(cfg, num_frames: int, crop_size: int, batches: int = 10, warmup: int = 2,
                    workers: int = 2, decoder: str = "pyav") -> dict:
    """Clips/s of a peer on the training manifests of `cfg`, with the DALI loader's sampling
    and augmentation parameters (bench.py --mode data-peer and friends); {"skipped": why}
    when the peer's package is not installed."""
    from dali_pipes.loader import build_train_loader

    missing = peer_missing(decoder)
    if missing:
        return {"skipped": missing}
    loader = build_train_loader(cfg, num_frames, crop_size)  # sampler + parameters only
    bs, warmup = cfg.data.batch_size, warmup_rounds(warmup, workers)
    data = peer_dataset(loader, (batches + warmup) * bs, crop_size, cfg.data.mean, cfg.data.std,
                        decoder)
    try:
        result = measure_peer(data, bs, workers, warmup)
    finally:
        loader.close()
    result.update(batch=bs, geom_interp=loader.geom_interp, decoder=decoder)
    return result
