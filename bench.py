"""Throughput benchmark, configured like train.py.

    python bench.py --cfg configs/multi.yaml --mode data,data-peer,model,e2e [key=value ...]

data       the DALI training pipeline alone: clips/s and output frames/s
data-peer  the same decoding and augmentation the usual way (PyAV + torch DataLoader workers)
           on the same files; reported with the ratio data / data-peer
model      forward + backward + AdamW step on synthetic clips already on the device: clips/s,
           achieved TFLOP/s from the model's FLOP count, MFU against a matrix-multiply peak
           measured on the same device, peak memory
e2e        real training steps fed by the pipeline: clips/s and the fraction of time spent
           waiting for data

Writes a console table, OUT/bench.json and OUT/bench.png (OUT: --out, default
<train.output_dir>/bench).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import runtime
from config import Config, load_config
from models import MultiTrainLoss, count_flops

MODES = ("data", "data-peer", "model", "e2e")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True)
    p.add_argument("--mode", default="data,data-peer,model,e2e", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--peer-workers", type=int, default=2, help="DataLoader workers of data-peer")
    p.add_argument("--out", default=None, help="output folder for bench.json and bench.png")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, precision: str) -> float:
    """Measured matrix-multiply peak of this device in the training precision (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def model_classes(cfg: Config) -> dict:
    """Class counts from the manifests when present; 400 per dataset otherwise (synthetic model mode)."""
    counts = {}
    for ds in cfg.data.datasets:
        path = os.path.join(ds.manifest, "classes.json")
        counts[ds.name] = len(json.load(open(path))) if os.path.isfile(path) else 400
    return counts


def bench_model(cfg: Config, env: runtime.Env, iters: int, warmup: int) -> dict:
    from train import build_optimizer  # the exact optimizer of training
    torch.manual_seed(0)
    num_classes = model_classes(cfg)
    model = runtime.build_model(cfg, num_classes).to(env.device)
    if cfg.model.compile:
        model = torch.compile(model)
    plain = runtime.unwrap(model)
    frames, crop = runtime.input_geometry(cfg)
    precision = runtime.resolve_precision(cfg, env.device)
    optimizer = build_optimizer(cfg, model, env.device)
    loss_fn = MultiTrainLoss(list(num_classes), w_proj=cfg.loss.w_proj, w_inf=cfg.loss.w_inf)
    b = cfg.data.batch_size
    video = torch.randn(b, 3, frames, crop, crop, device=env.device)  # (B, 3, T, H, W)
    ids = torch.arange(b, device=env.device) % len(num_classes)
    masks = torch.nn.functional.one_hot(ids, len(num_classes)).float()  # (B, N)
    targets = {n: torch.full((b, c), 1.0 / c, device=env.device) for n, c in num_classes.items()}
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast(precision, env.device):
            out = model(video)
        loss, _ = loss_fn(out, targets, masks)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync(env.device)
    t0 = time.perf_counter()
    for i in range(iters):
        step()
        progress("model", i + 1, iters, t0, b)
    sync(env.device)
    elapsed = time.perf_counter() - t0
    clips_s = b * iters / elapsed
    macs = count_flops(plain.backbone, (1, 3, frames, crop, crop))  # multiply-adds per clip, forward
    tflops = clips_s * 3 * 2 * macs / 1e12  # training ≈ 3 forwards; 2 flops per multiply-add
    peak = matmul_peak_tflops(env.device, precision)
    return {"clips_per_s": clips_s, "batch": b, "precision": precision, "gmacs_per_clip": macs / 1e9,
            "tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak,
            "peak_mem_gb": runtime.memory_gb(env.device),
            "act_checkpoint": cfg.model.act_checkpoint, "compile": cfg.model.compile}


def progress(mode: str, i: int, n: int, t0: float, per_iter: int) -> None:
    rate = per_iter * i / max(time.perf_counter() - t0, 1e-9)
    print(f"\r  {mode}: {i}/{n} iterations, {rate:.1f} clips/s", end="\n" if i == n else "", flush=True)


class TimedRun:
    """Pulls warmup + iters batches from a loader across epochs; only the last `iters` are timed,
    with the time spent waiting for them (train.py's data-wait measure)."""

    def __init__(self, mode: str, device: torch.device, warmup: int, iters: int):
        self.mode, self.device, self.warmup, self.iters = mode, device, warmup, iters
        self.done, self.clips, self.waited, self.t0 = 0, 0, 0.0, None

    def batches(self, loader):
        from train import timed
        epoch = 0
        while self.done < self.warmup + self.iters:
            for batch, wait_s in timed(loader.epoch(epoch)):
                if self.done == self.warmup:
                    sync(self.device)
                    self.t0, wait_s = time.perf_counter(), 0.0
                self.waited += wait_s if self.done >= self.warmup else 0.0
                yield batch
                if self.done >= self.warmup + self.iters:
                    return
            epoch += 1

    def count(self, batch) -> None:
        self.done += 1
        if self.done > self.warmup:
            self.clips += batch.video.shape[0]
            progress(self.mode, self.done - self.warmup, self.iters, self.t0, batch.video.shape[0])

    def finish(self) -> tuple[int, float]:
        sync(self.device)
        return self.clips, time.perf_counter() - self.t0


def bench_data(cfg: Config, env: runtime.Env, iters: int, warmup: int) -> dict:
    from dali_pipes import build_train_loader
    frames, crop = runtime.input_geometry(cfg)
    loader = build_train_loader(cfg, num_frames=frames, crop_size=crop, rank=env.rank,
                                world_size=env.world_size, device=env.device)
    run = TimedRun("data", env.device, warmup, iters)
    for batch in run.batches(loader):
        run.count(batch)
    clips, elapsed = run.finish()
    loader.close()
    return {"clips_per_s": clips / elapsed, "frames_per_s": clips * frames / elapsed,
            "batch": cfg.data.batch_size, "decode_device": cfg.data.decode_device, "threads": cfg.data.num_threads}


def bench_data_peer(cfg: Config, env: runtime.Env, iters: int, warmup: int, workers: int) -> dict:
    from dali_pipes.peer import peer_throughput
    frames, crop = runtime.input_geometry(cfg)
    result = peer_throughput(cfg, num_frames=frames, crop_size=crop, batches=iters, warmup=warmup,
                             workers=workers)
    result.setdefault("frames_per_s", result["clips_per_s"] * frames)
    result["workers"] = workers
    return result


def bench_e2e(cfg: Config, env: runtime.Env, iters: int, warmup: int) -> dict:
    """Real optimizer steps of train.py's train_step, fed by the DALI loader."""
    from dali_pipes import MixupCutmix, build_train_loader
    from train import build_optimizer, train_step
    frames, crop = runtime.input_geometry(cfg)
    loader = build_train_loader(cfg, num_frames=frames, crop_size=crop, rank=env.rank,
                                world_size=env.world_size, device=env.device)
    torch.manual_seed(0)
    model = runtime.build_model(cfg, loader.num_classes).to(env.device)
    if cfg.model.compile:
        model = torch.compile(model)
    precision = runtime.resolve_precision(cfg, env.device)
    optimizer = build_optimizer(cfg, model, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    loss_fn = MultiTrainLoss(loader.names, w_proj=cfg.loss.w_proj, w_inf=cfg.loss.w_inf)
    mixup = MixupCutmix(loader.num_classes, cfg.data.mixup_alpha, cfg.data.cutmix_alpha,
                        cfg.data.mixup_prob, cfg.data.mixup_switch_prob, cfg.data.label_smoothing)
    gen = torch.Generator(device=env.device).manual_seed(0)
    run = TimedRun("e2e", env.device, warmup, iters)
    for batch in run.batches(loader):
        train_step(model, loss_fn, [batch], mixup, optimizer, scaler, cfg, precision, env.device, gen)
        run.count(batch)
    clips, elapsed = run.finish()
    loader.close()
    return {"clips_per_s": clips / elapsed, "data_wait_frac": run.waited / elapsed, "precision": precision,
            "batch": cfg.data.batch_size}


def versions() -> dict:
    import nvidia.dali
    v = {"python": platform.python_version(), "torch": torch.__version__, "dali": nvidia.dali.__version__}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["driver_gpu"] = torch.cuda.get_device_name()
    return v


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def print_table(results: dict) -> None:
    print(f"\n{'mode':<10} {'clips/s':>10}  details")
    for mode, r in results.items():
        details = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items() if k != "clips_per_s")
        print(f"{mode:<10} {r['clips_per_s']:>10.2f}  {details}")


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(results)
    values = [results[m]["clips_per_s"] for m in modes]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(modes, values, color=["#4c72b0", "#8c8c8c", "#55a868", "#c44e52"][:len(modes)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("clips / s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.cfg, args.overrides, check_paths=args.modes != ["model"])
    env = runtime.setup_env()
    out_dir = args.out or os.path.join(cfg.train.output_dir, "bench")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    runners = {"data": lambda: bench_data(cfg, env, args.iters, args.warmup),
               "data-peer": lambda: bench_data_peer(cfg, env, args.iters, args.warmup, args.peer_workers),
               "model": lambda: bench_model(cfg, env, args.iters, args.warmup),
               "e2e": lambda: bench_e2e(cfg, env, args.iters, args.warmup)}
    for mode in args.modes:
        runtime.log(env, f"[{mode}] {cfg.model.arch}, batch {cfg.data.batch_size}, device {env.device}")
        results[mode] = runners[mode]()
    if "data" in results and "data-peer" in results:
        results["data"]["ratio_vs_peer"] = results["data"]["clips_per_s"] / results["data-peer"]["clips_per_s"]
    if "e2e" in results and "model" in results:
        results["e2e"]["ratio_vs_model"] = results["e2e"]["clips_per_s"] / results["model"]["clips_per_s"]
    if env.is_main:
        report = {"results": results, "device": device_name(env.device), "versions": versions(),
                  "config": args.cfg, "overrides": args.overrides, "arch": cfg.model.arch,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(report, f, indent=2)
        plot(results, os.path.join(out_dir, "bench.png"), f"{cfg.model.arch} on {report['device']}")
        print_table(results)
        print(f"wrote {os.path.join(out_dir, 'bench.json')} and bench.png")
    runtime.teardown_env(env)
    return 0


if __name__ == "__main__":
    runtime.run_cli(main)
