"""Probe a video file with PyAV so that the training pipeline never meets a surprise.

DALI's decoder fails a whole batch on a bad file and decodes an mp4 whose index
claims more frames than exist to zero frames without an error (SPEC §6), so the
project must know, before training, how many frames each file *really* decodes to.

Stream choice: the first video stream that is not an attached picture (cover art),
whatever its size or "default" flag. This is the stream DALI 2.4's
``fn.decoders.video`` decodes — checked on DALI 2.4.0 with a two-stream webm, where
it decoded stream 0 whichever stream was larger — so the frame count describes what
the loader will actually see. ``nasa_multistream.mp4`` therefore maps to stream 0
(320x180 @ 25 fps); the other video streams are listed under ``"video_streams"``.

Frame count: ``num_frames`` is what really decodes. Files up to FULL_DECODE_MAX_PIXELS
are decoded completely (``decode_check: "full"``); bigger ones count non-empty packets and
must decode their first frame and their last GOP (``"ends"``). A decode error, or a
header claiming more frames than decode (a truncated mp4 keeps its index), rejects the
file: DALI would fail the batch or silently return nothing.

Decode errors: FFmpeg reports much damage only as error-level log lines (a demuxer
resyncing over garbage, a decoder concealing a broken slice) while frames keep coming.
Those lines are captured during the probe and kept as ``"decode_errors"`` (a few short,
deduplicated strings; ``[]`` for a clean file) so that the manifest builder can decide.

Rotation: degrees the stored picture must be turned *clockwise* to be displayed
upright, in {0, 90, 180, 270}. FFmpeg's display matrix angle is counter-clockwise
(``-90`` for a phone clip held upright), the legacy ``rotate`` tag is clockwise.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import sys
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 60.0
# Full decodes are exact but cost time; beyond this many pixels (frames x W x H) only the
# first frame and the last GOP are decoded and the packet count is trusted. 400 Mpx is a
# 10 s 720p clip (~0.5-1 s of decoding), well above a Kinetics clip at 340x256.
FULL_DECODE_MAX_PIXELS = 400_000_000
# Packet timestamp gaps are rounded to the stream time base, so 29.97 fps in a 1/1000
# time base alternates 33/34 ticks; only a spread beyond rounding noise means VFR.
VFR_MIN_SPREAD_TICKS = 2
VFR_REL_TOLERANCE = 0.05
# A file with errors usually repeats one message per damaged packet; a few distinct
# lines are enough to decide and to read.
MAX_DECODE_ERRORS = 5
MAX_ERROR_CHARS = 200


class ProbeError(ValueError):
    """A file that training cannot use; ``reason`` is short enough for a quarantine row."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot use video {self.path}: {reason}")

    def __reduce__(self):
        # Default exception pickling passes only the message back, which breaks the
        # two-argument constructor when the error crosses a process boundary.
        return (ProbeError, (self.path, self.reason))


def probe_video(path: str | os.PathLike, timeout: float | None = DEFAULT_TIMEOUT_S,
                full_decode_max_pixels: int = FULL_DECODE_MAX_PIXELS) -> dict[str, Any]:
    """Return the probe dict of ``path`` or raise ProbeError.

    With a ``timeout`` (seconds) the probe runs in a forked child that is killed when
    late, because a corrupt file can make a demuxer or decoder spin inside C code where
    no Python-level timeout can reach it. ``timeout=None`` probes in this process.
    """
    path = os.path.abspath(os.fspath(path))
    _check_file(path)
    if timeout is None or not _can_fork():
        return _probe(path, full_decode_max_pixels)
    return _probe_in_child(path, timeout, full_decode_max_pixels)


def _can_fork() -> bool:
    return sys.platform != "win32" and "fork" in multiprocessing.get_all_start_methods()


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise ProbeError(path, "file does not exist")
    if not os.path.isfile(path):
        raise ProbeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise ProbeError(path, "file is empty (0 bytes)")


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when its parent dies; a no-op elsewhere.

    A probe worker or probe child outliving a killed builder keeps decoding (and holds
    its pipes open) with nobody to report to. The flag follows the parent *thread* that
    forked us, which for the builder and its pool workers is the main thread.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the flag was set
        os.kill(os.getpid(), signal.SIGKILL)


