"""Every decoder path returns exactly the frames asked for, in the sampler's row order.

The clips carry their identity in their pixels (frame i is grey 8 + 5i, a corner block names
the clip), so a decoder that returns a neighbouring frame, a padded frame, or another sample's
clip in a batch row is caught by value, on DALI's CPU decoder (VP8, VP9, MJPEG), the PyAV
fallback (H.264, HEVC, MPEG-4, AV1) and, where a GPU is present, NVDEC (MJPEG, and AV1 on GPUs
whose NVDEC lacks it, still through the fallback).
"""
import pytest
import torch

from config import config_from_dict
from dali_pipes.loader import build_eval_loader, build_train_loader
from dali_pipes.manifest import build_manifest
from dali_pipes.sampling import test_clip_indices
from helpers import clip_id_of, frame_indices_of, to_pixels, write_indexed_clip

# (file, encoder, pixel format, frames); the list index is the clip id and the label
CLIPS = [("vp8.webm", "libvpx", "yuv420p", 40), ("vp9_short.webm", "libvpx-vp9", "yuv420p", 12),
         ("mjpeg.avi", "mjpeg", "yuvj420p", 40), ("h264.mp4", "libx264", "yuv420p", 40),
         ("hevc.mp4", "libx265", "yuv420p", 40), ("mpeg4.avi", "mpeg4", "yuv420p", 40),
         ("av1.mp4", "libsvtav1", "yuv420p", 40)]
T, STRIDE, SIZE = 8, 5, 64  # 36-frame span: the 12-frame clip repeats its last frame
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    for clip_id, (name, codec, pix_fmt, n) in enumerate(CLIPS):
        write_indexed_clip(root / name, codec, frames=n, size=SIZE, clip_id=clip_id, pix_fmt=pix_fmt)
    (root / "list.txt").write_text("".join(f"{name} {i}\n" for i, (name, *_) in enumerate(CLIPS)))
    summary = build_manifest("list", root / "list.txt", root, root / "manifest", progress=False)
    assert summary["num_quarantined"] == 0
    return root / "manifest"


def config(manifest, **data):
    raw = {"data": {"datasets": [{"name": "clips", "manifest": str(manifest),
                                  "val_manifest": str(manifest), "stride": STRIDE, "flip": False,
                                  "test_views": [2, 1]}],
                    "batch_size": 7, "num_threads": 1, "crop_size": SIZE,
                    "train_scale": [SIZE, SIZE], "test_scale": SIZE, "rand_aug_n": 0,
                    "fallback_workers": 1, **data}}
    return config_from_dict(raw)


@pytest.mark.parametrize("device", DEVICES)
def test_training_batches_hold_the_sampled_frames_of_the_right_clip(indexed, device):
    """Every row, both augmented copies of each video (data.num_sample 2, the recipe's)."""
    loader = build_train_loader(config(indexed, num_sample=2), T, SIZE, device=torch.device(device))
    order = {int(s): (int(d), int(v)) for d, v, s in loader.sampler.global_order(0)}
    rows = 0
    for batch in loader.epoch(0):
        for k, sid in enumerate(batch.sample_ids.tolist()):
            d, v = order[sid]
            want = loader.make_item(0, d, v, sid).indices.tolist()
            frames = to_pixels(batch.video[k])
            assert frame_indices_of(frames) == want, (CLIPS[v][0], sid)
            assert clip_id_of(frames[0]) == v == batch.labels[k].item()
            rows += 1
    loader.close()
    assert rows == 2 * len(CLIPS) and loader.num_quarantined == 0


@pytest.mark.parametrize("device", DEVICES)
def test_eval_views_hold_their_clips_frames(indexed, device):
    loader = build_eval_loader(config(indexed), "clips", T, SIZE, device=torch.device(device))
    seen = 0
    for batch in loader:
        for video, v in zip(batch.video, batch.video_ids.tolist()):  # (V, 3, T, H, W)
            n = CLIPS[v][3]
            want = test_clip_indices(n, T, STRIDE, 2, fps=25, target_fps=30)  # (2, T): 2 views
            for view in range(2):
                frames = to_pixels(video[view])
                assert frame_indices_of(frames) == want[view].tolist(), (CLIPS[v][0], view)
                assert clip_id_of(frames[0]) == v
            seen += 1
    loader.close()
    assert seen == len(CLIPS) and not loader.failed
