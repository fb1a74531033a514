"""MultiTrain training: one backbone, one head per dataset, informative and projection losses.

    python train.py --cfg configs/multi.yaml [key=value ...]
    torchrun --nproc_per_node 8 train.py --cfg configs/multi.yaml

Reads top to bottom: parse and validate the config, build data and model, resume, loop, save.
"""
from __future__ import annotations

import argparse

from config import ConfigError, exit_on_config_error, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="YAML config (see configs/ and config.py)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (latest checkpoint in the run directory, if any), 'none' (a new "
                        "run; an earlier run in train.output_dir is moved aside), or a checkpoint path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 data.batch_size=8")
    return p.parse_args(argv)


if __name__ == "__main__":  # a config mistake shows in a second, before torch and DALI load
    exit_on_config_error(lambda a: load_config(a.cfg, a.overrides), parse_args())

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import runtime  # noqa: E402
from config import Config, config_to_dict, save_config  # noqa: E402
from dali_pipes import MixupCutmix, build_train_loader  # noqa: E402
from dali_pipes.erasing import BatchAugment, RandomErasing  # noqa: E402
from eval import EvaluationStopped, evaluate, save_results  # noqa: E402
from models import MultiTrainLoss  # noqa: E402


# ---------------------------------------------------------------- optimisation

def param_groups(model: torch.nn.Module, weight_decay: float, proj_lr_scale: float = 1.0) -> list[dict]:
    """No weight decay on biases, norms, position tables and other 1-D or table parameters;
    the projection heads in a group of their own when their learning rate is scaled."""
    proj_heads = getattr(model, "proj", None)  # absent on a bare backbone
    own_group = {id(p) for p in proj_heads.parameters()} \
        if proj_heads is not None and proj_lr_scale != 1.0 else set()
    scaled, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in own_group:
            scaled.append(p)
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "rel_pos" in name or "cls_token" in name
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scaled:
        groups.append({"params": scaled, "weight_decay": weight_decay, "lr_scale": proj_lr_scale})
    return groups


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.proj_lr_scale)
    kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if cfg.optim.impl == "apex":
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex, built from source by the user
        except ImportError as e:
            raise RuntimeError(
                "optim.impl=apex needs NVIDIA apex (github.com/NVIDIA/apex, built with its CUDA "
                "extensions); it is not on the package registry. Install it or use optim.impl=torch, "
                "whose fused AdamW is as fast on current GPUs.") from e
        optimizer = FusedAdam(groups, adam_w_mode=True, **kwargs)
    else:
        # Fused AdamW (CUDA and CPU) also takes a device-side found_inf flag, which skips a
        # non-finite step without reading anything back to the host (train_step).
        optimizer = torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs)
    set_lr(optimizer, cfg.optim.lr)  # the scaled group at its own rate from the start (bench.py)
    return optimizer


def lr_at(cfg: Config, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Linear warm-up from warmup_start_lr, then cosine decay to min_lr, per optimizer step."""
    o = cfg.optim
    warmup = int(o.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return o.warmup_start_lr + (o.lr - o.warmup_start_lr) * step / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # lr_scale: the projection heads' group


# What a resumed run should not change without being told: how much a step trains on and how.
RECIPE_KEYS = (("data", "batch_size", None), ("data", "num_sample", 1), ("optim", "global_batch", None),
               ("optim", "lr", None), ("optim", "epochs", None), ("model", "arch", None))


def recipe_changes(saved: dict, cfg: Config) -> list[str]:
    """Notes on recipe settings that differ from the checkpoint's config (a key the
    checkpoint predates counts as its default then)."""
    lines = []
    for section, key, default in RECIPE_KEYS:
        before = (saved.get(section) or {}).get(key, default)
        now = getattr(getattr(cfg, section), key)
        if before is not None and before != now:
            lines.append(f"note: {section}.{key} is {now!r} in this run, {before!r} in the "
                         "checkpoint's: training continues with the new value")
    return lines


def mixup_pairs_note(cfg: Config) -> list[str]:
    """Mixup pairs clip i with clip B-1-i of a process's batch; with copies of an odd number of
    videos the middle video's copies are partners (all of them with one video a batch)."""
    d = cfg.data
    mixing = d.mixup_prob > 0 and (d.mixup_alpha > 0 or d.cutmix_alpha > 0)
    if d.num_sample > 1 and mixing and d.batch_size % 2:
        return [f"note: data.batch_size {d.batch_size} is odd with data.num_sample {d.num_sample}: "
                "mixup pairs the middle video's copies with each other (as PySlowFast does); an "
                "even data.batch_size gives every clip a partner from another video"]
    return []


