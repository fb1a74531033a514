"""DALI graphs, the PyAV fallback decoder and clip-level augmentation (CPU)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_pipes import pipeline as P
from dali_pipes.decode_av import decode_frames, needs_fallback
from dali_pipes.sampling import sample_rng

VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
MEAN, STD = (114.75,) * 3, (57.375,) * 3


def video(name: str) -> str:
    path = VIDEOS / name
    if not path.is_file():
        pytest.skip(f"real test clip {path} is absent (tests read ../shared/videos)")
    return str(path)


def dali_decode(path: str, indices) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        enc = fn.external_source(name="e", dtype=types.UINT8, ndim=1)
        return fn.decoders.video(enc, frames=list(map(int, indices)), device="cpu")

    p = pipe()
    p.build()
    p.feed_input("e", [np.fromfile(path, dtype=np.uint8)])
    return np.array(p.run()[0].as_array()[0])


def pyav_all(path: str) -> list:
    import av
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize("name", ["derived_juggle_vp9.webm", "derived_juggle_mjpeg.avi",
                                  "bbb_vp8_vorbis_1s.webm"])
def test_dali_cpu_frames_match_pyav(name):
    path = video(name)
    idx = [7, 0, 7, 3, 20, 1]  # out of order with a repeat
    d = dali_decode(path, idx)
    a = decode_frames(path, idx)
    assert d.shape == a.shape and d.dtype == np.uint8
    diff = np.abs(d.astype(np.int16) - a.astype(np.int16)).mean(axis=(1, 2, 3))
    assert diff.max() < 3.0, diff
    # and the frames are the requested ones, not neighbours
    assert np.abs(a[0].astype(int) - a[3].astype(int)).mean() > 1.0


@pytest.mark.parametrize("name", ["k400_arm_wrestling_340x256.mp4",
                                  "ucf101_apply_eye_makeup_xvid_mp3.avi",
                                  "carphone_qcif_176x144.mp4",
                                  "derived_juggle_portrait_360x640.mp4"])
def test_fallback_frame_exact(name):
    path = video(name)
    ref = pyav_all(path)
    idx = [len(ref) - 1, 2, 2, 0, 9, len(ref) + 5]  # past the end repeats the last frame
    got = decode_frames(path, idx)
    want = np.stack([ref[min(i, len(ref) - 1)] for i in idx])
    assert np.array_equal(got, want)


def test_fallback_applies_rotation():
    path = video("derived_juggle_rot90_640x360.mp4")
    upright = decode_frames(path, [0], rotation=90)
    stored = decode_frames(path, [0])
    assert upright.shape[1:3] == stored.shape[2:0:-1]
    assert np.array_equal(upright[0], np.rot90(stored[0], k=-1))


def test_needs_fallback():
    vp9 = {"codec": "vp9", "pix_fmt": "yuv420p"}
    h264 = {"codec": "h264", "pix_fmt": "yuv420p"}
    assert not needs_fallback(vp9, "cpu") and needs_fallback(h264, "cpu")
    assert not needs_fallback(h264, "mixed")
    assert needs_fallback({"codec": "h264", "pix_fmt": "yuv444p"}, "mixed")
    assert needs_fallback({"codec": "prores", "pix_fmt": "yuv420p"}, "mixed")
    assert needs_fallback({**vp9, "rotation": 90}, "cpu")


# ------------------------------------------------------------------- training graph ---

def _train_runner(rand_aug=True, crop=32):
    return P.GraphRunner(P.GraphSpec(P.TRAIN, P.FRAMES, "cpu", crop, MEAN, STD, rand_aug), 4, 2, None)


def _params(seed, crop=32, n=2, m=9.0, flip=True, h=48, w=64):
    return P.draw_train_params(sample_rng(seed, 0, 0), h, w, crop, "scale", [40, 48], [0.08, 1],
                               flip, n, m, 0.5)


def _feed(frames_list, params_list):
    inputs = {"frames": frames_list}
    for p in params_list:
        for k, v in p.items():
            inputs.setdefault(k, []).append(v)
    return inputs


def _static_clip(seed, t=4, h=48, w=64):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(img, (t, h, w, 3)))


def test_randaugment_one_transform_per_clip_and_seeds_differ():
    r = _train_runner()
    clip = _static_clip(0)
    params = [_params(s, n=4) for s in range(4)]
    out = r.run(_feed([clip] * 4, params))  # (4, 3, T, 32, 32)
    assert out.shape == (4, 3, 4, 32, 32)
    for b in range(4):
        for f in range(1, 4):
            assert torch.equal(out[b, :, f], out[b, :, 0])  # identical frames stay identical
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[2], out[3])


def test_flip_all_or_nothing():
    r = _train_runner(rand_aug=False)
    clip = np.random.default_rng(1).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    p = _params(3, n=0)
    p0 = {**p, "mirror": np.array(0, np.int32)}
    p1 = {**p, "mirror": np.array(1, np.int32)}
    out = r.run(_feed([clip, clip], [p0, p1]))
    assert torch.equal(out[1], out[0].flip(-1))  # every frame flipped, none left out
    noflip = _params(3, n=0, flip=False)
    assert all(int(_params(s, n=0, flip=False)["mirror"]) == 0 for s in range(20))
    assert {int(_params(s, n=0)["mirror"]) for s in range(20)} == {0, 1}
    assert int(noflip["mirror"]) == 0


def test_output_arrays_are_reused_only_when_released():
    r = _train_runner(rand_aug=False)
    clip = np.random.default_rng(5).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    feed = _feed([clip], [_params(0, n=0)])
    first = r.run(feed)
    kept = first[0, :, 1]  # a view keeps the whole array alive
    snapshot = kept.clone()
    second = r.run(_feed([255 - clip], [_params(0, n=0)]))
    assert second.data_ptr() != first.data_ptr()
    del first
    assert torch.equal(kept, snapshot)  # the held batch was not overwritten
    ptr = second.data_ptr()
    del second
    assert r.run(feed).data_ptr() == ptr  # a released array is filled again


def test_same_sample_id_same_clip():
    from dali_pipes.loader import TrainLoader  # noqa: F401 - the loader draws like this
    r = P.GraphRunner(P.GraphSpec(P.TRAIN, P.BYTES, "cpu", 32, MEAN, STD, True), 4, 2, None)
    path = video("derived_juggle_vp9.webm")
    enc = np.fromfile(path, dtype=np.uint8)
    def inputs(ids):
        feed = {"encoded": [enc] * len(ids), "indices": [np.arange(0, 8, 2, dtype=np.int32)] * len(ids)}
        for i in ids:
            p = P.draw_train_params(sample_rng(5, 1, i), 360, 640, 32, "scale", [40, 48],
                                    [0.08, 1], True, 4, 7.0, 0.5)
            for k, v in p.items():
                feed.setdefault(k, []).append(v)
        return feed
    a = r.run(inputs([10, 11]))
    b = r.run(inputs([11, 10]))
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])


def test_rrc_params_inside_frame():
    for s in range(30):
        p = P.draw_train_params(sample_rng(s, 0, 0), 240, 320, 64, "rrc", [0, 0], [0.08, 1.0],
                                True, 0, 0, 0)
        assert (p["roi_start"] >= 0).all() and (p["roi_end"] <= 1.0 + 1e-6).all()
        assert (p["roi_end"] > p["roi_start"]).all()


def test_bytes_and_frames_entries_agree():
    path = video("derived_juggle_vp9.webm")
    idx = np.array([4, 0, 9, 9], np.int32)
    p = _params(8, crop=32, n=3, h=360, w=640)
    rb = P.GraphRunner(P.GraphSpec(P.TRAIN, P.BYTES, "cpu", 32, MEAN, STD, True), 2, 2, None)
    out_b = rb.run({"encoded": [np.fromfile(path, dtype=np.uint8)], "indices": [idx],
                    **{k: [v] for k, v in p.items()}})
    out_f = _train_runner().run(_feed([decode_frames(path, idx)], [p]))
    assert (out_b - out_f).abs().mean() < 3.0 / 57.375


# ----------------------------------------------------------------------- eval graph ---

def test_eval_views_are_crops_of_the_resized_frames_temporal_major():
    t_clips, T, h, w, c = 2, 3, 32, 56, 32
    frames = np.zeros((t_clips * T, h, w, 3), np.uint8)
    rng = np.random.default_rng(0)
    frames[:] = rng.integers(0, 256, (t_clips * T, h, w, 3), dtype=np.uint8)
    spec = P.GraphSpec(P.EVAL, P.FRAMES, "cpu", c, MEAN, STD, num_spatial=3, test_scale=h)
    out = P.GraphRunner(spec, 1, 2, None).run(
        {"frames": [frames], **{k: [v] for k, v in P.eval_inputs(3, h, w).items()}})
    assert out.shape == (1, 3, 3, t_clips * T, c, c)  # (N, S, 3, t*T, c, c)
    from dali_pipes.loader import EvalLoader
    loader = EvalLoader.__new__(EvalLoader)
    loader.temporal, loader.num_frames = t_clips, T
    views = loader._views(out[0])  # (t*S, 3, T, c, c)
    assert views.shape == (6, 3, T, c, c)
    norm = (torch.from_numpy(frames).float() - 114.75) / 57.375  # (F, H, W, 3)
    for v in range(6):
        tc, s = divmod(v, 3)
        x0 = [0, (w - c) // 2, w - c][s]
        want = norm[tc * T:(tc + 1) * T, :, x0:x0 + c].permute(3, 0, 1, 2)
        assert torch.allclose(views[v], want, atol=1e-5), v


def test_eval_crop_positions_follow_long_side():
    assert P.eval_crop_positions(100, 200, 3) == [(0.5, 0.0), (0.5, 0.5), (0.5, 1.0)]
    assert P.eval_crop_positions(200, 100, 3) == [(0.0, 0.5), (0.5, 0.5), (1.0, 0.5)]
    assert P.eval_crop_positions(200, 100, 1) == [(0.5, 0.5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NVDEC + GPU augmentation)")
def test_gpu_train_graph_outputs_cuda_tensor():
    path = video("derived_juggle_vp9.webm")
    r = P.GraphRunner(P.GraphSpec(P.TRAIN, P.BYTES, "mixed", 32, MEAN, STD, True), 2, 2, 0)
    p = _params(1, n=4, h=360, w=640)
    out = r.run({"encoded": [np.fromfile(path, dtype=np.uint8)],
                 "indices": [np.arange(4, dtype=np.int32)], **{k: [v] for k, v in p.items()}})
    assert out.is_cuda and out.shape == (1, 3, 4, 32, 32)
    cpu = P.GraphRunner(P.GraphSpec(P.TRAIN, P.BYTES, "cpu", 32, MEAN, STD, True), 2, 2, None)
    ref = cpu.run({"encoded": [np.fromfile(path, dtype=np.uint8)],
                   "indices": [np.arange(4, dtype=np.int32)], **{k: [v] for k, v in p.items()}})
    assert (out.cpu() - ref).abs().mean() < 0.1
