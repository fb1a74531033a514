"""The one-command GPU check: everything that needs a GPU, measured in one go (< 8 minutes on
one H100/H200 with 16 cores), into OUT/gpu_check.json and OUT/gpu_check.log.

    bash tools/gpu_check.sh OUT            # on the GPU machine (DALI and PyAV importable)
    bash tools/gpu_check.sh OUT --dry-run  # anywhere: the same steps at toy sizes on the CPU

Steps, each a subprocess with its own time limit, in the order that keeps the most valuable
figures if the machine is taken back early (the JSON is rewritten after every step):
 1. environment: nvidia-smi
 2. model: bench.py --mode model, MViTv2-B 32x3 bf16, the largest batch that fits, with and
    without activation checkpointing, with and without torch.compile
 3. clips: ~300 Kinetics-like H.264 clips (340x256, 10 s, 30 fps) and their manifest
 4. the doctor on a config over those clips (versions, driver, NVDEC, routing); then data: NVDEC decode + augmentation (bench data), the CPU peer on the same files (PyAV +
    DataLoader, one worker per core) and real training steps fed by the pipeline (bench e2e)
 5. tests: pytest -m gpu
A step that fails is recorded with its error and the check goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Check:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.t0, self.budget = out, time.monotonic(), budget_s
        self.report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
                       "steps": {}}
        self.log = open(out / "gpu_check.log", "a")

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run(self, name: str, cmd: list, timeout: float, env: dict | None = None,
            json_stdout: bool = False) -> dict:
        """Runs one step; its output goes to the log, its record to the JSON (with the step's
        own JSON output as "results" when `json_stdout`)."""
        if self.left() < 20:
            rec = {"ok": False, "skipped": f"out of the time budget ({self.budget:.0f} s)"}
            self.save(name, rec)
            return rec
        timeout = min(timeout, self.left() - 10)
        self.say(f"{name}: {' '.join(map(str, cmd))}")
        t0 = time.monotonic()
        try:
            p = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True,
                               timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                     **(env or {})})
            ok, stdout, output = p.returncode == 0, p.stdout, p.stdout + p.stderr
            error = None if ok else f"exit code {p.returncode}: {output.strip().splitlines()[-1:]}"
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout or b""
            ok, stdout = False, ""
            output = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
            error = f"timed out after {timeout:.0f} s"
        self.log.write(output + "\n")
        rec = {"ok": ok, "seconds": round(time.monotonic() - t0, 1), "cmd": " ".join(map(str, cmd))}
        if error:
            rec["error"] = error
        if json_stdout and stdout:
            try:
                rec["results"] = json.loads(stdout)
            except json.JSONDecodeError:
                pass
        self.say(f"{name}: {'ok' if ok else 'FAILED ' + error} ({rec['seconds']} s)")
        self.save(name, rec)
        return rec

    def save(self, name: str, rec: dict) -> None:
        self.report["steps"][name] = rec
        self.report["seconds"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1))
        os.replace(tmp, self.out / "gpu_check.json")


def attach(rec: dict, bench_dir: Path) -> dict:
    """The bench.json results of a bench step, into its record."""
    path = bench_dir / "bench.json"
    if rec.get("ok") and path.is_file():
        rec["results"] = json.loads(path.read_text())["results"]
    return rec


def make_clips(out: Path, count: int, seconds: float, size: tuple, fps: int, workers: int) -> None:
    """Kinetics-like H.264 clips: textured scenes with moving objects, ~Kinetics' bitrate."""
    from concurrent.futures import ProcessPoolExecutor

    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out / f"clip{k:04d}.mp4", k, int(seconds * fps), size, fps) for k in range(count)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_clip_job, jobs))
    (out / "list.txt").write_text("".join(f"clip{k:04d}.mp4 {k % 10}\n" for k in range(count)))


def _clip_job(job) -> None:
    import numpy as np

    from dali_pipes.synthetic import encode_video, textured_scene
    path, k, frames, (w, h), fps = job
    if not path.is_file():
        encode_video(textured_scene(np.random.default_rng(k), frames, w, h), path, fps=fps)