def repeated_note(cfg: Config) -> str:
    n = cfg.data.num_sample
    return f" x {n} augmented clips each (data.num_sample)" if n > 1 else ""


def accumulation_steps(cfg: Config, world_size: int) -> int:
    per_step = cfg.data.batch_size * world_size
    if cfg.optim.global_batch % per_step:
        raise ConfigError(
            f"config key 'optim.global_batch': {cfg.optim.global_batch} is not a multiple of "
            f"data.batch_size x processes = {cfg.data.batch_size} x {world_size}; change one of them")
    return cfg.optim.global_batch // per_step


# ---------------------------------------------------------------- preemption

class StopFlag:
    """SIGTERM/SIGUSR1 (cluster preemption) and Ctrl-C (SIGINT) ask the loop to save and exit at
    the next step; a second Ctrl-C exits at once."""

    def __init__(self):
        self.requested, self.signal, self._said = False, None, False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # Only flags here: printing from a handler can interrupt a print of the loop itself.
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C: leave now, unsaved
        self.requested, self.signal = True, signal.Signals(signum).name

    def agreed(self, env: runtime.Env) -> bool:
        """All ranks stop at the same step, whichever of them got the signal. The vote is on
        CPU tensors over gloo: no wait for the GPU."""
        if self.requested and not self._said:
            self._said = True
            print(f"\n{self.signal}: saving a checkpoint, then exiting" +
                  (" (Ctrl-C again to exit at once)" if self.signal == "SIGINT" else ""), flush=True)
        if not env.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=env.control_group)
        return bool(flag.item())


# ---------------------------------------------------------------- checkpoints

def checkpoint_state(cfg, model, optimizer, scaler, position, step, nonfinite, meta,
                     eval_pending=False):
    """Everything a resumed run needs; `position` is the loader's place in its epoch ordering
    (global samples), `eval_pending` an evaluation due at this epoch end and not yet done."""
    return {
        "model": runtime.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "loader": position,
        "step": step, "epoch": position["epoch"], "nonfinite": nonfinite,
        "eval_pending": eval_pending,
        "config": config_to_dict(cfg),
        "meta": meta,
    }


def save_checkpoint(env, cfg, run_dir, state) -> str:
    path = os.path.join(run_dir, runtime.CKPT_PATTERN.format(step=state["step"]))
    if env.is_main:
        runtime.atomic_save(state, path)
        runtime.prune_checkpoints(run_dir, cfg.train.keep_ckpts)
    if env.distributed:
        dist.barrier()
    return path


def resume_state(args, run_dir: str, env: runtime.Env):
    """(path, state) to resume from, or (None, None). Rank 0 chooses and makes the lineage it
    continues the only one in the run folder (unreadable newer checkpoints renamed
    *.unreadable, later ones *.superseded); the other ranks then load the same file."""
    if args.resume == "none":
        return None, None
    path = None
    if env.is_main:
        path = _choose_checkpoint(args, run_dir)
    if env.distributed:
        box = [path]
        dist.broadcast_object_list(box, src=0, group=env.control_group)
        path = box[0]
    return (path, runtime.load_checkpoint(path)) if path else (None, None)


def _choose_checkpoint(args, run_dir: str):
    if args.resume == "auto":
        path, state = runtime.latest_checkpoint(run_dir, set_aside=True)
    elif not os.path.isfile(args.resume):
        raise ConfigError(f"--resume {args.resume}: no such checkpoint")
    else:
        path, state = args.resume, runtime.load_checkpoint(args.resume)
    if state is not None:
        for moved in runtime.set_aside_later(run_dir, state["step"]):
            print(f"resuming from step {state['step']}: {moved} renamed *.superseded", flush=True)
    return path


def restore(state, model, optimizer, scaler, loader) -> None:
    runtime.unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loader"])


# ---------------------------------------------------------------- logging

