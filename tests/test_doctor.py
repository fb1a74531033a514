"""The preflight doctor on a CPU machine: checks, the routing plan of a GPU generation for
every file of every manifest, failures that name the fix."""
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dali_pipes import nvdec, routing
from dali_pipes.manifest import build_manifest, load_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_manifest(shared_videos, tmp_path_factory):
    """A manifest of every clip of ../shared/videos (list format, label 0)."""
    out = tmp_path_factory.mktemp("doctor")
    names = sorted(p.name for p in shared_videos.iterdir() if p.suffix in (".mp4", ".webm", ".avi"))
    (out / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    build_manifest("list", out / "list.txt", shared_videos, out / "m", progress=False)
    return out / "m"


def write_cfg(tmp_path, manifest, **train):
    cfg = yaml.safe_load((ROOT / "configs" / "multi.yaml").read_text())
    cfg["data"]["datasets"] = [{"name": "k400", "manifest": str(manifest), "val_manifest": ""}]
    cfg["train"].update(output_dir=str(tmp_path / "run"), **train)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def doctor(*args, preexec=None):
    return subprocess.run([sys.executable, "-m", "dali_pipes.doctor", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def test_plans_hopper_routing_of_every_file(tmp_path, shared_manifest):
    r = doctor("--cfg", write_cfg(tmp_path, shared_manifest), "--json", "--gpu-arch", "hopper")
    report = json.loads(r.stdout)
    assert r.returncode == 0, [c for c in report["checks"] if not c["ok"]]
    assert {"name", "ok", "detail"} <= set(report["checks"][0])
    records, _ = load_manifest(shared_manifest)
    files = {f["path"]: f for f in report["routing"]["files"]}
    assert set(files) == {r["path"] for r in records}
    for rec in records:  # exactly the loader's routing for a Hopper GPU
        want = routing.route(rec["probe"], "mixed", routing.NVDEC_BY_ARCH["hopper"])
        assert (files[rec["path"]]["route"], files[rec["path"]]["reason"]) == want
    by_name = {Path(p).name: f["route"] for p, f in files.items()}
    assert by_name["derived_juggle_mjpeg.avi"] == "pyav"  # DALI's GPU decoder takes no MJPEG
    assert by_name["derived_juggle_rot90_640x360.mp4"] == "pyav"  # rotation
    assert by_name["k400_arm_wrestling_340x256.mp4"] == "nvdec"
    summary = report["routing"]["summary"]
    assert sum(summary.values()) == len(records) and summary["dali_cpu"] == 0


def test_without_a_gpu_plans_the_cpu_and_prints_a_table(tmp_path, shared_manifest):
    r = doctor("--cfg", write_cfg(tmp_path, shared_manifest))
    assert r.returncode == 0, r.stdout
    assert "no GPU here" in r.stdout and "on this CPU machine" in r.stdout
    assert "DALI CPU 4 (" in r.stdout  # VP8, 2 x VP9, MJPEG
    assert "files go to the PyAV fallback" in r.stdout and "all checks passed" in r.stdout


def test_failures_name_the_fix(tmp_path, shared_manifest):
    cfg = write_cfg(tmp_path, tmp_path / "missing")
    low = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # noqa: E731
    r = doctor("--cfg", cfg, "--json", preexec=low)
    assert r.returncode == 1
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert not checks["manifest k400/train"]["ok"]
    assert "python -m dali_pipes.manifest" in checks["manifest k400/train"]["detail"]
    assert not checks["open-file limit"]["ok"] and "ulimit -n" in checks["open-file limit"]["detail"]
    r = doctor("--cfg", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "config error" in r.stderr


def test_container_without_video_capability(monkeypatch):
    monkeypatch.setenv("NVIDIA_DRIVER_CAPABILITIES", "compute,utility")
    assert "lacks 'video'" in nvdec.container_video_capability()
    for fine in ("compute,utility,video", "all"):
        monkeypatch.setenv("NVIDIA_DRIVER_CAPABILITIES", fine)
        assert nvdec.container_video_capability() is None
    monkeypatch.delenv("NVIDIA_DRIVER_CAPABILITIES")
    assert nvdec.container_video_capability() is None


def test_no_driver_is_a_clear_error():
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("an NVIDIA driver is present")
    with pytest.raises(nvdec.NvdecUnavailable, match="no NVIDIA driver"):
        nvdec.query(0)