def write_config(path: Path, manifest: Path, arch: str, batch: int, threads: int,
                 frames: int = 0, crop: int = 0) -> Path:
    """A one-dataset training config over the generated clips (the multi.yaml recipe)."""
    import yaml

    from config import config_to_dict, load_config
    cfg = config_to_dict(load_config(ROOT / "configs" / "multi.yaml", check_paths=False))
    cfg["data"]["datasets"] = [{"name": "k400like", "manifest": str(manifest), "stride": 3}]
    # One clip per video: batch sizes here (searched, then reused) are the model's clips.
    cfg["data"].update(batch_size=batch, num_threads=threads, fallback_workers=threads,
                       num_sample=1)
    cfg["model"].update(arch=arch, pretrained="", num_frames=frames, crop_size=crop)
    cfg["optim"]["global_batch"] = batch
    cfg["train"]["output_dir"] = str(path.parent / "runs")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for gpu_check.json, gpu_check.log and the step outputs")
    ap.add_argument("--dry-run", action="store_true",
                    help="toy sizes on the CPU: checks this script's plumbing (CI runs it)")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole check")
    ap.add_argument("--clips", type=int, default=300)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    cores = os.cpu_count() or 1
    check = Check(out, 150 if dry else args.budget)
    check.report["dry_run"] = dry
    py = sys.executable
    bench = [py, ROOT / "bench.py"]

    # 1. environment
    check.run("nvidia-smi", ["nvidia-smi"] if not dry else ["true"], 30)

    # 2. model-only figures: MViTv2-B 32x3 bf16 (dry run: the tiny preset in fp32 on the CPU)
    arch = "mvitv2_tiny" if dry else "mvitv2_b_32x3"
    model_cfg = write_config(out / "model.yaml", out / "none", arch, 4, 1)
    search = "4,2" if dry else "96,80,64,48,40,32,24,16,12,8,4"
    found = {}
    for ckpt in (False, True):
        for compiled in (False, True):
            name = f"model{'_ckpt' if ckpt else ''}{'_compile' if compiled else ''}"
            bench_dir = out / name
            size = [f"data.batch_size={found[ckpt]}"] if compiled and ckpt in found else []
            rec = check.run(name, bench + [
                "--cfg", model_cfg, "--mode", "model", "--iters", 3 if dry else 12,
                "--warmup", 1 if dry else 3, "--out", bench_dir,
                *([] if size else ["--batch-search", search]),
                f"model.act_checkpoint={str(ckpt).lower()}",
                f"model.compile={str(compiled and not dry).lower()}",  # dry: no 5-min CPU compile
                *size, *([] if dry else ["train.precision=bf16"])], 60 if dry else 240)
            attach(rec, bench_dir)
            if "results" in rec and not compiled:
                found[ckpt] = rec["results"]["model"]["batch"]
            check.save(name, rec)

    # 3. Kinetics-like clips and their manifest
    clips = out / "clips"
    n, secs, size = (4, 1.0, (112, 84)) if dry else (args.clips, 10.0, (340, 256))
    t0 = time.monotonic()
    try:
        make_clips(clips, n, secs, size, 30, cores)
        check.save("clips", {"ok": True, "seconds": round(time.monotonic() - t0, 1),
                             "files": n, "size": list(size), "seconds_each": secs})
    except Exception as exc:  # noqa: BLE001 - recorded, the check goes on
        check.save("clips", {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    check.run("manifest", [py, "-m", "dali_pipes.manifest", "list", "--annotations",
                           clips / "list.txt", "--root", clips, "--out", clips / "manifest",
                           "--workers", cores], 120)

    # 4. decode and train on them: NVDEC (dry: DALI CPU / PyAV), the CPU peer, end to end
    frames_crop = ["model.num_frames=8", "model.crop_size=64"] if dry else []
    batch = 2 if dry else min(found.get(False, 8), 16)
    data_cfg = write_config(out / "data.yaml", clips / "manifest", arch, batch, min(cores, 16))
    check.run("doctor", [py, "-m", "dali_pipes.doctor", "--cfg", data_cfg, "--json"]
              + (["--gpu-arch", "hopper"] if dry else []), 120, json_stdout=True)
    iters = 3 if dry else 20
    # "data-repeated": the recipe's 2 augmented clips per decoded video, same clips a batch.
    repeated = ["data.num_sample=2", f"data.batch_size={max(1, batch // 2)}"]
    for name, mode, extra in (("data", "data", []),
                              ("data-repeated", "data", repeated),
                              ("data-peer", "data-peer", ["--peer-workers", cores]),
                              ("e2e", "e2e", [] if dry else ["train.precision=bf16"])):
        bench_dir = out / name
        rec = check.run(name, bench + ["--cfg", data_cfg, "--mode", mode, "--iters", iters,
                                       "--warmup", 1 if dry else 3, "--out", bench_dir,
                                       *extra, *frames_crop], 60 if dry else 150)
        check.save(name, attach(rec, bench_dir))

    # 5. the GPU tests
    check.run("pytest-gpu", [py, "-m", "pytest", "-q", "-m", "gpu", ROOT / "tests"]
              + (["-k", "driver_reports"] if dry else []), 60 if dry else 240)
    summary = {k: v.get("ok") for k, v in check.report["steps"].items()}
    check.say(f"done: {sum(map(bool, summary.values()))}/{len(summary)} steps ok; "
              f"{out / 'gpu_check.json'}")
    return 0 if all(summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