class StepStats:
    """Per-step values summed on the device and read once per log interval (one host sync
    instead of one per value and step). Steps with a non-finite loss are counted, not summed."""

    def __init__(self, run: int = 0):
        self.sums: dict = {}
        self.steps = 0
        self.skipped = None  # () device count of skipped steps in the interval
        # () device count of non-finite steps in a row, carried over intervals (and resumes)
        self.run = float(run) if run else None
        self.worst_run = None  # () longest such run in the interval

    def add(self, values: dict, finite: torch.Tensor) -> None:
        ok = finite.float()
        for k, v in values.items():
            v = torch.where(finite, v.detach().float(), 0.0)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        bad = 1.0 - ok
        self.skipped = bad if self.skipped is None else self.skipped + bad
        self.run = bad if self.run is None else (self.run + 1.0) * bad
        self.worst_run = self.run if self.worst_run is None else torch.maximum(self.worst_run, self.run)
        self.steps += 1

    def read(self) -> tuple[dict, int, int, int]:
        """(means, skipped steps, longest non-finite run, current run). Means are over the
        finite steps and named as logged ("loss/<term>", "loss/ce/<dataset>", "grad_norm"); a
        dataset's CE is averaged over its samples ("n/<d>") and absent when it had none.
        SYNC POINT: one host read of all the sums."""
        keys = list(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys] + [self.skipped, self.worst_run, self.run])
        values = runtime.host_value(stacked)
        if values is None:  # meta stand-in device: nothing to read
            values = [0.0] * len(stacked)
        *sums, skipped, worst, run = values
        total = dict(zip(keys, sums))
        finite_steps = self.steps - int(skipped)
        out = {}
        for k, v in total.items():
            if k.startswith("ce_sum/"):
                n = total["n/" + k[len("ce_sum/"):]]
                if n > 0:
                    out["loss/ce/" + k[len("ce_sum/"):]] = v / n
            elif not k.startswith("n/") and finite_steps:
                out[k if k == "grad_norm" else f"loss/{k}"] = v / finite_steps
        self.sums, self.steps, self.skipped, self.worst_run = {}, 0, None, None
        return out, int(skipped), int(worst), int(run)


