"""What train.py, eval.py and bench.py share: process setup, the model builder, precision and
checkpoint files. Keeping it here means the three entry points build exactly the same model from
the same config and read each other's checkpoints.
"""
from __future__ import annotations

import datetime
import errno
import glob
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import Config, ConfigError, clip_frames, crop_size, exit_on_config_error
from models import MultiTrainModel, build_backbone, load_pyslowfast

CKPT_PATTERN = "ckpt_{step:08d}.pt"
_CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # Process group for small host-side agreements (the stop flag): gloo on CPU tensors, so
    # agreeing never waits for the GPU's queue. None in a single process.
    control_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_env() -> Env:
    """Joins the torchrun process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # Clip shapes are fixed for a whole run: let cuDNN pick its fastest kernels once.
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    control = None
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Env(rank, world, local_rank, device, control)


# Host reads of device values in the training hot path go through host_value, so they are
# counted (tests assert there are none per step with a fused optimizer) and easy to find.
HOST_READS = {"count": 0}


def host_value(t: torch.Tensor):
    """t as a Python number or list. SYNC POINT: waits for the device's queue to drain.
    Meta tensors (the CPU stand-in for a GPU in tests) carry no values: None."""
    if t.device.type == "meta":
        return None
    HOST_READS["count"] += 1
    return t.tolist()


def teardown_env(env: Env) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def run_cli(main) -> None:
    """Entry-point wrapper: a config error is one clear line and exit code 2, a run that cannot
    go on (a full disk, a fault of the machine) one line and exit code 1, not a traceback."""
    from dali_pipes.faults import InfrastructureError
    try:
        sys.exit(exit_on_config_error(main))
    except (RunError, InfrastructureError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C: the user wants out now
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # more presses: no traceback on the way out
        print("interrupted: exiting without saving", file=sys.stderr)
        sys.exit(130)


def check_device_config(cfg: Config, device: torch.device) -> None:
    """Settings this machine cannot honour, as config errors before any work starts."""
    resolve_precision(cfg, device)
    if cfg.data.decode_device == "gpu" and device.type != "cuda":
        raise ConfigError("config key 'data.decode_device': 'gpu' needs a CUDA GPU, and none is "
                          "usable here; use 'auto' or 'cpu'")


def log(env: Env, *msg) -> None:
    if env.is_main:
        print(*msg, flush=True)


# ---------------------------------------------------------------- precision

def resolve_precision(cfg: Config, device: torch.device) -> str:
    """bf16 where the GPU supports it, fp16 with loss scaling on older GPUs, fp32 on CPU."""
    p = cfg.train.precision
    if p != "auto":
        if p == "fp16" and device.type != "cuda":
            raise ConfigError("config key 'train.precision': fp16 needs a CUDA GPU, and none is "
                              "usable here; use auto, bf16 or fp32")
        return p
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- model

def build_model(cfg: Config, num_classes: dict, projections: bool = True) -> MultiTrainModel:
    """The backbone of cfg.model plus one head per dataset, the expander and the projections.

    Parts whose loss has weight 0 are not built: under DDP a module without gradients fails
    the second step, and an unused module only costs memory."""
    overrides = dict(cls_embed=cfg.model.cls_embed, rel_pos=cfg.model.rel_pos,
                     drop_path=cfg.model.drop_path, act_checkpoint=cfg.model.act_checkpoint,
                     skip_from_norm=cfg.model.skip_from_norm)
    if cfg.model.num_frames:
        overrides["num_frames"] = cfg.model.num_frames
    if cfg.model.crop_size:
        overrides["crop_size"] = cfg.model.crop_size
    backbone = build_backbone(cfg.model.arch, **overrides)
    return MultiTrainModel(backbone, num_classes, head_hidden=cfg.model.head_hidden,
                           head_dropout=cfg.model.head_dropout,
                           expander_hidden=cfg.model.expander_hidden,
                           expander_dim=cfg.model.expander_dim if cfg.loss.w_inf else 0,
                           projections=projections and cfg.loss.w_proj > 0)


def clips_per_batch(cfg: Config) -> int:
    """Clips one process's training batch holds: data.batch_size videos x data.num_sample
    augmented copies each."""
    return cfg.data.batch_size * cfg.data.num_sample


def input_geometry(cfg: Config) -> tuple[int, int]:
    """(frames, crop) the data pipelines must produce for cfg.model: read off a backbone built on
    the meta device, so no memory is allocated and no random numbers are drawn."""
    with torch.device("meta"):
        model = build_model(cfg, {ds.name: 1 for ds in cfg.data.datasets}, projections=False)
    return clip_frames(cfg, model.backbone.num_frames), crop_size(cfg, model.backbone.crop_size)


def init_from_pretrained(cfg: Config, model: MultiTrainModel, env: Env) -> None:
    if cfg.model.pretrained:
        report = load_pyslowfast(model, cfg.model.pretrained, skip=("head",))
        # Loaded keys are many and unsurprising; what was resampled or left out is what to check.
        log(env, f"initialised backbone from {cfg.model.pretrained}: {len(report['loaded'])} "
                 f"tensors loaded, interpolated {report['interpolated'] or 'none'}, "
                 f"skipped {report['skipped'] or 'none'}")


# ---------------------------------------------------------------- checkpoints

class RunError(RuntimeError):
    """A run that cannot go on, for a reason its message states with the fix (no traceback)."""


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file then rename: a kill mid-write never leaves a broken `path`.
    A full disk removes the partial file and raises RunError saying what is full and how much
    was needed; the previous checkpoints stay as they were."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(directory or ".").free
        raise RunError(f"disk full writing {path}: about {state_bytes(obj) / 2**30:.2f} GiB needed, "
                       f"{free / 2**30:.2f} GiB free on the disk of {os.path.abspath(directory or '.')}"
                       f"; the last complete checkpoint is "
                       f"{(list_checkpoints(directory) or ['none'])[-1]}. Free space (or lower "
                       "train.keep_ckpts) and run the same command again") from exc


def state_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (about the size of its checkpoint)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first (temporary files never match)."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "ckpt_*.pt")):
        m = _CKPT_RE.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str) -> int:
    return int(_CKPT_RE.match(os.path.basename(path)).group(1))


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: str, set_aside: bool = False) -> tuple[str, dict] | tuple[None, None]:
    """Newest checkpoint that loads; unreadable ones (a disk that filled up) are skipped loudly,
    and with `set_aside` renamed to *.unreadable, so neither a later resume nor pruning (which
    keeps the newest steps) mistakes them for this run's latest."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, with its reason
            print(f"warning: skipping unreadable checkpoint {path}: {e}", file=sys.stderr)
            if set_aside:
                os.replace(path, path + ".unreadable")
                print(f"warning: renamed it to {path}.unreadable", file=sys.stderr)
    return None, None


