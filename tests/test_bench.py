"""bench.py smoke run on CPU: the tiny preset, the demo data, a few iterations of every mode."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_all_modes_write_json_and_chart(demo_root):
    out = demo_root / "out"
    cmd = [sys.executable, str(ROOT / "bench.py"), "--cfg", str(ROOT / "configs" / "demo.yaml"),
           "--mode", "data,data-peer,data-decord,data-torchcodec,model,e2e", "--iters", "3", "--warmup", "1", "--peer-workers", "1",
           "--out", str(out), "data.batch_size=4", "data.num_threads=1"]
    r = subprocess.run(cmd, cwd=demo_root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    res = report["results"]
    assert set(res) == {"data", "data-peer", "data-decord", "data-torchcodec", "model", "e2e"}
    ran = [m for m in res if "skipped" not in res[m]]
    assert {"data", "data-peer", "model", "e2e"} <= set(ran) and all(res[m]["clips_per_s"] > 0 for m in ran)
    for mode, module in (("data-decord", "decord"), ("data-torchcodec", "torchcodec")):
        installed = importlib.util.find_spec(module) is not None
        assert ("skipped" not in res[mode]) == installed  # a missing peer is said, not hidden
        assert ("ratio_vs_" + module in res["data"]) == installed
    assert res["data"]["ratio_vs_peer"] > 0 and res["data"]["batch"] == 4
    assert res["data"]["frames_per_s"] == pytest.approx(res["data"]["clips_per_s"] * 8)  # 8-frame clips
    m = res["model"]
    # the forward multiply-adds of one clip of the demo's backbone (8 x 64 x 64), not of a batch
    from models import build_backbone, count_flops
    assert m["gmacs_per_clip"] * 1e9 == count_flops(build_backbone("mvitv2_tiny"), (1, 3, 8, 64, 64))
    # flops per trained clip (train_flops_per_clip, checked by hand below) times clips/s
    flops = bench_module().train_flops_per_clip(m["gmacs_per_clip"] * 1e9, False)
    assert m["tflops"] == pytest.approx(m["clips_per_s"] * flops / 1e12)
    assert 0 < m["mfu"] < 1  # a tiny model stays below the matmul peak (measured 0.34)
    assert 0.0 <= res["e2e"]["data_wait_frac"] <= 1.0
    assert report["versions"]["torch"] and report["versions"]["dali"] and report["device"]
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "clips/s" in r.stdout


@pytest.mark.parametrize("name,rotation", [("k400_arm_wrestling_340x256.mp4", 0),
                                           ("derived_juggle_vp9.webm", 0),
                                           ("derived_juggle_rot90_640x360.mp4", 90)])
def test_peers_decode_the_same_upright_frames(shared_videos, name, rotation):
    """The decord peer does the same work as the PyAV peer: the same frames, upright."""
    pytest.importorskip("decord")
    from dali_pipes.peer import decode_clip
    idx = [0, 9, 9, 3]
    a = decode_clip("pyav", str(shared_videos / name), idx, rotation=rotation)
    d = decode_clip("decord", str(shared_videos / name), idx, rotation=rotation)
    assert a.shape == d.shape and np.abs(a.astype(int) - d.astype(int)).mean() < 1.0


def bench_module():
    import bench
    return bench


def test_training_flops_per_clip_by_hand():
    """A Linear layer of M multiply-adds costs 2M flops forward, and 2M for each of the two
    gradients backward (input and weight): 6M a trained clip, 8M when the forward is recomputed
    (activation checkpointing). PyTorch's own FlopCounterMode, run on a real forward and backward
    of an MLP, agrees with that count (with the whole forward recomputed: PyTorch may stop the
    recomputation early, after the last tensor backward needs, and do a little less)."""
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode

    from models import count_flops
    bench = bench_module()
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    macs = count_flops(mlp, (1, 64))
    assert macs == 64 * 128 + 128 * 10  # 9472
    assert bench.train_flops_per_clip(macs, False) == 6 * 9472
    assert bench.train_flops_per_clip(macs, True) == 8 * 9472
    for recompute in (False, True):
        x = torch.randn(1, 64, requires_grad=True)
        with set_checkpoint_early_stop(False), FlopCounterMode(display=False) as counter:
            y = checkpoint(mlp, x, use_reentrant=False) if recompute else mlp(x)
            y.sum().backward()
        assert counter.get_total_flops() == bench.train_flops_per_clip(macs, recompute)


def test_progress_rate_starts_the_clock_at_the_first_iteration():
    """5 iterations of 4 clips, 0.1 s apart: the rate is 4 clips x 4 intervals / 0.4 s = 40
    clips/s, the first iteration only starting the clock (counting it would give 50)."""
    import time
    progress = bench_module().Progress("data", 5, 4)
    for _ in range(5):
        time.sleep(0.1)
        progress.tick()
    assert 20 < progress.rate() <= 40.5  # never above 40: sleeps only overshoot
    assert progress.done == 5


def _sleepy_dataset(n: int, seconds: float):
    """A Dataset whose samples take `seconds` of sleep each: a known true rate."""
    import time

    import torch

    class Sleepy(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, k):
            time.sleep(seconds)
            return torch.zeros(3)

    return Sleepy()


@pytest.mark.parametrize("warmup", [2, 3])
def test_peer_rate_counts_only_work_done_inside_the_window(warmup):
    """2 workers, 4 clips a batch, 25 ms a clip: each worker delivers a batch every 0.1 s, the
    two in step, so the true rate is 80 clips/s. Starting the clock at the third batch while
    counting it (and its twin arriving just after) reported 93 (96 in theory: 12 batches in 5
    rounds); a warm-up of 3 batches is rounded up to 2 whole rounds of the workers."""
    from dali_pipes.peer import measure_peer
    r = measure_peer(_sleepy_dataset(14 * 4, 0.025), batch_size=4, workers=2,
                     warmup_batches=warmup)
    assert r["clips"] == (14 - 4 if warmup == 3 else 12) * 4
    assert 0.8 * 80 < r["clips_per_s"] <= 1.05 * 80, r  # sleeps only overshoot


def test_peer_cpu_time_includes_the_workers():
    """Samples that burn 20 ms of CPU each in the workers: the window's CPU per clip holds
    them (the main process alone spends almost nothing). 60 clips: /proc counts CPU time in
    10 ms ticks."""
    import time

    import torch

    from dali_pipes.peer import measure_peer

    class Busy(torch.utils.data.Dataset):
        def __len__(self):
            return 32 * 2

        def __getitem__(self, k):
            t = time.process_time()
            while time.process_time() - t < 0.02:
                pass
            return torch.zeros(3)

    r = measure_peer(Busy(), batch_size=2, workers=2, warmup_batches=2)
    assert 18.0 <= r["cpu_ms_per_clip"] <= 30.0, r


def test_loader_rate_leaves_out_the_tear_down_of_a_batch_in_flight():
    """A loader that delivers 8 clips every 50 ms and needs 0.5 s to stop an epoch (a batch in
    flight): 160 clips/s, not the 60 that timing the tear-down reported (48 clips in 0.3 + 0.5 s)."""
    import time
    from types import SimpleNamespace

    import torch

    from dali_pipes.peer import measure_loader

    class Loader:
        def epoch(self, epoch):
            try:
                while True:
                    time.sleep(0.05)
                    yield SimpleNamespace(video=torch.zeros(8, 1))
            finally:
                time.sleep(0.5)

    r = measure_loader(Loader(), clips=48)
    assert r["clips"] == 48
    assert 0.8 * 160 < r["clips_per_s"] <= 1.02 * 160, r


def test_peer_makes_each_videos_copies_as_the_graph_does(tmp_path, videos):
    """With data.num_sample 2 the peer decodes a video once and returns its 2 clips, copy c
    from copy c's parameters: each is the DALI loader's copy c to resampling differences
    (1-2 levels here), far from the other copy (~50)."""
    from dali_pipes.loader import build_train_loader
    from dali_pipes.peer import peer_dataset
    from helpers import CROP, T, entry, make_cfg, write_manifest
    a = write_manifest(tmp_path / "a", [entry(videos, "derived_juggle_vp9.webm", 0),
                                        entry(videos, "bbb_vp8_vorbis_1s.webm", 1)])
    cfg = make_cfg(tmp_path, [{"name": "dali", "manifest": str(a)}], num_sample=2, batch_size=2)
    loader = build_train_loader(cfg, T, CROP)
    peer = peer_dataset(loader, 2, CROP, cfg.data.mean, cfg.data.std)
    batch = loader.build_batch(0, 0, loader.sampler.global_order(0)[:2])
    loader.close()
    for k in range(2):
        clips = peer[k]
        assert clips.shape == (2, 3, T, CROP, CROP)
        for c in range(2):
            for other in range(2):
                diff = ((clips[c] - batch.video[2 * k + other]).abs() * cfg.data.std[0]).mean()
                assert (diff < 4.0) if other == c else (diff > 10.0), (k, c, other, diff)


def test_peer_rate_counts_every_copy():
    """Batches of (videos, copies, 3, T, H, W): clips/s counts videos x copies."""
    import torch

    from dali_pipes.peer import measure_peer

    class Copies(torch.utils.data.Dataset):
        def __len__(self):
            return 10 * 2

        def __getitem__(self, k):
            return torch.zeros(2, 3, 1, 1, 1)  # 2 copies of a video

    r = measure_peer(Copies(), batch_size=2, workers=0, warmup_batches=2)
    assert r["clips"] == 8 * 2 * 2  # batches 2..9 counted, 2 videos of 2 copies each
