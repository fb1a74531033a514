"""PyAV fallback decoder for the files the chosen DALI decoder cannot read.

Frames are decoded sequentially from the start of the stream, which is frame-exact on every
container (VFR, missing durations, broken indices) at the cost of decoding the frames before
the clip; dataset clips are short (Kinetics 10 s), so exactness wins over seeking.

Rotation: frames are returned in *display* orientation (the probe's clockwise `rotation` is
applied). DALI's decoder returns stored frames, so `routing.route` sends every rotated file
here and both paths therefore always hand the augmentation upright frames.
"""
from __future__ import annotations

import concurrent.futures as cf
import errno
import os
import stat
import time
from typing import Optional, Sequence

import numpy as np

DEFAULT_TIMEOUT_S = 60.0
# OS errors of the machine, not of a file: they stop the run (dali_pipes/faults.py).
_MACHINE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC})


class DecodeError(RuntimeError):
    """A video that cannot be decoded; `reason` goes into the quarantine row."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot decode {path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class DecodeTimeout(DecodeError):
    """A decode (or read) that did not finish in time: retried before anything is quarantined,
    since a loaded machine or a slow mount can cause it as well as the file."""


def read_file(path: str) -> np.ndarray:
    """The bytes of a regular file, for DALI's decoder. Anything else (a FIFO, a directory, a
    device) is refused before it is opened: opening a FIFO blocks until a writer comes."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "directory" if stat.S_ISDIR(st.st_mode) else \
                "FIFO" if stat.S_ISFIFO(st.st_mode) else "special file"
            raise DecodeError(path, f"not a regular file (a {kind})")
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        if exc.errno in _MACHINE_ERRNOS:
            raise  # the machine's fault (faults.classify names it), not the file's
        raise DecodeError(path, f"cannot read the file: {exc.strerror or exc}") from None
    if data.size == 0:
        raise DecodeError(path, "file is empty (0 bytes)")
    return data


def decode_frames(path: str, indices: Sequence[int], stream_index: int = 0,
                  timeout: Optional[float] = DEFAULT_TIMEOUT_S, rotation: int = 0) -> np.ndarray:
    """(len(indices), H, W, 3) uint8 RGB frames at `indices` (any order, repeats allowed).

    Every index must decode: the samplers keep indices below the probed frame count, so a
    stream that ends earlier was changed (truncated) after probing and raises DecodeError.
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
    decoded = 0
    try:
        if not os.path.isfile(path):  # a FIFO would block av.open until a writer comes
            read_file(path)  # raises the precise reason
        with av.open(str(path), mode="r", timeout=30.0) as container:
            stream = container.streams[stream_index]
            stream.thread_type = "AUTO"  # frame threads; PyAV releases the GIL while decoding
            for n, frame in enumerate(container.decode(stream)):
                if deadline is not None and time.monotonic() > deadline:
                    raise DecodeTimeout(path, f"decode timeout after {timeout:.0f} s")
                decoded = n + 1
                if n in wanted:
                    got[n] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                if n >= last_wanted:
                    break
    except DecodeError:
        raise
    except OSError as exc:
        if exc.errno in _MACHINE_ERRNOS:
            raise
        raise DecodeError(path, f"{type(exc).__name__}: {exc}") from None
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise DecodeError(path, f"{type(exc).__name__}: {exc}") from None
    if len(got) < len(wanted):
        raise DecodeError(path, f"short decode: the stream ends after {decoded} frames but frame "
                                f"{last_wanted} was asked for (changed since probing? rebuild "
                                "the manifest)")
    frames = np.stack([got[int(i)] for i in idx])  # (T, H, W, 3)
    k = (-int(rotation) // 90) % 4  # np.rot90 turns counter-clockwise
    if k:
        frames = np.ascontiguousarray(np.rot90(frames, k=k, axes=(1, 2)))
    return frames


class FallbackPool:
    """Thread pools for PyAV decodes and file reads, each job bounded by a timeout.

    Threads suffice because PyAV and file reads release the GIL. A decoder stuck inside C or a
    read blocked on a hung mount cannot be interrupted: its result is abandoned after `timeout`
    (plus a grace second) as DecodeTimeout, and the pool grows a replacement thread so work
    goes on.
    """

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_TIMEOUT_S):
        self.workers, self.timeout = max(1, workers), timeout
        self._decoders = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="pyav")
        self._readers = cf.ThreadPoolExecutor(2, thread_name_prefix="reader")
        self.hung = 0

    def submit(self, path: str, indices, stream_index: int = 0, rotation: int = 0) -> cf.Future:
        return self._decoders.submit(decode_frames, path, indices, stream_index, self.timeout,
                                     rotation)

    def submit_read(self, path: str) -> cf.Future:
        return self._readers.submit(read_file, path)

    def result(self, future: cf.Future, path: str):
        """The value of `future`; DecodeError for a failure of the file, DecodeTimeout for a hang."""
        try:
            return future.result(timeout=self.timeout + 1.0)
        except cf.TimeoutError:
            self.hung += 1
            # The hung thread keeps its slot; add capacity so the queue keeps moving.
            for pool in (self._decoders, self._readers):
                pool._max_workers += 1  # noqa: SLF001
            raise DecodeTimeout(path, f"no answer for more than {self.timeout:.0f} s (a hung "
                                      "decoder, or a read blocked on a hung mount)") from None

    def close(self) -> None:
        for pool in (self._decoders, self._readers):
            pool.shutdown(wait=False, cancel_futures=True)
