"""Tell a fault of the machine from a fault of a file.

DALI fails a whole batch with one exception whatever went wrong. A file is quarantined only for
an error that follows it (it fails alone, again, in a fresh pipeline, while a file that decoded
before still decodes); errors of the machine (memory, a missing NVDEC library, a GPU that cannot
decode the format, a broken CUDA context, too many open files) stop the run with the cause and
the fix instead, and never write a quarantine row.
"""
from __future__ import annotations

import re
from typing import Optional

from dali_pipes.nvdec import NVCUVID_FIX


class InfrastructureError(RuntimeError):
    """A fault of the machine or the setup, not of a video; the message names cause and fix."""


# (pattern over the error text, cause, fix); the first match wins.
_RULES = [
    (r"out of memory|CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation|std::bad_alloc"
     r"|MemoryError|Cannot allocate memory",
     "out of memory while decoding or augmenting",
     "lower data.batch_size, data.num_sample, data.num_threads or data.prefetch, or free "
     "memory on the device"),
    (r"libnvcuvid|nvcuvid\.so|Failed to load.*cuvid|NVCUVID",
     "the NVDEC library is missing", NVCUVID_FIX),
    # Not "Failed to create video decoder": DALI's CPU decoder says that of a corrupt file.
    (r"cuvidCreateDecoder|CUDA_ERROR_NOT_SUPPORTED|Codec .* is not supported"
     r"|[Uu]nsupported codec|not supported by NVDEC",
     "the decoder cannot take this video format (a routing gap, not a broken file)",
     "run `python -m dali_pipes.doctor --cfg <config>` to see the routing; report the format "
     "(codec, pixel format) and set data.decode_device=cpu meanwhile"),
    # Named context-wide failures only: DALI wraps the per-file NVDEC calls in CUDA_CALL too,
    # so an unknown CUDA_ERROR_* is left to the canary (does a file that decoded still decode?).
    (r"illegal memory access|unspecified launch failure|device-side assert|CUDA_ERROR_ILLEGAL_"
     r"|CUDA_ERROR_LAUNCH_FAILED|CUDA_ERROR_ECC_UNCORRECTABLE|CUDA_ERROR_CONTEXT_IS_DESTROYED"
     r"|context is destroyed|NCCL error",
     "the CUDA context is broken (every later GPU call fails)",
     "restart the run; if it recurs, check the GPU with nvidia-smi and the driver logs (dmesg)"),
    (r"Too many open files|EMFILE",
     "the process ran out of file descriptors", "raise the open-file limit (ulimit -n 65536)"),
    (r"No space left on device|ENOSPC",
     "a disk is full", "free space where the run writes (train.output_dir, /tmp, /dev/shm)"),
]


def classify(text: str) -> Optional[tuple[str, str]]:
    """(cause, fix) when `text` describes a fault of the machine, else None."""
    for pattern, cause, fix in _RULES:
        if re.search(pattern, text):
            return cause, fix
    return None


def raise_if_infrastructure(exc: BaseException, where: str = "") -> None:
    """Re-raises `exc` as InfrastructureError (cause and fix) when it is the machine's fault."""
    if isinstance(exc, InfrastructureError):
        raise exc
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    found = classify(f"{type(exc).__name__}: {exc}")
    if found:
        cause, fix = found
        raise InfrastructureError(f"{where}{cause}: {short_error(exc)}. Fix: {fix}") from exc


def short_error(exc: BaseException) -> str:
    """The informative line of a (long, multi-line) DALI or FFmpeg error."""
    text = str(exc)
    # DALI: "Critical error ... Error in CPU operator `...` ... traceback ... encountered:
    # <the cause> C++ context: ..."; the cause is the line that matters.
    body = text.split("encountered:", 1)[1] if "encountered:" in text else text
    noise = ("Critical error", "Current pipeline object", "C++ context")
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(noise)]
    line = (useful or lines or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {line}"[:400]
