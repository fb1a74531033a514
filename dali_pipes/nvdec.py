"""Ask the NVIDIA driver what this GPU's NVDEC decodes (ctypes; no DALI, no torch needed).

`cuvidGetDecoderCaps` answers per (codec, chroma, bit depth) for the GPU of the current CUDA
context; the primary context of the chosen device is made current for the query and released
afterwards, so torch and DALI later find the driver as they left it.

libnvcuvid ships with the driver, not with CUDA or DALI: a container started without the
`video` driver capability has CUDA but no NVDEC, and every NVDEC decode then fails.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

# cudaVideoCodec and cudaVideoChromaFormat values of cuviddec.h (Video Codec SDK).
CODEC_IDS = {"mpeg4": 2, "h264": 4, "mjpeg": 5, "hevc": 8, "vp8": 9, "vp9": 10, "av1": 11}
CHROMA_IDS = {"400": 0, "420": 1, "422": 2, "444": 3}
# CUdevice_attribute values of cuda.h.
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76

NVCUVID_FIX = ("libnvcuvid.so.1 (NVDEC, part of the NVIDIA driver) is not loadable: in a container "
               "add the 'video' driver capability (docker: -e NVIDIA_DRIVER_CAPABILITIES="
               "compute,utility,video, or 'all'); on a host install the full driver. Or decode on "
               "the CPU with data.decode_device=cpu")


class NvdecUnavailable(RuntimeError):
    """The driver, the GPU or libnvcuvid cannot be used; the message says what to do."""


class _Caps(ctypes.Structure):
    # CUVIDDECODECAPS: 3 inputs, 3 reserved words, then the outputs and a reserved tail.
    _fields_ = [("eCodecType", ctypes.c_int), ("eChromaFormat", ctypes.c_int),
                ("nBitDepthMinus8", ctypes.c_uint), ("reserved1", ctypes.c_uint * 3),
                ("bIsSupported", ctypes.c_ubyte), ("nNumNVDECs", ctypes.c_ubyte),
                ("nOutputFormatMask", ctypes.c_ushort), ("nMaxWidth", ctypes.c_uint),
                ("nMaxHeight", ctypes.c_uint), ("nMaxMBCount", ctypes.c_uint),
                ("nMinWidth", ctypes.c_ushort), ("nMinHeight", ctypes.c_ushort),
                ("bIsHistogramSupported", ctypes.c_ubyte), ("nCounterBitDepth", ctypes.c_ubyte),
                ("nMaxHistogramBins", ctypes.c_ushort), ("reserved3", ctypes.c_uint * 10)]


@dataclass
class GpuInfo:
    index: int
    name: str
    capability: tuple
    driver_version: str  # CUDA driver API version, e.g. "13.0"
    formats: dict = field(default_factory=dict)  # (codec, chroma, depth) -> {"supported", "max"}


def _load(name: str):
    try:
        return ctypes.CDLL(name)
    except OSError as exc:
        return exc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise NvdecUnavailable(f"{what} failed with CUDA driver error {rc}")


def nvcuvid_loadable() -> tuple[bool, str]:
    lib = _load("libnvcuvid.so.1")
    return (False, f"{lib}") if isinstance(lib, OSError) else (True, "libnvcuvid.so.1 loaded")


def query(device_index: int = 0,
          formats: Optional[Iterable[tuple]] = None) -> GpuInfo:
    """Name, compute capability, driver version and NVDEC caps of GPU `device_index`.

    `formats`: (codec, chroma, depth) to ask about; default every codec x 4:2:0/4:2:2/4:4:4
    x 8/10 bit. Raises NvdecUnavailable with the cause and the fix.
    """
    cuda = _load("libcuda.so.1")
    if isinstance(cuda, OSError):
        raise NvdecUnavailable(f"no NVIDIA driver (libcuda.so.1: {cuda})")
    cuvid = _load("libnvcuvid.so.1")
    if isinstance(cuvid, OSError):
        raise NvdecUnavailable(f"{NVCUVID_FIX} ({cuvid})")
    _check(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(cuda.cuDeviceGet(ctypes.byref(dev), int(device_index)), f"cuDeviceGet({device_index})")
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    major, minor, version = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev)
    cuda.cuDriverGetVersion(ctypes.byref(version))
    info = GpuInfo(int(device_index), name.value.decode(errors="replace"),
                   (major.value, minor.value),
                   f"{version.value // 1000}.{version.value % 1000 // 10}")
    wanted = list(formats) if formats is not None else [
        (c, ch, d) for c in CODEC_IDS for ch in ("420", "422", "444") for d in (8, 10)]
    # cuda.h maps these names to their _v2 entry points; the unversioned v1 push would want a
    # context current on no thread, and torch has made the primary one current already.
    push, pop, release = (_entry(cuda, name) for name in
                          ("cuCtxPushCurrent", "cuCtxPopCurrent", "cuDevicePrimaryCtxRelease"))
    ctx = ctypes.c_void_p()
    _check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    try:
        _check(push(ctx), "cuCtxPushCurrent")
        try:
            for fmt in wanted:
                info.formats[tuple(fmt)] = _caps(cuvid, *fmt)
        finally:
            pop(ctypes.byref(ctypes.c_void_p()))
    finally:
        release(dev)
    return info


def _entry(lib, name: str):
    """The _v2 driver entry point of `name` where the driver has one (cuda.h's mapping)."""
    return getattr(lib, name + "_v2", None) or getattr(lib, name)


def _caps(cuvid, codec: str, chroma: str, depth: int) -> dict:
    if codec not in CODEC_IDS or chroma not in CHROMA_IDS:
        return {"supported": False, "max": [0, 0]}
    caps = _Caps()
    caps.eCodecType, caps.eChromaFormat = CODEC_IDS[codec], CHROMA_IDS[chroma]
    caps.nBitDepthMinus8 = max(0, int(depth) - 8)
    rc = cuvid.cuvidGetDecoderCaps(ctypes.byref(caps))
    if rc != 0:  # a combination this driver does not know: not decodable here
        return {"supported": False, "max": [0, 0], "error": int(rc)}
    return {"supported": bool(caps.bIsSupported), "nvdecs": int(caps.nNumNVDECs),
            "min": [int(caps.nMinWidth), int(caps.nMinHeight)],
            "max": [int(caps.nMaxWidth), int(caps.nMaxHeight)]}


_CACHE: dict = {}


def supported_formats(device_index: int) -> dict:
    """{(codec, chroma, depth): (min_w, min_h, max_w, max_h)} of what this GPU's NVDEC decodes,
    asked of the driver once per process (files outside the sizes go to the fallback)."""
    if device_index not in _CACHE:
        info = query(device_index)
        _CACHE[device_index] = {f: (*c["min"], *c["max"]) for f, c in info.formats.items()
                                if c["supported"]}
    return _CACHE[device_index]


def container_video_capability() -> Optional[str]:
    """Why a container would lack NVDEC, from NVIDIA_DRIVER_CAPABILITIES; None when fine/unset."""
    caps = os.environ.get("NVIDIA_DRIVER_CAPABILITIES")
    if caps is None:
        return None
    names = {c.strip() for c in caps.split(",")}
    if "all" in names or "video" in names:
        return None
    return (f"NVIDIA_DRIVER_CAPABILITIES={caps} lacks 'video': the container runtime does not "
            "mount libnvcuvid; start the container with compute,utility,video (or all)")
