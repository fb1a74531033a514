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


