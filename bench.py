"""Throughput benchmark, configured like train.py.

    python bench.py --cfg configs/multi.yaml --mode data,data-peer,model,e2e [key=value ...]

data       the DALI training pipeline alone: clips/s and output frames/s
data-peer  the same decoding and augmentation the usual way (PyAV + torch DataLoader workers)
           on the same files; reported with the ratio data / data-peer
data-decord, data-torchcodec
           the same with decord (decord2; the MultiTrain authors' decoder) or torchcodec
           decoding; a peer that is not installed is reported as skipped
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

from config import exit_on_config_error, load_config

MODES = ("data", "data-peer", "data-decord", "data-torchcodec", "model", "e2e")
PEER_MODES = {"data-peer": "pyav", "data-decord": "decord", "data-torchcodec": "torchcodec"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True)
    p.add_argument("--mode", default="data,data-peer,model,e2e", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--peer-workers", type=int, default=2, help="DataLoader workers of data-peer")
    p.add_argument("--batch-search", default="",
                   help="model mode: comma list of batch sizes; the largest that fits in GPU "
                        "memory is benchmarked (e.g. 64,48,32,24,16,12,8,4)")
    p.add_argument("--out", default=None, help="output folder for bench.json and bench.png")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    return args


if __name__ == "__main__":  # a config mistake shows in a second, before torch and DALI load
    _args = parse_args()
    exit_on_config_error(load_config, _args.cfg, _args.overrides, check_paths=_args.modes != ["model"])

import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import runtime  # noqa: E402
from config import Config  # noqa: E402
from models import MultiTrainLoss, count_flops  # noqa: E402


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


# Dense bf16 (fp16 where the GPU has no bf16) tensor-core peaks of the datasheets, TFLOP/s.
DATASHEET_TFLOPS = (("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
                    ("L40S", 362.0), ("L40", 181.0), ("A10", 125.0), ("V100", 125.0))


def datasheet_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_TFLOPS if key in name), None)


def train_flops_per_clip(macs: float, act_checkpoint: bool) -> float:
    """Flops of one training clip: forward, backward (2x forward) and, with activation
    checkpointing, the forward recomputed in backward; 2 flops per multiply-add."""
    return 2 * macs * (4 if act_checkpoint else 3)


def bench_model(cfg: Config, env: runtime.Env, iters: int, warmup: int,
                batch_search: tuple = ()) -> dict:
    from train import build_optimizer  # the exact optimizer of training
    torch.manual_seed(0)
    num_classes = model_classes(cfg)
    model = runtime.build_model(cfg, num_classes).to(env.device)
    train_model = torch.compile(model) if cfg.model.compile else model
    frames, crop = runtime.input_geometry(cfg)
    precision = runtime.resolve_precision(cfg, env.device)
    optimizer = build_optimizer(cfg, model, env.device)
    loss_fn = MultiTrainLoss(list(num_classes), w_proj=cfg.loss.w_proj, w_inf=cfg.loss.w_inf)

    def inputs(b: int):
        video = torch.randn(b, 3, frames, crop, crop, device=env.device)  # (B, 3, T, H, W)
        ids = torch.arange(b, device=env.device) % len(num_classes)
        masks = torch.nn.functional.one_hot(ids, len(num_classes)).float()  # (B, N)
        targets = {n: torch.full((b, c), 1.0 / c, device=env.device) for n, c in num_classes.items()}
        return video, targets, masks

    def step(batch):
        video, targets, masks = batch
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast(precision, env.device):
            out = train_model(video)
        loss, _ = loss_fn(out, targets, masks)
        loss.backward()
        optimizer.step()

    b = largest_batch(step, inputs, batch_search, env.device, optimizer) if batch_search \
        else runtime.clips_per_batch(cfg)
    if batch_search and cfg.model.compile:
        torch._dynamo.reset()  # the search's sizes made the graph dynamic; time the static one
    batch = inputs(b)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    for _ in range(warmup):
        step(batch)
    sync(env.device)
    progress = Progress("model", iters, b)
    for _ in range(iters):
        step(batch)
        progress.tick(sync_device=env.device)
    clips_s = progress.rate()
    macs = count_flops(model.backbone, (1, 3, frames, crop, crop))  # multiply-adds per clip, forward
    tflops = clips_s * train_flops_per_clip(macs, cfg.model.act_checkpoint) / 1e12
    peak = matmul_peak_tflops(env.device, precision)
    sheet = datasheet_tflops(env.device)
    mem = runtime.memory_gb(env.device)
    return {"clips_per_s": clips_s, "batch": b, "precision": precision, "gmacs_per_clip": macs / 1e9,
            "tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak,
            "datasheet_tflops": sheet, "mfu_datasheet": tflops / sheet if sheet else None,
            "peak_mem_allocated_gb": mem.get("allocated", 0.0),
            "peak_mem_reserved_gb": mem.get("reserved", 0.0),
            "act_checkpoint": cfg.model.act_checkpoint, "compile": cfg.model.compile}


def largest_batch(step, inputs, candidates, device: torch.device, optimizer=None) -> int:
    """The largest of `candidates` whose training step fits in the device's memory. cuBLAS and
    cuDNN report a failed allocation as a RuntimeError, not OutOfMemoryError."""
    for b in sorted(set(int(c) for c in candidates), reverse=True):
        fits = False
        try:
            step(inputs(b))
            sync(device)
            fits = True
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not isinstance(exc, torch.OutOfMemoryError) and "ALLOC_FAILED" not in str(exc) \
                    and "out of memory" not in str(exc):
                raise
        print(f"  batch search: {b} {'fits' if fits else 'is out of memory'}", flush=True)
        if fits:
            return b
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)  # the failed step's gradients
        if device.type == "cuda":  # after the except block: its traceback held the tensors
            torch.cuda.empty_cache()
    raise RuntimeError(f"none of the batch sizes {sorted(candidates)} fits in memory")


class Progress:
    """One progress line every ~10% of the iterations (lines stay readable in a log file), the
    rate measured from the end of the first timed iteration (a peer.Window): a batch
    prefetched during warm-up arrives at once, and counting it would report an absurd rate."""

    def __init__(self, mode: str, total: int, per_iter: int):
        from dali_pipes.peer import Window
        self.mode, self.total, self.per_iter = mode, total, per_iter
        self.every = max(1, total // 10)
        self.done, self.window = 0, Window()

    def tick(self, sync_device: torch.device | None = None) -> None:
        self.done += 1
        if sync_device is not None and (self.done == 1 or self.done == self.total
                                        or self.done % self.every == 0):
            sync(sync_device)  # sync point: a rate needs the device's work finished
        self.window.tick(self.per_iter)
        if self.done > 1 and (self.done % self.every == 0 or self.done == self.total):
            print(f"  {self.mode}: {self.done}/{self.total} iterations, {self.rate():.1f} clips/s",
                  flush=True)

    def rate(self) -> float:
        """Clips/s over iterations 2..done (the first only starts the clock)."""
        return self.window.rate()


class TimedRun:
    """Pulls warmup + iters batches from a loader across epochs; the timed ones are measured
    by Progress, with the time spent waiting for them (train.py's data-wait measure)."""

    def __init__(self, mode: str, device: torch.device, warmup: int, iters: int, batch: int):
        self.mode, self.device, self.warmup, self.iters = mode, device, warmup, iters
        self.done, self.waited = 0, 0.0
        self.progress = Progress(mode, iters, batch)

    def batches(self, loader):
        from train import timed
        epoch = 0
        while self.done < self.warmup + self.iters:
            for batch, wait_s in timed(loader.epoch(epoch)):
                if self.done > self.warmup:  # the first timed batch only starts the clock
                    self.waited += wait_s
                yield batch
                if self.done >= self.warmup + self.iters:
                    return
            epoch += 1

    def count(self) -> None:
        self.done += 1
        if self.done > self.warmup:
            self.progress.tick(sync_device=self.device)

    def finish(self) -> tuple[float, float]:
        """(clips/s, share of the timed span spent waiting for data)."""
        span = max(self.progress.window.seconds, 1e-9)
        return self.progress.rate(), min(self.waited / span, 1.0)


def bench_data(cfg: Config, env: runtime.Env, iters: int, warmup: int) -> dict:
    from dali_pipes import build_train_loader
    frames, crop = runtime.input_geometry(cfg)
    loader = build_train_loader(cfg, num_frames=frames, crop_size=crop, rank=env.rank,
                                world_size=env.world_size, device=env.device)
    run = TimedRun("data", env.device, warmup, iters, runtime.clips_per_batch(cfg))
    for _ in run.batches(loader):
        run.count()
    clips_s, _ = run.finish()
    loader.close()
    return {"clips_per_s": clips_s, "frames_per_s": clips_s * frames,
            "batch": cfg.data.batch_size, "num_sample": cfg.data.num_sample,
            "decode_device": decode_name(loader.decode_device), "threads": cfg.data.num_threads}


def decode_name(decode_device: str) -> str:
    return "nvdec" if decode_device == "mixed" else decode_device


def bench_data_peer(cfg: Config, env: runtime.Env, iters: int, warmup: int, workers: int,
                    decoder: str = "pyav") -> dict:
    from dali_pipes.peer import peer_throughput
    frames, crop = runtime.input_geometry(cfg)
    result = peer_throughput(cfg, num_frames=frames, crop_size=crop, batches=iters, warmup=warmup,
                             workers=workers, decoder=decoder)
    if "clips_per_s" in result:
        result.setdefault("frames_per_s", result["clips_per_s"] * frames)
        result["workers"] = workers
    return result


def bench_e2e(cfg: Config, env: runtime.Env, iters: int, warmup: int) -> dict:
    """Real optimizer steps of train.py's train_step, fed by the DALI loader."""
    import numpy as np

    from dali_pipes import build_train_loader
    from train import build_batch_augment, build_optimizer, train_step
    frames, crop = runtime.input_geometry(cfg)
    loader = build_train_loader(cfg, num_frames=frames, crop_size=crop, rank=env.rank,
                                world_size=env.world_size, device=env.device)
    torch.manual_seed(0)
    model = runtime.build_model(cfg, loader.num_classes).to(env.device)
    train_model = torch.compile(model) if cfg.model.compile else model
    precision = runtime.resolve_precision(cfg, env.device)
    optimizer = build_optimizer(cfg, model, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    loss_fn = MultiTrainLoss(loader.names, w_proj=cfg.loss.w_proj, w_inf=cfg.loss.w_inf)
    mixup = build_batch_augment(cfg, loader.num_classes)
    run = TimedRun("e2e", env.device, warmup, iters, runtime.clips_per_batch(cfg))
    for k, batch in enumerate(run.batches(loader)):
        train_step(train_model, None, loss_fn, [batch], mixup, optimizer, scaler, cfg, precision,
                   np.random.default_rng(k))
        run.count()
    clips_s, wait = run.finish()
    loader.close()
    return {"clips_per_s": clips_s, "data_wait_frac": wait, "precision": precision,
            "batch": cfg.data.batch_size, "num_sample": cfg.data.num_sample,
            "decode_device": decode_name(loader.decode_device)}


def versions() -> dict:
    """Versions of what the figures depend on; a package that is absent says so."""
    import importlib
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for key, module in (("dali", "nvidia.dali"), ("pyav", "av")):
        try:
            v[key] = importlib.import_module(module).__version__
        except ImportError:
            v[key] = "not installed"
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name()
    return v


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def print_table(results: dict) -> None:
    print(f"\n{'mode':<16} {'clips/s':>10}  details")
    for mode, r in results.items():
        if "skipped" in r:
            print(f"{mode:<16} {'-':>10}  skipped: {r['skipped']}")
            continue
        details = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items() if k != "clips_per_s")
        print(f"{mode:<16} {r['clips_per_s']:>10.2f}  {details}")


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = [m for m in results if "clips_per_s" in results[m]]  # skipped peers have no bar
    values = [results[m]["clips_per_s"] for m in modes]
    fig, ax = plt.subplots(figsize=(1.4 * len(modes) + 1.5, 3.5))
    colours = {"data": "#4c72b0", "model": "#55a868", "e2e": "#c44e52"}
    bars = ax.bar(modes, values, color=[colours.get(m, "#8c8c8c") for m in modes])
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
               **{mode: (lambda d=decoder: bench_data_peer(cfg, env, args.iters, args.warmup,
                                                           args.peer_workers, d))
                  for mode, decoder in PEER_MODES.items()},
               "model": lambda: bench_model(cfg, env, args.iters, args.warmup,
                                            tuple(int(b) for b in args.batch_search.split(",") if b)),
               "e2e": lambda: bench_e2e(cfg, env, args.iters, args.warmup)}
    for mode in args.modes:
        runtime.log(env, f"[{mode}] {cfg.model.arch}, batch {cfg.data.batch_size} videos x "
                         f"{cfg.data.num_sample} clips, device {env.device}")
        results[mode] = runners[mode]()
    for mode, decoder in PEER_MODES.items():  # DALI against each peer that ran
        if "data" in results and "clips_per_s" in results.get(mode, {}):
            key = "ratio_vs_peer" if decoder == "pyav" else f"ratio_vs_{decoder}"
            results["data"][key] = results["data"]["clips_per_s"] / results[mode]["clips_per_s"]
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
