"""tools/gpu_check.sh --dry-run: the one-command GPU check's plumbing at toy sizes on the CPU
(every step runs and lands in gpu_check.json with its figures), so the script works the first
time a GPU is lent."""
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"nvidia-smi", "model", "model_compile", "model_ckpt", "model_ckpt_compile", "clips",
         "manifest", "doctor", "data", "data-repeated", "data-peer", "e2e", "pytest-gpu"}


def test_gpu_check_dry_run_records_every_step(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                       capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert set(steps) == STEPS and report["dry_run"] is True
    failed = {k: v for k, v in steps.items() if not v["ok"]}
    assert not failed and r.returncode == 0, (failed, r.stdout[-2000:], r.stderr[-2000:])
    model = steps["model_ckpt"]["results"]["model"]
    assert model["act_checkpoint"] is True and model["batch"] == 4  # the batch search's pick
    assert steps["model_ckpt_compile"]["cmd"].endswith("data.batch_size=4")
    assert steps["data"]["results"]["data"]["clips_per_s"] > 0
    assert steps["data-repeated"]["results"]["data"]["num_sample"] == 2
    assert steps["e2e"]["results"]["e2e"]["decode_device"] == "cpu"
    assert steps["doctor"]["results"]["routing"]["summary"]["nvdec"] == 4  # hopper plan: H.264
    log = (tmp_path / "gpu_check.log").read_text()
    assert "done: 13/13 steps ok" in log
