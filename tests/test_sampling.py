"""Frame-index sampling and the multi-dataset sampler."""
from collections import Counter

import numpy as np
import pytest

from dali_pipes.sampling import (MultiDatasetSampler, clip_indices, test_clip_indices,
                                 uniform_indices)


def test_clip_indices_stride_and_random_start():
    """Counted in source frames (target_fps 0): stride apart from a start drawn uniformly from
    every offset at which the clip fits, the first and the last included."""
    starts = set()
    for s in range(200):
        idx = clip_indices(30, 8, 3, np.random.default_rng(s))  # span 22: starts 0..8
        assert idx.dtype == np.int32 and idx.shape == (8,)
        first = int(np.random.default_rng(s).integers(0, 30 - 22 + 1))  # the sampler's draw
        assert idx.tolist() == [first + 3 * k for k in range(8)]
        starts.add(first)
    assert starts == set(range(9))
    assert clip_indices(30, 8, 3, None).tolist() == [4 + 3 * k for k in range(8)]  # centred


def test_short_video_padded_with_last_frame():
    idx = clip_indices(5, 8, 2, np.random.default_rng(0))
    assert idx.tolist() == [0, 2, 4, 4, 4, 4, 4, 4]
    assert uniform_indices(3, 8, None).max() == 2


def test_segment_bounds_respected():
    for s in range(30):
        idx = clip_indices(1000, 8, 3, np.random.default_rng(s), start_frame=500, end_frame=560)
        assert idx.min() >= 500 and idx.max() < 560
        short = clip_indices(1000, 8, 3, np.random.default_rng(s), start_frame=500, end_frame=510)
        assert short.min() >= 500 and short.max() == 509  # padded inside the segment
        u = uniform_indices(1000, 8, np.random.default_rng(s), 200, 264)
        assert u.min() >= 200 and u.max() < 264
    t = test_clip_indices(1000, 8, 3, 3, start_frame=100, end_frame=200)
    assert t.min() == 100 and t.max() == 199


