"""Shared test helpers: manifests of the real clips of ../shared/videos, a small config, clips
that carry their frame indices, the tiny model and batch of the model tests, broken files."""
import json
from pathlib import Path

from config import config_from_dict

T, CROP = 4, 32

# The suite's small demo data (conftest's demo_root, tests/make_golden.py): videos per class
DEMO_DATA = {"videos_per_class": 2, "val_per_class": 1}

# probe fields of the real clips (values from ../shared/videos/README.md and PyAV)
CLIPS = {
    "derived_juggle_vp9.webm": ("vp9", "yuv420p", 640, 360, 72, 24.0),
    "derived_juggle_mjpeg.avi": ("mjpeg", "yuvj420p", 480, 270, 72, 24.0),
    "bbb_vp8_vorbis_1s.webm": ("vp8", "yuv420p", 1280, 720, 24, 24.0),
    "k400_arm_wrestling_340x256.mp4": ("h264", "yuv420p", 340, 256, 280, 28.0),
    "carphone_qcif_176x144.mp4": ("h264", "yuv420p", 176, 144, 120, 29.97),
    "ucf101_apply_eye_makeup_xvid_mp3.avi": ("mpeg4", "yuv420p", 320, 240, 164, 25.0),
    "derived_juggle_portrait_360x640.mp4": ("h264", "yuv420p", 360, 640, 72, 24.0),
}


def probe(codec, pix_fmt, w, h, n, fps, path):
    return {"container": "x", "codec": codec, "pix_fmt": pix_fmt, "width": w, "height": h,
            "rotation": 0, "num_frames": n, "fps": fps, "duration": n / fps, "vfr": False,
            "stream_index": 0, "size": Path(path).stat().st_size, "mtime": 0.0}


def write_manifest(d: Path, entries):
    """entries: [(path, label, probe dict)]"""
    d.mkdir(parents=True, exist_ok=True)
    classes = sorted({f"c{lab}" for _, lab, _ in entries} | {"c0", "c1", "c2"})
    rows = [{"path": str(p), "label": lab, "class_name": f"c{lab}", "start": None, "end": None,
             "probe": pr} for p, lab, pr in entries]
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "classes.json").write_text(json.dumps(classes))
    return d


def entry(videos, name, label):
    path = videos / name
    return (path, label, probe(*CLIPS[name], path))


def make_cfg(tmp_path, datasets, **data):
    """A small CPU config; one clip per video (num_sample 1) unless a test asks for copies."""
    raw = {"data": {"datasets": datasets, "batch_size": 4, "num_threads": 2, "prefetch": 2,
                    "train_scale": [36, 44], "test_scale": 36, "crop_size": CROP,
                    "rand_aug_n": 2, "decode_device": "cpu", "fallback_workers": 2,
                    "num_sample": 1, **data},
           "train": {"seed": 3}}
    return config_from_dict(raw, check_paths=True)




# ---------------------------------------------------------------- clips that carry their indices

def grey_level(frame_index: int) -> int:
    """Frame i of an indexed clip is grey 8 + 5i: a decoder returning another frame is off by 5."""
    return 8 + 5 * frame_index