class Logger:
    """TensorBoard events and a metrics.jsonl line per logged step, written by rank 0 only. On
    resume, what was logged after the resumed step is dropped (the run logs it again)."""

    def __init__(self, env: runtime.Env, run_dir: str, resumed_step: int = 0):
        self.env = env
        self.tb = None
        self.jsonl = None
        self._shown: set = set()  # datasets whose clips this epoch's images already show
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter
            path = os.path.join(run_dir, "metrics.jsonl")
            _truncate_metrics(path, resumed_step)
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resumed_step + 1
                                    if resumed_step else None)
            self.jsonl = open(path, "a")

    def step(self, step: int, record: dict) -> None:
        if not self.env.is_main:
            return
        clean = {}
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                clean[key] = None  # strict JSON has no NaN; the row says which values were lost
                clean.setdefault("nonfinite", []).append(key)
                continue
            clean[key] = value
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()

    def clips(self, step: int, batch, cfg: Config, names: list[str]) -> None:
        """At each epoch start, strips of frames of up to train.vis_clips augmented clips of
        each dataset, one image per dataset (taken from the first batches that hold it): what
        the network really sees."""
        if not self.env.is_main or cfg.train.vis_clips <= 0:
            return
        if batch.epoch_step == 0:
            self._shown = set()
        missing = set(batch.datasets) - self._shown
        if not missing or batch.epoch_step > 50:
            return
        self._shown |= missing
        video = batch.video  # (B, 3, T, H, W) normalised
        mean = torch.tensor(cfg.data.mean, device=video.device).view(3, 1, 1, 1)
        std = torch.tensor(cfg.data.std, device=video.device).view(3, 1, 1, 1)
        rows: dict = {}
        for i, d in enumerate(batch.datasets):
            if d in missing and len(rows.setdefault(d, [])) < cfg.train.vis_clips:
                clip = (video[i].float() * std + mean).clamp(0, 255) / 255  # (3, T, H, W)
                frames = clip[:, :: max(clip.shape[1] // 8, 1)]  # (3, <=8, H, W)
                rows[d].append(torch.cat(list(frames.unbind(1)), dim=2))  # (3, H, <=8·W)
        for d, strips in rows.items():  # SYNC POINT: once an epoch
            self.tb.add_image(f"train_clips/{names[d]}", torch.cat(strips, dim=1).cpu(), step)

    def routes(self, loader, step: int) -> None:
        """How many files of each dataset each decoder reads (data/routes/<dataset>/<route>)."""
        if not self.env.is_main:
            return
        for name, routes in loader.route_summaries().items():
            for route, count in routes["summary"].items():
                self.tb.add_scalar(f"data/routes/{name}/{route}", count, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.env.is_main:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.jsonl.close()


def _truncate_metrics(path: str, step: int) -> None:
    """Keeps the metrics.jsonl rows up to `step` (all of them on a fresh start: step 0 means
    nothing was resumed); a torn last line of a killed run is dropped too."""
    if not step or not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class QuarantineReporter:
    """One console line per quarantined file, at most `per_minute` a minute (the rest are
    counted and summed up in the next line), rank 0's and every rank's alike."""

    def __init__(self, env: runtime.Env, per_minute: int = 10):
        self.env, self.per_minute = env, per_minute
        self.window_t0, self.shown, self.hidden = time.monotonic(), 0, 0

    def __call__(self, dataset: str, path: str, reason: str) -> None:
        now = time.monotonic()
        if now - self.window_t0 > 60:
            self.window_t0, self.shown = now, 0
        if self.shown >= self.per_minute:
            self.hidden += 1
            return
        self.shown += 1
        more = f" (+{self.hidden} more not shown)" if self.hidden else ""
        self.hidden = 0
        print(f"[rank {self.env.rank}] quarantined {dataset}: {path}: {reason}{more}", flush=True)


# ---------------------------------------------------------------- the loop

def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Fused AdamW skips its update on the device when optimizer.found_inf is set."""
    return any(g.get("fused") for g in optimizer.param_groups)


def train_step(model, ddp, loss_fn, batches, augment, optimizer, scaler, cfg, precision, rng):
    """One optimizer step over `len(batches)` accumulated micro-batches.

    Returns (values, finite): the logged values as device tensors and a () bool tensor. Nothing
    is read back to the host with a fused optimizer (a non-finite step is skipped on the
    device); other optimizers read one flag. The loss is computed on the global batch (the loss
    gathers over ranks), so every rank agrees on skipping a bad step. `ddp` is the
    DistributedDataParallel wrapper (None in one process): under torch.compile the model is
    not a DDP instance, so no_sync is taken from `ddp` itself.
    """
    optimizer.zero_grad(set_to_none=True)
    values: dict = {}
    for i, batch in enumerate(batches):
        video, targets, masks = augment(batch.video, batch.dataset_ids, batch.labels, rng)
        last = i == len(batches) - 1
        with ddp.no_sync() if ddp is not None and not last else nullcontext():
            with runtime.autocast(precision, video.device):
                out = model(video)  # logits {name: (B, C_d)}, embed (B, D_e), proj {(s, d): (B, C_d)}
            loss, terms = loss_fn(out, targets, masks)
            scaler.scale(loss / len(batches)).backward()
        for k, v in terms.items():
            # per-dataset CE as sums and sample counts: averaged over the samples really seen
            v = v / len(batches) if not k.startswith(("ce_sum/", "n/")) else v
            values[k] = values[k] + v if k in values else v
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    finite = torch.isfinite(values["total"]) & torch.isfinite(grad_norm)  # () bool, on the device
    if precision == "fp16":
        scaler.step(optimizer)  # GradScaler skips non-finite fp16 steps itself
    elif supports_found_inf(optimizer):
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
        optimizer.step()
    elif runtime.host_value(finite) is not False:  # SYNC POINT (non-fused optimizers only)
        optimizer.step()
    scaler.update()
    values["grad_norm"] = grad_norm
    return values, finite


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)  # every config error surfaces here, before any work
    env = runtime.setup_env()
    runtime.check_device_config(cfg, env.device)
    accum = accumulation_steps(cfg, env.world_size)
    run_dir = cfg.train.output_dir
    if env.is_main:
        for note in runtime.prepare_run_dir(run_dir, fresh=args.resume == "none"):
            runtime.log(env, note)
    if env.distributed:
        dist.barrier(group=env.control_group)  # the folder is ready before any rank uses it
    if env.device.type == "cuda" and env.is_main:  # driver, NVDEC, limits: say what will hurt
        from dali_pipes.doctor import preflight
        for line in preflight(cfg, env):
            runtime.log(env, line)

    # ---- build
    num_frames, crop = runtime.input_geometry(cfg)
    loader = build_train_loader(cfg, num_frames=num_frames, crop_size=crop, rank=env.rank,
                                world_size=env.world_size, device=env.device,
                                on_quarantine=QuarantineReporter(env))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every run
    model = runtime.build_model(cfg, loader.num_classes).to(env.device)
    runtime.init_from_pretrained(cfg, model, env)
    meta = {"classes": loader.classes, "num_frames": num_frames, "crop_size": crop}
    loss_fn = MultiTrainLoss(loader.names, lambdas={d.name: d.loss_weight for d in cfg.data.datasets},
                             w_proj=cfg.loss.w_proj, w_inf=cfg.loss.w_inf,
                             var_weight=cfg.loss.var_weight, cov_weight=cfg.loss.cov_weight)
    augment = build_batch_augment(cfg, loader.num_classes)
    optimizer = build_optimizer(cfg, model, env.device)
    precision = runtime.resolve_precision(cfg, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    steps_per_epoch = loader.steps_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch has {loader.steps_per_epoch} batches, fewer than the {accum} "
                          "accumulated per optimizer step: lower optim.global_batch or add data")
    total_steps = cfg.optim.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    # ---- resume
    step, epoch, nonfinite, eval_pending = 0, 0, 0, False
    ckpt_path, state = resume_state(args, run_dir, env)
    if state is not None:
        restore(state, model, optimizer, scaler, loader)
        step, epoch, nonfinite = state["step"], state["epoch"], state["nonfinite"]
        eval_pending = bool(state.get("eval_pending"))
        runtime.log(env, f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
        for line in recipe_changes(state.get("config") or {}, cfg):
            runtime.log(env, line)
    if env.is_main:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.distributed else None
    train_model = torch.compile(ddp or model) if cfg.model.compile else (ddp or model)
    micro_batch = runtime.clips_per_batch(cfg) * env.world_size
    if cfg.loss.w_inf and micro_batch <= cfg.model.expander_dim:
        # The covariance of B clips has rank < B: with unit variances its off-diagonal term is
        # at least D_e/(B-1) - 1 (trace^2/rank - trace, over D_e), a constant of the setting.
        floor = cfg.model.expander_dim / (micro_batch - 1) - 1 if micro_batch > 1 else float("inf")
        runtime.log(env, f"note: the informative loss sees {micro_batch} clips per step with "
                         f"expander_dim {cfg.model.expander_dim}: its covariance term stays above "
                         f"{floor:.2f} ({cfg.loss.w_inf * cfg.loss.cov_weight * floor:.2f} of the "
                         "loss); more clips per step (GPUs x data.batch_size x data.num_sample) "
                         "lower it")
    logger = Logger(env, run_dir, resumed_step=step)
    stop = StopFlag()
    runtime.log(env, f"training {cfg.model.arch} on {', '.join(loader.names)}: {env.world_size} process(es), "
                     f"{precision}, batch {cfg.data.batch_size}x{env.world_size}x{accum} = "
                     f"{cfg.optim.global_batch} videos{repeated_note(cfg)}, {steps_per_epoch} "
                     f"steps/epoch, {total_steps} steps")
    for line in describe_data(loader) + mixup_pairs_note(cfg):
        runtime.log(env, line)
    logger.text("config", "```\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + "```", step)
    logger.routes(loader, step)

    # ---- loop
    stats, speed, waited, busy_t0 = StepStats(nonfinite), runtime.Throughput(), 0.0, time.perf_counter()
    run_t0, steps_at_start = time.perf_counter(), step
    # Waiting for a batch is cut short by a signal in one process; ranks must stop together.
    waiting_stop = None if env.distributed else (lambda: stop.requested)
    if eval_pending and not run_evaluation(env, cfg, model, loader, logger, step, num_frames,
                                           crop, run_dir, stop):
        return finish_stopped(env, logger, loader, step)
    while step < total_steps:
        batches = []
        for batch, wait_s in timed(loader.epoch(epoch, should_stop=waiting_stop)):
            waited += wait_s
            logger.clips(step, batch, cfg, loader.names)
            batches.append(batch)
            if len(batches) < accum:
                continue
            set_lr(optimizer, lr_at(cfg, step, steps_per_epoch, total_steps))
            # Random erasing, mixup, drop path and dropout: a function of (seed, step, rank),
            # different on every rank and the same on resume (no generator state to restore).
            rng = np.random.default_rng([cfg.train.seed, step, env.rank])
            torch.manual_seed(int(rng.integers(2**62)))
            values, finite = train_step(train_model, ddp, loss_fn, batches, augment, optimizer,
                                        scaler, cfg, precision, rng)
            stats.add(values, finite)
            speed.add(sum(b.video.shape[0] for b in batches) * env.world_size)
            epoch_step = batches[-1].epoch_step // accum + 1  # optimizer steps done in this epoch
            batches = []
            step += 1
            end_of_epoch = epoch_step == steps_per_epoch
            if every(step, cfg.train.log_every) or step == total_steps or (
                    not cfg.train.log_every and end_of_epoch):
                busy = time.perf_counter() - busy_t0
                nonfinite = log_step(env, cfg, logger, loader, stats, step, epoch, total_steps,
                                     steps_at_start, run_t0, speed, optimizer,
                                     min(waited / max(busy, 1e-9), 1.0))
                waited, busy_t0 = 0.0, time.perf_counter()
            stopping = stop.agreed(env)
            last_of_epoch = end_of_epoch or step == total_steps
            # An evaluation due here is remembered by this step's checkpoint: a run stopped
            # during it resumes into it.
            epoch_eval = last_of_epoch and (step == total_steps or every(epoch + 1, cfg.train.eval_every))
            step_eval = not last_of_epoch and every(step, cfg.train.eval_every_steps)
            if stopping or last_of_epoch or step_eval or every(step, cfg.train.ckpt_every):
                position = {"epoch": epoch + 1, "samples": 0, "quarantined": loader.num_quarantined} \
                    if end_of_epoch else loader.state_dict()
                save_checkpoint(env, cfg, run_dir, checkpoint_state(
                    cfg, model, optimizer, scaler, position, step, nonfinite, meta,
                    eval_pending=epoch_eval or step_eval))
            if stopping:
                return finish_stopped(env, logger, loader, step)
            if step_eval and not run_evaluation(env, cfg, model, loader, logger, step, num_frames,
                                                crop, run_dir, stop):
                return finish_stopped(env, logger, loader, step)
            if last_of_epoch:
                break
        else:  # the epoch's batches ended without a break: a signal cut the wait for data
            if stop.agreed(env):  # save where the steps stopped (unstepped batches replay)
                save_checkpoint(env, cfg, run_dir, checkpoint_state(
                    cfg, model, optimizer, scaler, loader.state_dict(pending=len(batches)), step,
                    nonfinite, meta))
                return finish_stopped(env, logger, loader, step)
        epoch += 1
        if step == total_steps or every(epoch, cfg.train.eval_every):
            if not run_evaluation(env, cfg, model, loader, logger, step, num_frames, crop,
                                  run_dir, stop):
                return finish_stopped(env, logger, loader, step)

    # ---- save
    export_inference(env, cfg, model, meta, run_dir)
    runtime.log(env, f"done: {step} steps in {runtime.format_eta(time.perf_counter() - run_t0)}; "
                     f"TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tb')}")
    for line in quarantine_summary(loader):
        runtime.log(env, line)
    shutdown(env, logger, loader)
    return 0


def every(step: int, period: int) -> bool:
    """Step `step` is a multiple of `period`; a period of 0 means never."""
    return period > 0 and step % period == 0


def build_batch_augment(cfg: Config, num_classes: dict) -> BatchAugment:
    """Random erasing then Mixup/CutMix, on the training device (dali_pipes/erasing.py)."""
    d = cfg.data
    mixup = MixupCutmix(num_classes, d.mixup_alpha, d.cutmix_alpha, d.mixup_prob,
                        d.mixup_switch_prob, d.label_smoothing, cross_dataset=d.mixup_cross_dataset)
    return BatchAugment(mixup, RandomErasing(d.random_erase_prob) if d.random_erase_prob else None)


def timed(iterable):
    """Yields (item, seconds the loop waited for it): the data-wait share of step time."""
    it = iter(iterable)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        yield item, time.perf_counter() - t0


def describe_data(loader) -> list[str]:
    """One line per dataset: its size, where its files are decoded, what is left out."""
    from dali_pipes import routing
    names = {routing.NVDEC: "NVDEC", routing.DALI_CPU: "DALI CPU", routing.PYAV: "PyAV fallback"}
    lines = []
    for d, (name, routes) in enumerate(loader.route_summaries().items()):
        parts = []
        for r, count in routes["summary"].items():
            if count:
                why = routes["reasons"][r] if r == routing.PYAV else {}
                detail = " (" + ", ".join(f"{k} {v:,}" for k, v in sorted(
                    why.items(), key=lambda kv: -kv[1])[:3]) + ")" if why else ""
                parts.append(f"{names[r]} {count:,}{detail}")
        excluded = sum(loader.excluded.get(name, {}).values())
        line = f"{name}: {len(loader.records[d]):,} videos: " + ", ".join(parts)
        if excluded:
            kinds = ", ".join(f"{v} x {k}" for k, v in loader.excluded[name].items())
            line += f"; {excluded:,} left out (quarantined earlier or probe errors: {kinds})"
        lines.append(line)
    return lines


def quarantine_summary(loader) -> list[str]:
    if not loader.quarantined:
        return []
    return [f"quarantined during this run: {name}: " + ", ".join(f"{v} x {k}" for k, v in kinds.items())
            for name, kinds in loader.quarantined.items()]


def finish_stopped(env, logger, loader, step) -> int:
    runtime.log(env, f"stop signal: checkpoint saved at step {step}; the same command resumes")
    shutdown(env, logger, loader)
    return 0


def shutdown(env, logger, loader) -> None:
    logger.close()
    loader.close()
    runtime.teardown_env(env)


def log_step(env, cfg, logger, loader, stats, step, epoch, total_steps, steps_at_start, run_t0,
             speed, optimizer, wait_frac) -> int:
    """Reads the interval's values (the one host sync of the interval), logs them, and stops
    the run after too many non-finite steps in a row; returns the current run length."""
    means, skipped, worst_run, nonfinite = stats.read()
    clips_s = speed.rate_and_reset()
    record = {"loss/total": float("nan"), "grad_norm": float("nan"), **means,
              "lr": optimizer.param_groups[0]["lr"],
              "perf/clips_per_s": clips_s, "perf/data_wait_frac": wait_frac,
              "data/quarantined": float(loader.num_quarantined), "steps_skipped": float(skipped)}
    for kind, gb in runtime.memory_gb(env.device).items():
        record[f"perf/gpu_mem_{kind}_gb"] = gb
    logger.step(step, record)
    elapsed = time.perf_counter() - run_t0
    eta = elapsed / max(step - steps_at_start, 1) * (total_steps - step)
    skipped_note = f" ({skipped} non-finite steps skipped)" if skipped else ""
    runtime.log(env, f"epoch {epoch + 1} step {step}/{total_steps} loss {record['loss/total']:.4f} "
                     f"lr {record['lr']:.2e} |g| {record['grad_norm']:.2f} {clips_s:.1f} clips/s "
                     f"data-wait {100 * wait_frac:.0f}% quarantined {loader.num_quarantined} "
                     f"eta {runtime.format_eta(eta)}{skipped_note}")
    if worst_run > cfg.train.max_nonfinite:
        raise RuntimeError(
            f"{worst_run} non-finite steps in a row (train.max_nonfinite="
            f"{cfg.train.max_nonfinite}): lower optim.lr, check the data, or use "
            "train.precision=bf16/fp32")
    return nonfinite


def run_evaluation(env, cfg, model, loader, logger, step, num_frames, crop, run_dir, stop) -> bool:
    """Evaluates every dataset with a val_manifest; False when a stop signal cut it short (the
    checkpoint of this epoch end has eval_pending, so the resumed run evaluates first)."""
    if not any(ds.val_manifest for ds in cfg.data.datasets):
        return True
    plain = runtime.unwrap(model)
    try:
        # Ranks' batch counts differ: a per-batch stop only in one process, otherwise a vote
        # between datasets (every rank votes as often).
        results = evaluate(plain, cfg, env, num_frames, crop, loader.classes,
                           should_stop=None if env.distributed else (lambda: stop.requested),
                           stop_between=lambda: stop.agreed(env))
    except EvaluationStopped:
        return False
    if env.is_main:
        save_results(results, os.path.join(run_dir, "eval.json"), logger.tb, step, plain,
                     loader.classes, cfg.data.relations)
    plain.train()
    return True


def export_inference(env, cfg, model, meta, run_dir) -> None:
    """Weights for inference: heads kept, training-only projections and expander left out."""
    from models import inference_state_dict
    if env.is_main:
        runtime.atomic_save({"model": inference_state_dict(runtime.unwrap(model)),
                             "config": config_to_dict(cfg), "meta": meta, "inference": True},
                            os.path.join(run_dir, "model_inference.pt"))


if __name__ == "__main__":
    runtime.run_cli(main)
