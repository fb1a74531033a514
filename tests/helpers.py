"""Shared test helpers: manifests of the real clips of ../shared/videos, a small config."""
import json
from pathlib import Path

from config import config_from_dict

T, CROP = 4, 32

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
    raw = {"data": {"datasets": datasets, "batch_size": 4, "num_threads": 2, "prefetch": 2,
                    "train_scale": [36, 44], "test_scale": 36, "crop_size": CROP,
                    "rand_aug_n": 2, "decode_device": "cpu", "fallback_workers": 2, **data},
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