def write_indexed_clip(path, codec: str, frames: int = 40, size: int = 64, clip_id: int = 0,
                       fps: int = 25, pix_fmt: str = "yuv420p") -> str:
    """A clip whose frame i is grey 8 + 5i with a block in the top-left corner whose red level
    20 + 30 * clip_id names the clip."""
    import av
    import numpy as np

    assert grey_level(frames - 1) <= 250 and 20 + 30 * clip_id <= 250
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = pix_fmt
        stream.options = {"g": "8", "bf": "2"} if codec in ("libx264", "libx265", "h264", "hevc") else {}
        if codec in ("libx264", "libx265"):
            stream.options["crf"] = "10"
        if codec == "libx265":
            stream.options["x265-params"] = "log-level=error"
        if codec in ("mpeg4", "mjpeg"):
            stream.bit_rate = 4_000_000  # the default rate blurs neighbouring grey levels
        for i in range(frames):
            img = np.full((size, size, 3), grey_level(i), np.uint8)
            img[: size // 4, : size // 4] = (20 + 30 * clip_id, 128, 128)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def to_pixels(video):
    """(3, T, H, W) normalised clip of the loaders (Kinetics mean/std) -> (T, H, W, 3) uint8."""
    import numpy as np

    x = video.float().cpu().permute(1, 2, 3, 0).numpy() * 57.375 + 114.75
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def frame_indices_of(clip) -> "list[int]":
    """Frame indices a decoded (T, H, W, 3) uint8 clip holds, read from its grey level outside
    the corner block."""
    import numpy as np

    size = clip.shape[1]
    grey = clip[:, size // 2:, size // 2:].reshape(len(clip), -1).mean(axis=1)
    return [int(i) for i in np.rint((grey - 8) / 5)]


def clip_id_of(frame) -> int:
    import numpy as np

    size = frame.shape[0]
    return int(np.rint((frame[2: size // 4 - 2, 2: size // 4 - 2, 0].mean() - 20) / 30))


def timm_data_module(name: str):
    """timm/data/<name>.py of the installed timm, loaded on its own: the package's __init__
    imports torchvision, whose registry wheels do not load beside the CPU torch. Skips the
    test when timm is absent (requirements.txt installs it for the tests)."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install -r requirements.txt)")
    path = Path(spec.submodule_search_locations[0]) / "data" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"timm_data_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the tiny model and batch

TINY_HEADS = {"head_hidden": 32, "head_dropout": 0.0, "expander_hidden": 32, "expander_dim": 16}


def tiny_backbone(**overrides):
    """mvitv2_tiny (8 frames, 64 px, 5 blocks) in eval mode; overrides as build_backbone's."""
    from models import build_backbone

    return build_backbone("mvitv2_tiny", **overrides).eval()


def tiny_model(num_classes: dict, seed: int = 0, backbone: "dict | None" = None, **heads):
    """MultiTrainModel on mvitv2_tiny with small heads (TINY_HEADS, overridable), weights drawn
    after torch.manual_seed(seed), in training mode."""
    import torch

    from models import MultiTrainModel, build_backbone

    torch.manual_seed(seed)
    return MultiTrainModel(build_backbone("mvitv2_tiny", **(backbone or {})), num_classes,
                           **{**TINY_HEADS, **heads})


def tiny_clips(b: int = 2, seed: int = 0):
    """(b, 3, 8, 64, 64) random clips of the tiny backbone's input size."""
    import torch

    return torch.randn(b, 3, 8, 64, 64, generator=torch.Generator().manual_seed(seed))


def tiny_batch(num_classes: dict, b: int = 6, seed: int = 0, masks=None):
    """(clips, targets, masks) for MultiTrainLoss: sample i belongs to dataset i mod N (or the
    given (b, N) masks), targets are label-smoothed one-hots (0.9 + 0.1 / C on the label)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    names = list(num_classes)
    if masks is None:
        masks = torch.nn.functional.one_hot(torch.arange(b) % len(names), len(names)).double()
    targets = {n: torch.nn.functional.one_hot(torch.randint(0, c, (b,), generator=g), c).double()
               * 0.9 + 0.1 / c for n, c in num_classes.items()}
    return tiny_clips(b, seed), targets, torch.as_tensor(masks, dtype=torch.float64)


def linear_resample(table, n: int):
    """Rows of `table` (L, C) resampled to n rows by linear interpolation between the centres
    of the old rows, ends held (PyTorch's and PySlowFast's "linear", align_corners False),
    written out by hand as a reference."""
    import numpy as np

    table = np.asarray(table)
    length = table.shape[0]
    rows = []
    for i in range(n):
        x = max((i + 0.5) * length / n - 0.5, 0.0)  # position in the old table
        lo = min(int(np.floor(x)), length - 1)
        hi = min(lo + 1, length - 1)
        rows.append((1 - (x - lo)) * table[lo] + (x - lo) * table[hi])
    return np.stack(rows)


# -------------------------------------------------------------------------- broken files

BREAKS = ("truncated", "garbage", "text", "empty", "deleted", "directory", "fifo")


def break_file(path, how: str, src=None, fraction: float = 0.5, seed: int = 0) -> Path:
    """Makes `path` a broken video and returns it. `src`: the good file it starts from
    (default: `path` itself, broken in place, e.g. after a manifest listed it).

    truncated: the first `fraction` of src's bytes (the header survives, frames go missing);
    garbage: src with 4 KiB of random bytes written at `fraction` of its size (FFmpeg logs
    errors and decodes on); text: a text file; empty: 0 bytes; deleted: no file at all;
    directory: a directory of that name; fifo: a named pipe (opening it blocks).
    """
    import os
    import random

    path = Path(path)
    data = Path(src or path).read_bytes() if how in ("truncated", "garbage") else b""
    if how not in BREAKS:
        raise ValueError(f"unknown break {how!r}; one of {BREAKS}")
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "truncated":
        path.write_bytes(data[: int(len(data) * fraction)])
    elif how == "garbage":
        data = bytearray(data)
        at = int(len(data) * fraction)
        data[at: at + 4096] = random.Random(seed).randbytes(4096)
        path.write_bytes(bytes(data))
    elif how == "text":
        path.write_text("this is not a video\n" * 50)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "directory":
        path.mkdir()
    elif how == "fifo":
        os.mkfifo(path)
    return path

