"""A clip with a rotation in its display matrix comes out upright, end to end: probe -> manifest
-> loader -> PyAV fallback -> DALI training and evaluation graphs.

derived_juggle_rot90_640x360.mp4 stores landscape 640x360 frames with a display matrix of -90
degrees (counter-clockwise); players (FFmpeg's autorotate, transpose=clock) show it turned 90
degrees clockwise, as a 360x640 portrait. decord, an independent decoder, returns the frames
that way, so it is the reference here. A sign error anywhere (probe, decoder) turns the clip the
other way, 180 degrees from upright: each test also checks the clip is far from that turn.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import config_from_dict
from dali_pipes.loader import build_eval_loader, build_train_loader, display_size
from dali_pipes.manifest import build_manifest
from helpers import to_pixels

NAME = "derived_juggle_rot90_640x360.mp4"
T, CROP, TEST_SCALE = 4, 32, 48


@pytest.fixture(scope="module")
def rotated(shared_videos, tmp_path_factory):
    """Manifest of the rotated clip, probed for real (so the probe's rotation is under test)."""
    root = tmp_path_factory.mktemp("rotated")
    (root / "list.txt").write_text(f"{NAME} 0\n")
    summary = build_manifest("list", root / "list.txt", shared_videos, root / "m", progress=False)
    assert summary["num_quarantined"] == 0
    return root / "m"


def config(manifest):
    return config_from_dict({"data": {
        "datasets": [{"name": "rot", "manifest": str(manifest), "val_manifest": str(manifest),
                      "stride": 8, "test_views": [1, 3]}],
        "batch_size": 1, "num_threads": 1, "crop_size": CROP, "train_scale": [40, 48],
        "test_scale": TEST_SCALE, "rand_aug_n": 0, "fallback_workers": 1}})


def reference(shared_videos, indices) -> np.ndarray:
    """(T, 640, 360, 3) display-oriented frames from decord."""
    decord = pytest.importorskip("decord")
    return decord.VideoReader(str(shared_videos / NAME)).get_batch(list(indices)).asnumpy()


def resized(frames: np.ndarray, size, antialias: bool) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return x.permute(0, 2, 3, 1).numpy()


def test_training_clip_is_upright_with_height_and_width_swapped(rotated, shared_videos):
    loader = build_train_loader(config(rotated), T, CROP)
    assert loader.records[0][0]["probe"]["rotation"] == 90
    assert display_size(loader.records[0][0]["probe"]) == (640, 360)  # portrait, as shown
    item = loader.make_item(0, 0, 0, 0)
    # The crop window is drawn on the portrait frame: the short side (width) is scaled to the
    # jittered size, so the square window spans 640/360 times more of the width than of the
    # height (a landscape frame would give 360/640).
    dy, dx = item.params["roi_end"] - item.params["roi_start"]
    assert 1.65 < dx / dy < 1.8, (dx, dy)
    # The whole frame squeezed into the crop, unflipped: compared pixel for pixel with decord.
    item.params.update(roi_start=np.zeros(2, np.float32), roi_end=np.ones(2, np.float32),
                       mirror=np.array(0, np.int32))
    batch = loader.build_batch(0, 0, None, items=[item])
    loader.close()
    assert loader.num_quarantined == 0
    got = to_pixels(batch.video[0]).astype(np.float32)  # (T, CROP, CROP, 3)
    ref = reference(shared_videos, item.indices)
    upright = np.abs(got - resized(ref, (CROP, CROP), antialias=False)).mean()
    turned = np.abs(got - resized(ref[:, ::-1, ::-1], (CROP, CROP), antialias=False)).mean()
    assert upright < 1.0 and turned > 20, (upright, turned)  # measured 0.25 and 50


def test_eval_crops_run_along_the_displayed_height(rotated, shared_videos):
    """Three crops of the portrait clip: top, centre, bottom (the long side once rotated),
    centred across its width, from frames whose short side was resized to test_scale."""
    loader = build_eval_loader(config(rotated), "rot", T, CROP)
    item = loader.make_item(0)
    anchors = {k: float(v) for k, v in item.params.items()}
    assert anchors == {"crop_y0": 0.0, "crop_x0": 0.5, "crop_y1": 0.5, "crop_x1": 0.5,
                       "crop_y2": 1.0, "crop_x2": 0.5}
    (batch,) = list(loader)
    loader.close()
    assert not loader.failed and batch.video.shape == (1, 3, 3, T, CROP, CROP)
    height = round(640 * TEST_SCALE / 360)  # 85: the long side after the resize
    ref = reference(shared_videos, item.indices)
    big = resized(ref, (height, TEST_SCALE), antialias=True)
    turned = resized(ref[:, ::-1, ::-1], (height, TEST_SCALE), antialias=True)
    x0 = (TEST_SCALE - CROP) // 2
    for view, anchor in enumerate((0.0, 0.5, 1.0)):
        y0 = int(anchor * (height - CROP) + 0.5)  # 0, 27, 53
        got = to_pixels(batch.video[0, view]).astype(np.float32)
        upright = np.abs(got - big[:, y0:y0 + CROP, x0:x0 + CROP]).mean()
        wrong = np.abs(got - turned[:, y0:y0 + CROP, x0:x0 + CROP]).mean()
        assert upright < 3.0 and wrong > 20, (view, upright, wrong)  # measured <= 1.2 and >= 35