def reference_ssv2(length, T, train, rng=None):
    """PySlowFast ssv2.py get_seq_frames, transcribed (random.randint is inclusive)."""
    seg = float(length - 1) / T
    seq = []
    for i in range(T):
        start, end = int(np.round(seg * i)), int(np.round(seg * (i + 1)))
        seq.append(int(rng.integers(start, end + 1)) if train else (start + end) // 2)
    return seq


@pytest.mark.parametrize("n", [80, 7, 33, 300])
def test_uniform_sampling_is_pyslowfasts_ssv2(n):
    T = 8
    assert uniform_indices(n, T, None).tolist() == reference_ssv2(n, T, False)
    for s in range(20):  # the same draws as the reference from the same generator
        assert uniform_indices(n, T, np.random.default_rng(s)).tolist() == \
            reference_ssv2(n, T, True, np.random.default_rng(s))
    assert uniform_indices(80, 8, None).tolist() == [5, 15, 25, 35, 44, 54, 64, 74]  # by hand
    views = test_clip_indices(n, T, 1, 2, sampling="uniform")
    assert views.shape == (2, T) and (n < 2 * T or not np.array_equal(views[0], views[1]))


def reference_clip(n, T, tau, fps, target, start):
    """PySlowFast decoder.py: clip_size = tau * T / target_fps * fps, temporal_sampling."""
    import torch
    size = max(1.0, tau * T / target * fps)
    idx = torch.linspace(start, start + size - 1, T)
    return torch.clamp(idx, 0, n - 1).long().tolist(), size


@pytest.mark.parametrize("fps", [30.0, 25.0, 29.97, 60.0, 12.0])
def test_clips_span_the_same_time_at_any_frame_rate(fps):
    n, T, tau = int(10 * fps), 32, 3
    for s in range(10):
        got = clip_indices(n, T, tau, np.random.default_rng(s), fps=fps, target_fps=30)
        room = max(n - tau * T / 30 * fps, 0)
        first = np.random.default_rng(s).uniform(0, room)  # the draw the sampler made
        want, size = reference_clip(n, T, tau, fps, 30, first)
        assert got.tolist() == want
        # 32 x 3 at 30 fps = 3.2 s of video whatever the source rate
        assert size / fps == pytest.approx(3.2)
        assert (got[-1] - got[0] + 1) / fps == pytest.approx(3.2, abs=1.5 / fps)
    assert clip_indices(n, T, tau, np.random.default_rng(0), fps=fps, target_fps=0)[1] - \
        clip_indices(n, T, tau, np.random.default_rng(0), fps=fps, target_fps=0)[0] == tau


def test_test_clips_follow_pyslowfast_offset_sampling():
    n, T, tau, fps = 250, 32, 3, 25.0
    size = tau * T / 30 * fps  # 80 frames
    room = n - size
    clips = test_clip_indices(n, T, tau, 3, fps=fps, target_fps=30)
    for k in range(3):  # use_offset: clip k starts at k * floor(room / (views - 1))
        want, _ = reference_clip(n, T, tau, fps, 30, k * np.floor(room / 2))
        assert clips[k].tolist() == want
    single = test_clip_indices(n, T, tau, 1, fps=fps, target_fps=30)
    assert single[0].tolist() == reference_clip(n, T, tau, fps, 30, np.floor(room / 2))[0]


def test_test_clips_spread_first_at_start_last_at_end():
    clips = test_clip_indices(100, 8, 3, 3)
    assert clips.shape == (3, 8)
    assert clips[0, 0] == 0 and clips[-1, -1] == 99
    assert clips[1, 0] == round((100 - 22) / 2)
    assert test_clip_indices(100, 8, 3, 1)[0, 0] == (100 - 22) // 2  # single view: centred


def _epoch_rows(sampler, epoch):
    return np.concatenate([rows for _, rows in sampler.iter_epoch(epoch)])


def test_sampler_deterministic_and_epochs_differ():
    a = MultiDatasetSampler([10, 7], [0, 0], 4, seed=3)
    b = MultiDatasetSampler([10, 7], [0, 0], 4, seed=3)
    assert np.array_equal(_epoch_rows(a, 0), _epoch_rows(b, 0))
    assert not np.array_equal(_epoch_rows(a, 0), _epoch_rows(a, 1))
    c = MultiDatasetSampler([10, 7], [0, 0], 4, seed=4)
    assert not np.array_equal(_epoch_rows(a, 0), _epoch_rows(c, 0))


def test_sharding_covers_each_video_once_proportional():
    sizes = [12, 20]
    ranks = [MultiDatasetSampler(sizes, [0, 0], 2, rank=r, world_size=2, seed=1) for r in range(2)]
    assert ranks[0].steps_per_epoch == 8
    rows = np.concatenate([_epoch_rows(s, 0) for s in ranks])
    pairs = Counter((int(d), int(v)) for d, v, _ in rows)
    assert len(pairs) == 32 and set(pairs.values()) == {1}
    assert sorted(rows[:, 2].tolist()) == list(range(32))  # global ids, no overlap
    r0, r1 = (_epoch_rows(s, 0) for s in ranks)
    assert not set(r0[:, 2].tolist()) & set(r1[:, 2].tolist())


def test_explicit_weights_cycle_small_dataset():
    s = MultiDatasetSampler([10, 30], [1.0, 1.0], 5, seed=0)
    rows = s.global_order(0)
    counts = Counter(int(d) for d in rows[:, 0])
    assert counts[0] == 20 and counts[1] == 20  # equal weights: half each of 40 draws
    vids0 = Counter(int(v) for d, v, _ in rows if d == 0)
    assert set(vids0.values()) == {2}  # the small dataset is cycled twice
    prop = MultiDatasetSampler([10, 30], [0, 0], 5, seed=0).global_order(0)
    assert Counter(int(d) for d in prop[:, 0]) == {0: 10, 1: 30}


def test_truncated_to_global_batch_multiple():
    s = MultiDatasetSampler([7, 6], [0, 0], 2, rank=0, world_size=2, seed=0)
    assert s.steps_per_epoch == 3 and len(s.global_order(0)) == 12


def test_resume_mid_epoch_sees_exactly_the_unseen_samples():
    full = MultiDatasetSampler([9, 14], [0, 0], 3, rank=1, world_size=2, seed=7)
    ref = [rows.copy() for _, rows in full.iter_epoch(2)]
    first = MultiDatasetSampler([9, 14], [0, 0], 3, rank=1, world_size=2, seed=7)
    it = first.iter_epoch(2)
    seen = [next(it)[1] for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 2, "step": 2}
    resumed = MultiDatasetSampler([9, 14], [0, 0], 3, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    rest = [rows for _, rows in resumed.iter_epoch(2)]
    assert len(seen) + len(rest) == len(ref)
    for a, b in zip(seen + rest, ref):
        assert np.array_equal(a, b)
    # a different epoch starts from its beginning
    assert next(resumed.iter_epoch(3))[0] == 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        MultiDatasetSampler([3], [0], 4)
    with pytest.raises(ValueError):
        MultiDatasetSampler([0, 3], [0, 0], 1)