def set_aside_later(run_dir: str, step: int) -> list[str]:
    """Resuming from an older checkpoint starts a new lineage from it: checkpoints of later
    steps (the abandoned continuation) are renamed *.superseded, so pruning and the next
    auto-resume only see this lineage."""
    moved = []
    for path in list_checkpoints(run_dir):
        if checkpoint_step(path) > step:
            os.replace(path, path + ".superseded")
            moved.append(path)
    return moved


def prepare_run_dir(run_dir: str, fresh: bool) -> list[str]:
    """Readies the run folder; returns what it did, to be logged. Temporary files of a killed
    or disk-full save are removed (they never count as checkpoints, but fill the disk). A fresh
    start (--resume none) in a folder holding an earlier run moves that run aside as
    <run_dir>.<time>, so its checkpoints are neither pruned nor resumed by mistake."""
    notes = []
    if fresh and os.path.isdir(run_dir) and (list_checkpoints(run_dir) or os.path.exists(
            os.path.join(run_dir, "metrics.jsonl"))):
        aside = f"{run_dir.rstrip('/')}.{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(run_dir, aside)
        notes.append(f"--resume none: the earlier run in {run_dir} was moved to {aside}")
    os.makedirs(run_dir, exist_ok=True)
    stale = glob.glob(os.path.join(run_dir, ".ckpt_*.tmp"))
    for path in stale:
        os.remove(path)
    if stale:
        notes.append(f"removed {len(stale)} partial checkpoint file(s) of an interrupted save")
    return notes


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Keeps the `keep` newest checkpoints (0: all). Only this lineage's files are named
    ckpt_*.pt: unreadable and superseded ones were renamed at resume."""
    for path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        os.remove(path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class Throughput:
    """Clips per second over a sliding window of steps."""

    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate_and_reset(self) -> float:
        now = time.perf_counter()
        rate = self.n / max(now - self.t0, 1e-9)
        self.t0, self.n = now, 0
        return rate


def memory_gb(device: torch.device) -> dict:
    """Peak GPU memory so far in GiB: allocated by tensors and reserved by the caching allocator
    (what the device really had to hold); empty off the GPU."""
    if device.type != "cuda":
        return {}
    return {"allocated": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved": torch.cuda.max_memory_reserved(device) / 2**30}


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