def _child_main(conn, path: str, max_pixels: int, parent_pid: int) -> None:
    # A handler inherited from the caller (the builder's SIGTERM handler) must not turn a
    # SIGTERM into a "probe crashed" reason for this file; the parent decides what stops.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)
    try:
        conn.send(("ok", _probe(path, max_pixels)))
    except ProbeError as exc:
        conn.send(("error", exc.reason))
    except BaseException as exc:  # anything else still has to reach the parent as a reason
        conn.send(("error", f"probe crashed: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _probe_in_child(path: str, timeout: float, max_pixels: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, path, max_pixels, os.getpid()),
                       daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            raise ProbeError(path, f"probe timed out after {timeout:g} s (file hangs the "
                                   "demuxer/decoder; re-encode it or raise the timeout)")
        try:
            status, payload = recv.recv()
        except EOFError:
            proc.join(1)
            raise ProbeError(path, f"probe process died (exit code {proc.exitcode}); "
                                   "the file crashes FFmpeg") from None
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
    if status != "ok":
        raise ProbeError(path, payload)
    return payload


def _open(path: str):
    import av  # imported lazily so that importing this module stays cheap

    try:
        # The timeout bounds blocking reads (network mounts); CPU hangs are handled by the child.
        return av.open(path, mode="r", timeout=30.0)
    except av.error.FFmpegError as exc:
        raise ProbeError(path, f"not a readable media file, or its header/index is missing "
                               f"(truncated?) ({exc})") from None


def choose_video_stream(container):
    """The stream DALI decodes: the first video stream that is not cover art."""
    return next((s for s in container.streams.video if not _is_attached_pic(s)), None)


def _flag(stream, name: str) -> bool:
    try:
        return bool(stream.disposition & getattr(type(stream.disposition), name))
    except (AttributeError, TypeError):
        return False


def _is_attached_pic(stream) -> bool:
    return _flag(stream, "attached_pic")


def _probe(path: str, max_pixels: int) -> dict[str, Any]:
    logged: list[tuple[int, str, str]] = []
    with _ffmpeg_errors(logged):
        info = _probe_file(path, max_pixels)
    info["decode_errors"] = _short_errors(logged)
    return info


@contextmanager
def _ffmpeg_errors(sink: list):
    """Collect FFmpeg's error-level log lines into ``sink``; restore the log settings after.

    The capture is process-wide (``local=False``) because frame-threaded decoders log from
    their own threads; in the forked probe child this process is the probe alone. An
    in-process probe (``timeout=None``) next to other PyAV threads may also collect their
    lines, and PyAV's log hook has deadlocked threaded decoders before (PyAV issue #751);
    with a timeout the probe runs in a child, so such a hang ends as a timeout.
    """
    import av.logging as avlog

    level, skip = avlog.get_level(), avlog.get_skip_repeated()
    capture = avlog.Capture(local=False)
    avlog.set_level(avlog.ERROR)
    # PyAV drops a line equal to the previous one, even one logged for an earlier file,
    # which would make a second probe of a damaged file look clean.
    avlog.set_skip_repeated(False)
    try:
        with capture:
            yield
    finally:
        avlog.set_skip_repeated(skip)
        avlog.set_level(level)
        sink.extend(capture.logs)


def _short_errors(logged: list[tuple[int, str, str]]) -> list[str]:
    out: list[str] = []
    for _, name, message in logged:
        text = " ".join(message.split())
        line = f"{name}: {text}" if name else text
        line = line[:MAX_ERROR_CHARS]
        if text and line not in out:
            out.append(line)
        if len(out) == MAX_DECODE_ERRORS:
            break
    return out


def _probe_file(path: str, max_pixels: int) -> dict[str, Any]:
    st = os.stat(path)
    container = _open(path)
    try:
        stream = choose_video_stream(container)
        if stream is None:
            raise ProbeError(path, "no video stream in the file")
        info = _stream_header(container, stream)
        packets = _scan_packets(path, container, stream)
        if not packets["count"]:
            raise ProbeError(path, "video stream has no packets (no frames)")
        pixels = packets["count"] * max(1, info["width"]) * max(1, info["height"])
        full = pixels <= max_pixels
    finally:
        container.close()
    if full:
        decoded = _decode_all(path, info["stream_index"])
        num_frames = decoded["frames"]
    else:
        decoded = _decode_ends(path, info["stream_index"], packets)
        num_frames = packets["count"]
    if num_frames == 0:
        raise ProbeError(path, "zero decodable frames")
    if info["header_frames"] > num_frames:
        # The loader trusts the index; DALI decodes such a file to zero frames silently.
        raise ProbeError(path, f"truncated or corrupt: the header claims "
                               f"{info['header_frames']} frames but only {num_frames} decode")

    timing = _timing(info, packets, num_frames)
    rotation = _rotation(decoded["rotation"], info.pop("rotate_tag"))
    swap = rotation in (90, 270)
    info.update(
        rotation=rotation,
        display_width=info["height"] if swap else info["width"],
        display_height=info["width"] if swap else info["height"],
        num_frames=num_frames,
        num_packets=packets["count"],
        decode_check="full" if full else "ends",
        size=st.st_size,
        mtime=st.st_mtime,
        **timing,
    )
    if decoded.get("pix_fmt"):
        info["pix_fmt"] = decoded["pix_fmt"]
    return info


def _stream_header(container, stream) -> dict[str, Any]:
    cc = stream.codec_context
    others = [
        {"index": s.index, "codec": s.codec_context.name, "width": s.codec_context.width,
         "height": s.codec_context.height}
        for s in container.streams.video
    ]
    return {
        "container": container.format.name,
        "codec": cc.name,
        "pix_fmt": cc.pix_fmt,
        "width": int(cc.width or 0),
        "height": int(cc.height or 0),
        "stream_index": stream.index,
        "video_streams": others,
        "header_frames": int(stream.frames or 0),
        "_average_rate": stream.average_rate,
        "_time_base": stream.time_base,
        "_stream_duration": stream.duration,
        "_container_duration": container.duration,
        "rotate_tag": stream.metadata.get("rotate"),
    }


def _scan_packets(path: str, container, stream) -> dict[str, Any]:
    """Count the stream's non-empty packets; demuxing is cheap next to decoding."""
    import av

    pts, count, last_key_pts = [], 0, None
    try:
        for packet in container.demux(stream):
            if packet.size <= 0:  # the demuxer's end-of-stream flush packet
                continue
            if packet.pts is not None:
                pts.append(packet.pts)
                if packet.is_keyframe:
                    last_key_pts = packet.pts
            count += 1
    except av.error.FFmpegError as exc:
        if count == 0:
            raise ProbeError(path, f"cannot read video packets ({exc})") from None
        # A truncated tail still leaves earlier packets; the decode check decides.
    return {"count": count, "pts": sorted(pts), "last_key_pts": last_key_pts}


def _decode_all(path: str, stream_index: int) -> dict[str, Any]:
    import av

    container = _open(path)
    frames, rotation, pix_fmt = 0, None, None
    try:
        stream = container.streams[stream_index]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if frames == 0:
                    rotation, pix_fmt = _frame_rotation(frame), frame.format.name
                frames += 1
        except av.error.FFmpegError as exc:
            # DALI fails the whole batch on such a file, so a decode error anywhere is fatal.
            raise ProbeError(path, f"corrupt or truncated: decoding failed after {frames} "
                                   f"frames ({exc})") from None
    finally:
        container.close()
    return {"frames": frames, "rotation": rotation, "pix_fmt": pix_fmt}


def _decode_ends(path: str, stream_index: int, packets: dict[str, Any]) -> dict[str, Any]:
    """Decode the first frame and the last GOP, for files too big to decode fully.

    The packet count is trusted only if the frame with the largest timestamp really
    decodes: a truncated file keeps its index but loses the data at its end.
    """
    import av

    container = _open(path)
    try:
        stream = container.streams[stream_index]
        stream.thread_type = "AUTO"
        try:
            first = next(iter(container.decode(stream)), None)
            if first is None:
                raise ProbeError(path, "zero decodable frames")
            rotation, pix_fmt = _frame_rotation(first), first.format.name
            last_pts = packets["pts"][-1] if packets["pts"] else None
            if last_pts is not None and packets["last_key_pts"] is not None:
                container.seek(packets["last_key_pts"], stream=stream, backward=True)
                decoded = [f.pts for f in container.decode(stream) if f.pts is not None]
                if not decoded or max(decoded) < last_pts:
                    raise ProbeError(path, "corrupt or truncated: the last frame does not "
                                           "decode")
        except av.error.FFmpegError as exc:
            raise ProbeError(path, f"corrupt or truncated: first/last frames do not decode "
                                   f"({exc})") from None
    finally:
        container.close()
    return {"frames": packets["count"], "rotation": rotation, "pix_fmt": pix_fmt}


def _frame_rotation(frame) -> float | None:
    try:
        return frame.rotation
    except (AttributeError, ValueError):
        return None


def _rotation(matrix_ccw: float | None, rotate_tag: str | None) -> int:
    if matrix_ccw:
        return int(round(-float(matrix_ccw) / 90.0) * 90) % 360
    if rotate_tag:
        try:
            return int(round(float(rotate_tag) / 90.0) * 90) % 360
        except ValueError:
            return 0
    return 0


def _timing(info: dict[str, Any], packets: dict[str, Any], num_frames: int) -> dict[str, Any]:
    tb: Fraction | None = info.pop("_time_base")
    rate: Fraction | None = info.pop("_average_rate")
    stream_duration = info.pop("_stream_duration")
    container_duration = info.pop("_container_duration")
    pts = packets["pts"]
    gaps = [b - a for a, b in zip(pts, pts[1:]) if b > a]
    duration = None
    if tb and len(gaps) >= 1:
        step = statistics.median(gaps)
        duration = float((pts[-1] - pts[0] + step) * tb)
    elif tb and stream_duration:
        duration = float(stream_duration * tb)
    elif container_duration:
        duration = container_duration / 1_000_000
    fps = float(rate) if rate else (num_frames / duration if duration else 0.0)
    if not duration and fps:
        duration = num_frames / fps
    return {"fps": fps, "duration": float(duration or 0.0), "vfr": _is_vfr(gaps)}


def _is_vfr(gaps: list[int]) -> bool:
    if len(gaps) < 2:
        return False
    median = statistics.median(gaps)
    spread = max(gaps) - min(gaps)
    return spread > max(VFR_MIN_SPREAD_TICKS, VFR_REL_TOLERANCE * median)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Probe video files (JSON lines on stdout).")
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    args = parser.parse_args(argv)
    bad = 0
    for p in args.paths:
        try:
            probe = probe_video(p, args.timeout)
            print(json.dumps({"path": str(Path(p).resolve()), "probe": probe}))
        except ProbeError as exc:
            bad += 1
            print(json.dumps({"path": exc.path, "error": exc.reason}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
