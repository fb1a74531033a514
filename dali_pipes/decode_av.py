"""PyAV fallback decoder for the files the chosen DALI decoder cannot read.

Frames are decoded sequentially from the start of the stream, which is frame-exact on every
container (VFR, missing durations, broken indices) at the cost of decoding the frames before
the clip; dataset clips are short (Kinetics 10 s), so exactness wins over seeking.

Rotation: frames are returned in *display* orientation (the probe's clockwise `rotation` is
applied). DALI's decoder returns stored frames, so `needs_fallback` sends every rotated file
here and both paths therefore always hand the augmentation upright frames.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Optional, Sequence

import numpy as np

DEFAULT_TIMEOUT_S = 60.0

# Codecs of DALI 2.4's CPU decoder (SPEC section 6; fn.decoders.video docstring).
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
# NVDEC through fn.decoders.video(device="mixed"): the operator's docstring lists AV1, MPEG-4,
# H.264, H.265 besides VP8/VP9/MJPEG; NVDEC decodes 4:2:0 8-bit content only (SPEC section 6).
GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})
GPU_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "nv12"})


class DecodeError(RuntimeError):
    """A video that cannot be decoded; `reason` goes into the quarantine row."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot decode {path}: {reason}")

    def __reduce__(self):
        return (DecodeError, (self.path, self.reason))


def needs_fallback(probe: dict, device: str) -> bool:
    """True when the DALI decoder on `device` ("cpu" or "mixed"/"gpu") cannot read the file."""
    codec = str(probe.get("codec", "")).lower()
    if int(probe.get("rotation", 0) or 0) % 360:
        return True  # DALI ignores display matrices; PyAV output is rotated upright
    if int(probe.get("stream_index", 0) or 0) != _first_video_stream(probe):
        return True  # DALI decodes the first video stream only
    if device == "cpu":
        return codec not in CPU_CODECS
    pix_fmt = str(probe.get("pix_fmt", "yuv420p")).lower()
    # MJPEG is 4:2:2/4:4:4 (yuvj422p) from most cameras; NVDEC's JPEG path is 4:2:0 too.
    return codec not in GPU_CODECS or pix_fmt not in GPU_PIX_FMTS


def _first_video_stream(probe: dict) -> int:
    others = [s.get("index", 0) for s in probe.get("video_streams", []) or []]
    return min([int(probe.get("stream_index", 0) or 0)] + [int(i) for i in others])


def decode_frames(path: str, indices: Sequence[int], stream_index: int = 0,
                  timeout: Optional[float] = DEFAULT_TIMEOUT_S, rotation: int = 0) -> np.ndarray:
    """(len(indices), H, W, 3) uint8 RGB frames at `indices` (any order, repeats allowed).

    Indices past the end of the stream repeat the last frame, like the samplers' padding.
    `timeout` bounds the decoding time of this video (checked between frames).
    """
    import av

    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0 or idx.min() < 0:
        raise ValueError(f"indices must be non-empty and >= 0, got {indices}")
    wanted = set(int(i) for i in idx)
    last_wanted = int(idx.max())
    deadline = None if timeout is None else time.monotonic() + timeout
    got: dict[int, np.ndarray] = {}
    last = None
    try:
        with av.open(str(path), mode="r", timeout=30.0) as container:
            stream = container.streams[stream_index]
            stream.thread_type = "AUTO"  # frame threads; PyAV releases the GIL while decoding
            for n, frame in enumerate(container.decode(stream)):
                if deadline is not None and time.monotonic() > deadline:
                    raise DecodeError(path, f"decode timeout after {timeout:.0f} s")
                if n in wanted or n == last_wanted:
                    last = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                    got[n] = last
                if n >= last_wanted:
                    break
    except DecodeError:
        raise
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as exc:
        raise DecodeError(path, f"{type(exc).__name__}: {exc}") from None
    if not got:
        raise DecodeError(path, "zero decodable frames")
    tail = got[max(got)]
    frames = np.stack([got.get(int(i), tail) for i in idx])  # (T, H, W, 3)
    k = (-int(rotation) // 90) % 4  # np.rot90 turns counter-clockwise
    if k:
        frames = np.ascontiguousarray(np.rot90(frames, k=k, axes=(1, 2)))
    return frames


class FallbackPool:
    """Thread pool around `decode_frames` with a per-video timeout.

    Threads suffice because PyAV releases the GIL inside libavcodec. A decoder stuck inside C
    cannot be interrupted: its result is abandoned after `timeout` (plus a grace second), the
    video is reported as hung, and the pool grows a replacement thread so work goes on.
    """

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_TIMEOUT_S):
        self.workers, self.timeout = max(1, workers), timeout
        self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="pyav")
        self._hung = 0

    def submit(self, path: str, indices, stream_index: int = 0, rotation: int = 0) -> cf.Future:
        return self._pool.submit(decode_frames, path, indices, stream_index, self.timeout, rotation)

    def result(self, future: cf.Future, path: str) -> np.ndarray:
        """The frames of `future`, or DecodeError (decode failure or hang)."""
        try:
            return future.result(timeout=self.timeout + 1.0)
        except cf.TimeoutError:
            self._hung += 1
            # The hung thread keeps its slot; add capacity so the queue keeps moving.
            self._pool._max_workers = self.workers + self._hung  # noqa: SLF001
            raise DecodeError(path, f"decoder hung for more than {self.timeout:.0f} s") from None

    def decode_many(self, jobs: list[tuple]) -> list:
        """[(path, indices, stream_index, rotation)] -> [frames or DecodeError], in order."""
        futures = [self.submit(*job) for job in jobs]
        out = []
        for job, fut in zip(jobs, futures):
            try:
                out.append(self.result(fut, job[0]))
            except DecodeError as exc:
                out.append(exc)
            except Exception as exc:  # noqa: BLE001 - any failure of one file is that file's
                out.append(DecodeError(job[0], f"{type(exc).__name__}: {exc}"))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
