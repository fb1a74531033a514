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
        if installed:
            key = "ratio_vs_" + module
            assert res["data"][key] == pytest.approx(res["data"]["clips_per_s"] / res[mode]["clips_per_s"])
    assert res["data"]["ratio_vs_peer"] == pytest.approx(res["data"]["clips_per_s"] / res["data-peer"]["clips_per_s"])
    assert res["data"]["frames_per_s"] == pytest.approx(res["data"]["clips_per_s"] * 8)
    m = res["model"]
    # achieved TFLOP/s follows from clips/s and the counted forward multiply-adds (x2 flops, x3 train)
    assert m["tflops"] == pytest.approx(m["clips_per_s"] * 6 * m["gmacs_per_clip"] * 1e9 / 1e12)
    assert 0 < m["mfu"] == pytest.approx(m["tflops"] / m["peak_tflops"])
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
