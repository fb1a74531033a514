"""What only a GPU can show: NVDEC routing and capabilities asked of the driver, the stream-safe
hand-over of batches under allocator pressure, bf16 training steps, torch.compile, and the
doctor on a real device. Every test here is marked `gpu` and skipped without CUDA; the CPU
walk-through of the same code paths is tests/test_device_paths.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from config import config_from_dict
from dali_pipes import nvdec, routing
from dali_pipes.loader import build_train_loader
from dali_pipes.manifest import build_manifest
from helpers import frame_indices_of, to_pixels, write_indexed_clip

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def test_driver_reports_nvdec_formats_and_routing_follows_them():
    formats = nvdec.supported_formats(0)
    assert ("h264", "420", 8) in formats  # every NVDEC since Maxwell
    info = nvdec.query(0)
    arch = routing.arch_of(*info.capability)
    # the planning table never promises what this GPU's driver denies
    assert not (routing.NVDEC_BY_ARCH[arch] & routing.DALI_VERIFIED) - set(formats), arch
    tiny = {"codec": "h264", "pix_fmt": "yuv420p", "width": 16, "height": 16}
    assert routing.route(tiny, "mixed", formats)[0] == routing.PYAV  # below NVDEC's minimum
    assert routing.route({"codec": "mjpeg", "pix_fmt": "yuvj420p"}, "mixed", formats)[0] == routing.PYAV


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    """Eight 64-frame H.264 clips (NVDEC) for a many-batch epoch."""
    root = tmp_path_factory.mktemp("gpu_clips")
    for i in range(8):
        write_indexed_clip(root / f"c{i}.mp4", "libx264", frames=48, size=64, clip_id=i % 8)
    (root / "list.txt").write_text("".join(f"c{i}.mp4 {i % 8}\n" for i in range(8)))
    build_manifest("list", root / "list.txt", root, root / "manifest", progress=False)
    return root / "manifest"


def _cfg(manifest, **data):
    return config_from_dict({"data": {
        "datasets": [{"name": "c", "manifest": str(manifest), "stride": 4, "flip": False, "weight": 1.0}],
        "batch_size": 4, "num_threads": 2, "crop_size": 64, "train_scale": [64, 64],
        "rand_aug_n": 0, "prefetch": 2, "decode_device": "auto", **data}})


def test_handover_survives_allocator_pressure(long_clips):
    """The consumer reads each batch with slow kernels and drops it before they finish, while
    the loader writes the next batches: with a block reused too early, the sums would change."""
    loader = build_train_loader(_cfg(long_clips), 8, 64, device=torch.device("cuda", 0))
    assert loader.decode_device == "mixed"
    for epoch in range(3):
        for batch in loader.epoch(epoch):
            want = batch.video.double().sum().item()  # sync point: the reference value
            acc = torch.zeros((), dtype=torch.float64, device="cuda")
            for _ in range(30):  # queued work that keeps reading the batch
                acc = acc + (batch.video.double() * 1.0).sum() / 30
            frames = to_pixels(batch.video[0])
            del batch  # the block goes back to the allocator while the kernels still run
            assert acc.item() == pytest.approx(want, rel=1e-9)
            assert len(set(frame_indices_of(frames))) == 8
    assert loader.num_quarantined == 0
    loader.close()


def _train(tmp_path, demo_root, *overrides):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--cfg", str(ROOT / "configs" / "demo.yaml"),
           f"train.output_dir={run_dir}", "train.max_steps=6", "train.log_every=2",
           "data.decode_device=auto", *overrides]
    r = subprocess.run(cmd, cwd=demo_root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return r, rows


@pytest.mark.parametrize("extra", [[], ["model.compile=true"], ["model.act_checkpoint=true"]],
                         ids=["bf16", "bf16-compile", "bf16-act-checkpoint"])
def test_bf16_training_steps(tmp_path, demo_root, extra):
    r, rows = _train(tmp_path, demo_root, "train.precision=bf16", *extra)
    assert "bf16" in r.stdout
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert all(np.isfinite(row["loss/total"]) and row["steps_skipped"] == 0 for row in rows)
    assert rows[-1]["perf/gpu_mem_reserved_gb"] >= rows[-1]["perf/gpu_mem_allocated_gb"] > 0


def test_doctor_on_this_gpu(demo_root):
    r = subprocess.run([sys.executable, "-m", "dali_pipes.doctor", "--cfg",
                        str(ROOT / "configs" / "demo.yaml"), "--json"], cwd=demo_root,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["GPU"]["ok"] and "compute capability" in checks["GPU"]["detail"]
    assert checks["NVDEC (libnvcuvid)"]["ok"]
    # the demo's VP9 clips decode on NVDEC
    assert report["routing"]["summary"]["nvdec"] > 0
