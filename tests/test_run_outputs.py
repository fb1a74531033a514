"""What a user reads and looks at after a run: the console lines (routing per dataset, quarantined
files, the summary), TensorBoard's pictures, texts and curves read back from the event files,
and bench.py's output."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def events(tb_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(demo_root, tmp_path_factory):
    """A short run on the demo data whose shapecolor manifest also lists a truncated video."""
    tmp = tmp_path_factory.mktemp("outputs")
    src = demo_root / "demo_data" / "manifests" / "shapecolor" / "train"
    man = tmp / "shapecolor_train"
    shutil.copytree(src, man)
    rows = [json.loads(line) for line in (man / "manifest.jsonl").read_text().splitlines()]
    broken = tmp / "broken.webm"
    data = Path(rows[0]["path"]).read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # probed whole, truncated since
    rows.append({**rows[0], "path": str(broken)})
    (man / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--cfg", str(DEMO), f"train.output_dir={run_dir}",
           f"data.datasets.0.manifest={man}", "train.max_steps=4", "train.log_every=1",
           "train.eval_every_steps=2", "optim.epochs=1", "data.num_threads=1",
           "data.fallback_workers=1", "data.datasets.0.weight=4", "data.datasets.1.weight=1",
           "data.datasets.2.weight=1", "data.datasets.3.weight=1"]
    r = subprocess.run(cmd, cwd=demo_root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, run_dir, broken, len(rows)


def test_console_says_where_files_decode_and_what_was_quarantined(run):
    out, _, broken, n = run
    lines = out.splitlines()
    assert f"shapecolor: {n} videos: DALI CPU {n}" in lines, out[:2000]  # VP9: DALI's CPU decoder
    assert any(f"quarantined shapecolor: {broken}: " in ln for ln in lines)
    steps = [ln for ln in lines if ln.startswith("epoch 1 step ")]
    assert len(steps) == 4 and steps[-1].split("quarantined ")[1].startswith("1 ")
    assert "quarantined during this run: shapecolor: 1 x Unexpected out-of-bounds frame index" in out
    assert "top-5" not in out.split("shape: top-1")[1].splitlines()[0]  # 3 classes: no top-5
    assert out.count("shapecolor: top-1") == 2  # steps 2 and 4 (the end), printed once each
    assert "\r" not in out


def test_tensorboard_holds_curves_pictures_and_texts(run):
    _, run_dir, _, n = run
    acc = events(run_dir / "tb")
    tags = acc.Tags()
    names = ("shapecolor", "shape", "color", "direction")
    assert {f"train_clips/{n}" for n in names} <= set(tags["images"])
    assert not any(t.startswith("train_clips/0") for t in tags["images"])  # not by batch slot
    assert {f"confusion/{n}" for n in names} <= set(tags["images"])
    assert len([t for t in tags["images"] if t.startswith("relations/")]) == 12
    assert [e.step for e in acc.Scalars("val/shapecolor/top1")] == [2, 4]  # a curve
    assert "val/shape/top5" not in tags["scalars"] and "val/shapecolor/top5" in tags["scalars"]
    assert acc.Scalars("data/routes/shapecolor/dali_cpu")[0].value == n
    assert not any(t.startswith("perf/gpu_mem") for t in tags["scalars"])  # no GPU here
    text_tags = {t.split("/text_summary")[0] for t in tags["tensors"]}
    assert {"config", "relations/missed", "projection_pairs/shape->color"} <= text_tags
    image = acc.Images("relations/shapecolor->direction")[-1]
    assert image.width > 200 and image.height > 200


def test_per_dataset_losses_only_where_the_dataset_was_present(run):
    _, run_dir, _, _ = run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for name in ("shapecolor", "shape", "color", "direction"):
            value = row.get(f"loss/ce/{name}")
            assert value is None or value > 0  # absent, never a 0.0 stand-in
    assert any("loss/ce/shapecolor" in row for row in rows)


def test_bench_reports_resolved_decoder_and_lines_that_read_in_a_log(demo_root, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--cfg", str(DEMO), "--mode",
                        "data", "--iters", "10", "--warmup", "1", "--out", str(tmp_path),
                        "data.batch_size=2", "data.num_threads=1"], cwd=demo_root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    progress = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("data: ")]
    assert "\r" not in r.stdout and [ln.split()[1] for ln in progress] == ["2/10", "3/10", "4/10", "5/10", "6/10", "7/10", "8/10", "9/10", "10/10"]
    result = json.loads((tmp_path / "bench.json").read_text())["results"]["data"]
    assert result["decode_device"] == "cpu"
    rates = [float(ln.split(",")[1].split()[0]) for ln in progress]
    assert max(rates) < 3 * min(rates)  # no absurd first-iteration rate
