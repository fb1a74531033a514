"""DALI graphs, the PyAV fallback decoder and clip-level augmentation (CPU)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_pipes import pipeline as P
from dali_pipes.decode_av import DecodeError, decode_frames
from dali_pipes.sampling import sample_rng
from helpers import frame_indices_of, to_pixels, write_indexed_clip

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


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """name -> path of a 24-frame 64x64 clip per codec whose frame i is grey 8 + 5i: a
    decoder that returns a neighbouring frame is off by 5 grey levels."""
    root = tmp_path_factory.mktemp("indexed")
    codecs = {"vp8.webm": ("libvpx", "yuv420p"), "vp9.webm": ("libvpx-vp9", "yuv420p"),
              "mjpeg.avi": ("mjpeg", "yuvj420p"), "h264.mp4": ("libx264", "yuv420p"),
              "hevc.mp4": ("libx265", "yuv420p"), "mpeg4.avi": ("mpeg4", "yuv420p"),
              "av1.mp4": ("libsvtav1", "yuv420p")}
    return {name: write_indexed_clip(root / name, codec, frames=24, pix_fmt=pix_fmt)
            for name, (codec, pix_fmt) in codecs.items()}


@pytest.mark.parametrize("name", ["vp8.webm", "vp9.webm", "mjpeg.avi"])
def test_dali_cpu_returns_exactly_the_asked_frames(indexed, name):
    idx = [7, 0, 7, 3, 20, 1, 23]  # out of order, a repeat, the last frame
    d = dali_decode(indexed[name], idx)
    assert d.shape == (len(idx), 64, 64, 3) and d.dtype == np.uint8
    assert frame_indices_of(d) == idx
    assert frame_indices_of(decode_frames(indexed[name], idx)) == idx  # the fallback agrees


@pytest.mark.parametrize("name", ["h264.mp4", "hevc.mp4", "mpeg4.avi", "av1.mp4"])
def test_fallback_frame_exact(indexed, name):
    """H.264 and HEVC clips with B-frames (decode order differs from display order)."""
    idx = [23, 2, 2, 0, 9, 15]
    got = decode_frames(indexed[name], idx)
    assert got.shape == (len(idx), 64, 64, 3) and frame_indices_of(got) == idx
    with pytest.raises(DecodeError, match="short decode"):  # never a silent stand-in frame
        decode_frames(indexed[name], [0, 24])


def test_fallback_applies_rotation():
    path = video("derived_juggle_rot90_640x360.mp4")
    upright = decode_frames(path, [0], rotation=90)
    stored = decode_frames(path, [0])
    assert upright.shape[1:3] == stored.shape[2:0:-1]
    assert np.array_equal(upright[0], np.rot90(stored[0], k=-1))


# ------------------------------------------------------------------- training graph ---

def _train_runner(rand_aug=True, crop=32):
    return P.GraphRunner(P.GraphSpec(P.TRAIN, P.FRAMES, "cpu", crop, MEAN, STD, rand_aug), 4, 2, None)


def _params(seed, crop=32, n=2, m=9.0, flip=True, h=48, w=64):
    return P.draw_train_params(sample_rng(seed, 0, 0), h, w, crop, "scale", [40, 48], [0.08, 1],
                               flip, n, m, 0.5)


def _feed(frames_list, params_list):
    """Graph inputs of clips whose frames are all distinct (the "order" is the identity)."""
    inputs = {"frames": frames_list, **P.order_inputs([np.arange(len(f)) for f in frames_list])}
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
        feed = {"encoded": [enc] * len(ids), "indices": [np.arange(0, 8, 2, dtype=np.int32)] * len(ids),
                **P.order_inputs([np.arange(4)] * len(ids))}
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


def test_bytes_and_frames_entries_agree(indexed):
    """The graph fed with file bytes (DALI decodes) and with frames (the PyAV fallback decoded)
    makes the same clip, in clip order, each frame the one asked for."""
    path = indexed["vp9.webm"]
    clip = [4, 0, 9, 9]
    unique, order = P.dedup_indices(clip)  # decoded once each, then put in clip order
    assert unique.tolist() == [0, 4, 9]
    window = {"roi_start": np.zeros(2, np.float32), "roi_end": np.ones(2, np.float32),
              "mirror": np.array(0, np.int32)}  # the whole frame, unflipped
    outs = []
    for p in (window, _params(8, crop=32, n=3, h=64, w=64), _params(9, crop=32, n=3, h=64, w=64)):
        rand_aug = "ra_op0" in p
        rb = P.GraphRunner(P.GraphSpec(P.TRAIN, P.BYTES, "cpu", 32, MEAN, STD, rand_aug), 2, 2, None)
        out_b = rb.run({"encoded": [np.fromfile(path, dtype=np.uint8)], "indices": [unique],
                        **P.order_inputs([order]), **{k: [v] for k, v in p.items()}})
        out_f = _train_runner(rand_aug).run({**_feed([decode_frames(path, unique)], [p]),
                                             **P.order_inputs([order])})
        outs.append((out_b, out_f))
    (plain_b, plain_f), (aug_b, aug_f), (other_b, _) = outs  # plain, augmented, other draw
    assert frame_indices_of(to_pixels(plain_b[0])) == clip
    assert frame_indices_of(to_pixels(plain_f[0])) == clip
    # the same pixels to rounding, away from the corner block's edges (chroma upsampling of
    # the two decoders differs there by up to 15 levels, 0.9 on average over the frame)
    assert (plain_b - plain_f)[..., 10:, 10:].abs().max() < 1.5 / 57.375
    assert (plain_b - plain_f).abs().mean() < 1.5 / 57.375
    assert torch.equal(aug_b[0, :, 2], aug_b[0, :, 3])  # the repeated frame 9
    # the same augmentation of both: per-frame statistics (Equalize, AutoContrast) and bit
    # ops can amplify the decoders' one-level differences, but far less than another draw
    assert (aug_b - aug_f).abs().mean() < (aug_b - other_b).abs().mean() / 4


# ----------------------------------------------------------------------- eval graph ---

def test_eval_views_are_crops_of_the_resized_frames_temporal_major():
    t_clips, T, h, w, c = 2, 3, 32, 56, 32
    frames = np.zeros((t_clips * T, h, w, 3), np.uint8)
    rng = np.random.default_rng(0)
    frames[:] = rng.integers(0, 256, (t_clips * T, h, w, 3), dtype=np.uint8)
    spec = P.GraphSpec(P.EVAL, P.FRAMES, "cpu", c, MEAN, STD, num_spatial=3, test_scale=h)
    out = P.GraphRunner(spec, 1, 2, None).run(
        {"frames": [frames], **P.order_inputs([np.arange(t_clips * T)]),
         **{k: [v] for k, v in P.eval_inputs(3, h, w).items()}})
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


@pytest.mark.gpu
def test_gpu_train_graph_outputs_cuda_tensor():
    path = video("derived_juggle_vp9.webm")
    r = P.GraphRunner(P.GraphSpec(P.TRAIN, P.BYTES, "mixed", 32, MEAN, STD, True), 2, 2, 0)
    p = _params(1, n=4, h=360, w=640)
    out = r.run({"encoded": [np.fromfile(path, dtype=np.uint8)], **P.order_inputs([np.arange(4)]),
                 "indices": [np.arange(4, dtype=np.int32)], **{k: [v] for k, v in p.items()}})
    assert out.is_cuda and out.shape == (1, 3, 4, 32, 32)
    cpu = P.GraphRunner(P.GraphSpec(P.TRAIN, P.BYTES, "cpu", 32, MEAN, STD, True), 2, 2, None)
    ref = cpu.run({"encoded": [np.fromfile(path, dtype=np.uint8)], **P.order_inputs([np.arange(4)]),
                   "indices": [np.arange(4, dtype=np.int32)], **{k: [v] for k, v in p.items()}})
    assert (out.cpu() - ref).abs().mean() < 0.1
