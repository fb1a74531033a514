"""Writes tests/golden/demo_loss_curve.json, the loss curve tests/test_golden.py compares with.

    python tests/make_golden.py [--data DIR]

The curve: the losses of the first 30 logged steps of a short fixed run of the demo config
(5 epochs of 6 steps on the suite's small demo data, helpers.DEMO_DATA), on the CPU, one thread.
Regenerate it, and commit the new file with the change, when a change is MEANT to move the
numbers (data path, augmentation, model, losses, optimizer, library versions); say why in the
commit. The script trains twice, with 1 and 2 threads, and records the largest relative
difference between the two curves: the noise the tolerance (RTOL) must stay well above. It
refuses to write a curve whose noise is within a tenth of the tolerance. --data: a folder that
already holds the demo data (made with helpers.DEMO_DATA), otherwise it is made in a
temporary folder (about 10 s; each run about 20 s on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GOLDEN = TESTS / "golden" / "demo_loss_curve.json"
STEPS = 30
KEYS = ("loss/total", "loss/cls", "loss/proj", "loss/inf")
RTOL, ATOL = 1e-4, 1e-6
OVERRIDES = ["optim.epochs=5", "train.log_every=1", "train.ckpt_every=0", "train.vis_clips=0",
             "data.num_threads=1", "data.fallback_workers=1",
             *(f"data.datasets.{i}.val_manifest=" for i in range(4))]


def command(run_dir) -> list[str]:
    """train.py on the demo config; run it in the folder that holds demo_data/."""
    return [sys.executable, str(ROOT / "train.py"), "--cfg", str(ROOT / "configs" / "demo.yaml"),
            "--resume", "none", f"train.output_dir={run_dir}", *OVERRIDES]


def environment(threads: int) -> dict:
    # CPU only (a GPU would train in bf16 with other kernels), a fixed thread count
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "",
            "PYTHONUNBUFFERED": "1"}


def run_curve(data_root, run_dir, threads: int = 1) -> dict:
    """{loss key: [value of steps 1..STEPS]} of one run of command() in data_root."""
    r = subprocess.run(command(run_dir), cwd=data_root, env=environment(threads),
                       capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = rows[:STEPS]
    if [row["step"] for row in rows] != list(range(1, STEPS + 1)):
        raise RuntimeError(f"expected steps 1..{STEPS} in metrics.jsonl, got {[r['step'] for r in rows]}")
    return {key: [row[key] for row in rows] for key in KEYS}


def relative_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) / max(abs(y), ATOL) for key in KEYS for x, y in zip(a[key], b[key]))


def versions() -> dict:
    import av
    import numpy
    import nvidia.dali
    import torch
    return {"torch": torch.__version__, "nvidia-dali": nvidia.dali.__version__,
            "av": av.__version__, "numpy": numpy.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder holding demo_data/ (default: made anew)")
    p.add_argument("--out", default=str(GOLDEN))
    args = p.parse_args(argv)
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(ROOT))
    from helpers import DEMO_DATA
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data).resolve() if args.data else Path(tmp)
        if not args.data:
            from dali_pipes.synthetic import prepare_demo
            print(f"making the demo data in {tmp} ...", flush=True)
            prepare_demo(Path(tmp) / "demo_data", progress=False, **DEMO_DATA)
        curves = {}
        for threads in (1, 2):
            print(f"training with {threads} thread(s) ...", flush=True)
            curves[threads] = run_curve(data, Path(tmp) / f"run{threads}", threads)
    spread = relative_difference(curves[2], curves[1])
    print(f"largest relative difference between 1 and 2 threads: {spread:.2e} (tolerance {RTOL:g})")
    if spread > RTOL / 10:
        print("refusing to write: the thread-count noise is too close to the tolerance",
              file=sys.stderr)
        return 1
    golden = {
        "about": "losses of the first 30 logged steps of a short demo run; compared by "
                 "tests/test_golden.py; regenerate with the command below when a change is "
                 "meant to move them",
        "regenerate": "python tests/make_golden.py",
        "train_command": " ".join(["python train.py --cfg configs/demo.yaml --resume none",
                                   "train.output_dir=RUN", *OVERRIDES]),
        "run_in": "a folder holding demo_data/, made by dali_pipes.synthetic.prepare_demo with "
                  + ", ".join(f"{k}={v}" for k, v in DEMO_DATA.items()),
        "env": {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        "rtol": RTOL, "atol": ATOL,
        "thread_spread": {"threads": [1, 2], "max_relative_difference": spread},
        "versions": versions(),
        "losses": curves[1],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
