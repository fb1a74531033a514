"""Which decoder reads each video: NVDEC through DALI, DALI's CPU decoder, or the PyAV fallback.

A file sent to a decoder that cannot read it fails its whole batch, so the route is decided from
the probe before training, from what each decoder really takes:

- DALI 2.4's CPU decoder: VP8, VP9 and MJPEG only (H.264/HEVC left its CPU build in 2.1.1).
- DALI 2.4's GPU decoder (FramesDecoderGpu): H.264, HEVC, VP8, VP9, MPEG-4 and AV1 streams; not
  MJPEG, whatever the operator's docstring says.
- NVDEC itself, per GPU generation (NVIDIA's NVDEC application note, Video Codec SDK 13.0,
  table "NVDEC Hardware Capabilities"): AV1 only on GA10x/Ada and Blackwell (not on Volta,
  Turing, the A100's GA100 or Hopper); H.264 High10/High422 only on Blackwell; HEVC 4:4:4 from
  Turing on. When a GPU is present the driver is asked instead (`nvdec.supported_formats`).
- What DALI 2.4 hands back: only 8-bit 4:2:0 output is verified on our side; 10-bit and
  4:2:2/4:4:4 streams go to the fallback until a GPU run shows DALI outputs them correctly
  (`DALI_VERIFIED`).

Both DALI decoders return the stored picture of the first video stream, so rotated files and
files whose usable stream is not the first go to PyAV, which turns frames upright.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

NVDEC, DALI_CPU, PYAV = "nvdec", "dali_cpu", "pyav"
ROUTES = (NVDEC, DALI_CPU, PYAV)

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mpeg4", "av1"})

# (codec, chroma, bit depth) that DALI 2.4 is known to decode correctly on NVDEC.
DALI_VERIFIED = frozenset((c, "420", 8) for c in DALI_GPU_CODECS)

# Planning tables for `--gpu-arch` when no GPU is at hand: what NVDEC decodes per generation
# (NVDEC application note, SDK 13.0), restricted to the codecs DALI's GPU decoder accepts.
_BASE = {("h264", "420", 8), ("mpeg4", "420", 8), ("vp8", "420", 8),
         ("hevc", "420", 8), ("hevc", "420", 10), ("vp9", "420", 8), ("vp9", "420", 10)}
_HEVC444 = {("hevc", "444", 8), ("hevc", "444", 10)}
_AV1 = {("av1", "420", 8), ("av1", "420", 10)}
NVDEC_BY_ARCH = {
    "volta": frozenset(_BASE),
    "turing": frozenset(_BASE | _HEVC444),
    "ampere": frozenset(_BASE | _HEVC444),  # the A100 (GA100); GA10x cards decode AV1: "ada"
    "ada": frozenset(_BASE | _HEVC444 | _AV1),
    "hopper": frozenset(_BASE | _HEVC444),
    "blackwell": frozenset(_BASE | _HEVC444 | _AV1 | {("h264", "420", 10), ("h264", "422", 8),
                                                      ("h264", "422", 10)}),
}


def arch_of(major: int, minor: int) -> str:
    """GPU generation of a CUDA compute capability."""
    if major >= 10:
        return "blackwell"
    if major == 9:
        return "hopper"
    if major == 8:
        return "ada" if minor >= 9 else "ampere"
    if major == 7:
        return "turing" if minor >= 5 else "volta"
    return "volta"  # older GPUs: no better table; the driver query decides on a real device


_PIX = re.compile(r"^(?:yuvj?|yuva|nv|p)(\d{3})?p?(\d+)?")


def video_format(probe: dict) -> tuple[str, str, int]:
    """(codec, chroma "420"/"422"/"444"/"400", bit depth) of a probed stream, from its pix_fmt."""
    codec = str(probe.get("codec", "")).lower()
    pix = str(probe.get("pix_fmt") or "yuv420p").lower()
    if pix.startswith("gray"):
        depth = re.search(r"(\d+)", pix)
        return codec, "400", int(depth.group(1)) if depth else 8
    if pix in ("nv12", "nv21"):
        return codec, "420", 8
    if pix.startswith("p010"):
        return codec, "420", 10
    m = _PIX.match(pix)
    if not m or not m.group(1):
        return codec, pix, 8  # rgb24, bgr0, ...: none of our decoders' YUV paths
    depth = m.group(2)
    return codec, m.group(1), int(depth) if depth else 8


def route(probe: dict, decode_device: str,
          nvdec_formats: Optional[Iterable[tuple]] = None) -> tuple[str, str]:
    """(route, reason) of one probed file for decode_device "cpu" or "mixed" (NVDEC).

    `nvdec_formats`: the (codec, chroma, depth) this GPU's NVDEC decodes (NVDEC_BY_ARCH), or a
    mapping of them to (min_w, min_h, max_w, max_h) from the driver; None means every 4:2:0
    8-bit format DALI's GPU decoder accepts.
    """
    rotation = int(probe.get("rotation", 0) or 0) % 360
    if rotation:
        return PYAV, f"rotation {rotation}"
    if int(probe.get("stream_index", 0) or 0) != _first_video_stream(probe):
        return PYAV, "not the first video stream"
    codec, chroma, depth = video_format(probe)
    fmt = f"{codec} {_chroma_name(chroma)} {depth}-bit"
    if decode_device == "cpu":
        if codec not in CPU_CODECS:
            return PYAV, f"{codec or 'unknown codec'}: not in DALI's CPU decoder"
        if chroma not in ("420", "422", "444") or depth != 8:
            return PYAV, f"{fmt}: DALI CPU output unverified"
        return DALI_CPU, fmt
    if codec not in DALI_GPU_CODECS:
        return PYAV, f"{codec or 'unknown codec'}: not in DALI's GPU decoder"
    hw = DALI_VERIFIED if nvdec_formats is None else nvdec_formats
    if (codec, chroma, depth) not in hw:
        return PYAV, f"{fmt}: not decoded by this GPU's NVDEC"
    if (codec, chroma, depth) not in DALI_VERIFIED:
        return PYAV, f"{fmt}: DALI NVDEC output unverified"
    limits = hw.get((codec, chroma, depth)) if isinstance(hw, dict) else None
    w, h = int(probe.get("width", 0) or 0), int(probe.get("height", 0) or 0)
    if limits and w and h and not (limits[0] <= w <= limits[2] and limits[1] <= h <= limits[3]):
        return PYAV, (f"{w}x{h}: outside this GPU's NVDEC sizes for {codec} "
                      f"({limits[0]}x{limits[1]} to {limits[2]}x{limits[3]})")
    return NVDEC, fmt


def _chroma_name(chroma: str) -> str:
    return f"{chroma[0]}:{chroma[1]}:{chroma[2]}" if len(chroma) == 3 and chroma.isdigit() else chroma


def _first_video_stream(probe: dict) -> int:
    others = [s.get("index", 0) for s in probe.get("video_streams", []) or []]
    return min([int(probe.get("stream_index", 0) or 0)] + [int(i) for i in others])


def summarize(routes: Iterable[tuple[str, str]]) -> dict:
    """{"summary": {route: count}, "reasons": {route: {reason or codec: count}}} of (route,
    reason) pairs: why a file goes to PyAV, which codecs the DALI decoders take."""
    summary = {r: 0 for r in ROUTES}
    reasons: dict = {r: {} for r in ROUTES}
    for r, why in routes:
        summary[r] += 1
        key = why if r == PYAV else why.split(" ")[0]  # the codec, for decoded formats
        reasons[r][key] = reasons[r].get(key, 0) + 1
    return {"summary": summary, "reasons": reasons}
