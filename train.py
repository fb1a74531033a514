"""MultiTrain training: one backbone, one head per dataset, informative and projection losses.

    python train.py --cfg configs/multi.yaml [key=value ...]
    torchrun --nproc_per_node 8 train.py --cfg configs/multi.yaml

Reads top to bottom: parse and validate the config, build data and model, resume, loop, save.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import runtime
from config import Config, ConfigError, config_to_dict, load_config, save_config
from dali_pipes import MixupCutmix, build_train_loader
from eval import evaluate, write_eval_summaries
from models import MultiTrainLoss, projection_pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="YAML config (see configs/ and config.py)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (latest checkpoint in the run directory, if any), 'none', or a checkpoint path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 data.batch_size=8")
    return p.parse_args(argv)


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
        optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)
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


def accumulation_steps(cfg: Config, world_size: int) -> int:
    per_step = cfg.data.batch_size * world_size
    if cfg.optim.global_batch % per_step:
        raise ConfigError(
            f"config key 'optim.global_batch': {cfg.optim.global_batch} is not a multiple of "
            f"data.batch_size x processes = {cfg.data.batch_size} x {world_size}; change one of them")
    return cfg.optim.global_batch // per_step


# ---------------------------------------------------------------- preemption

class StopFlag:
    """SIGTERM/SIGUSR1 (cluster preemption) ask the loop to save and exit at the next step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, env: runtime.Env) -> bool:
        """All ranks stop at the same step, whichever of them got the signal."""
        if not env.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---------------------------------------------------------------- checkpoints

def checkpoint_state(cfg, model, optimizer, scaler, position, step, nonfinite, meta):
    """Everything a resumed run needs; `position` is the next sample of the epoch ordering."""
    return {
        "model": runtime.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "loader": position,
        "step": step, "epoch": position["epoch"], "nonfinite": nonfinite,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
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


def resume_state(args, run_dir: str):
    if args.resume == "none":
        return None, None
    if args.resume == "auto":
        return runtime.latest_checkpoint(run_dir)
    if not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")
    return args.resume, runtime.load_checkpoint(args.resume)


def restore(state, model, optimizer, scaler, loader) -> None:
    runtime.unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


# ---------------------------------------------------------------- logging

class Logger:
    """TensorBoard events and a metrics.jsonl line per step, written by rank 0 only."""

    def __init__(self, env: runtime.Env, run_dir: str):
        self.env = env
        self.tb = None
        self.jsonl = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")

    def step(self, step: int, record: dict) -> None:
        if not self.env.is_main:
            return
        for key, value in record.items():
            self.tb.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()

    def clips(self, step: int, video: torch.Tensor, cfg: Config, dataset_names: list[str]) -> None:
        """A strip of frames of a few augmented clips: what the network really sees."""
        if not self.env.is_main or cfg.train.vis_clips <= 0:
            return
        mean = torch.tensor(cfg.data.mean, device=video.device).view(3, 1, 1, 1)
        std = torch.tensor(cfg.data.std, device=video.device).view(3, 1, 1, 1)
        for i in range(min(cfg.train.vis_clips, video.shape[0])):
            clip = (video[i].float() * std + mean).clamp(0, 255) / 255  # (3, T, H, W)
            frames = clip[:, :: max(clip.shape[1] // 8, 1)]  # (3, <=8, H, W)
            strip = torch.cat(list(frames.unbind(1)), dim=2)  # (3, H, <=8·W)
            self.tb.add_image(f"train_clips/{i}_{dataset_names[i]}", strip.cpu(), step)

    def relations(self, step: int, pairs: dict) -> None:
        if not self.env.is_main:
            return
        for key, rows in pairs.items():
            table = "| source | target | weight |\n|---|---|---|\n" + "\n".join(
                f"| {s} | {t} | {w:.4f} |" for s, t, w in rows)
            self.tb.add_text(f"projection_pairs/{key}", table, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.jsonl.close()


# ---------------------------------------------------------------- the loop

def train_step(model, loss_fn, batches, mixup, optimizer, scaler, cfg, precision, device, generator):
    """One optimizer step over `len(batches)` accumulated micro-batches.

    Returns (loss, terms, grad_norm, applied). The loss is computed on the global batch (the loss
    gathers over ranks), so every rank sees the same value and agrees on skipping a bad step.
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    terms_sum: dict[str, float] = {}
    for i, batch in enumerate(batches):
        video, targets, masks = mixup(batch.video, batch.dataset_ids, batch.labels, generator)
        sync = i == len(batches) - 1 or not isinstance(model, DDP)
        with (model.no_sync() if not sync else torch.enable_grad()):
            with runtime.autocast(precision, device):
                out = model(video)  # logits {name: (B, C_d)}, embed (B, D_e), proj {(s, d): (B, C_d)}
            loss, terms = loss_fn(out, targets, masks)
            scaler.scale(loss / len(batches)).backward()
        total += loss.detach() / len(batches)
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / len(batches)
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    finite = bool(torch.isfinite(total).item()) and bool(torch.isfinite(grad_norm).item())
    if finite or precision == "fp16":  # GradScaler skips non-finite fp16 steps itself
        scaler.step(optimizer)
    scaler.update()
    return float(total), terms_sum, float(grad_norm), finite


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)  # every config error surfaces here, before any work
    env = runtime.setup_env()
    accum = accumulation_steps(cfg, env.world_size)
    run_dir = cfg.train.output_dir
    os.makedirs(run_dir, exist_ok=True)

    # ---- build
    num_frames, crop = runtime.input_geometry(cfg)
    loader = build_train_loader(cfg, num_frames=num_frames, crop_size=crop, rank=env.rank,
                                world_size=env.world_size, device=env.device)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every run
    model = runtime.build_model(cfg, loader.num_classes).to(env.device)
    runtime.init_from_pretrained(cfg, model, env)
    meta = {"classes": loader.classes, "num_frames": num_frames, "crop_size": crop}
    loss_fn = MultiTrainLoss(loader.names, lambdas={d.name: d.loss_weight for d in cfg.data.datasets},
                             w_proj=cfg.loss.w_proj, w_inf=cfg.loss.w_inf,
                             var_weight=cfg.loss.var_weight, cov_weight=cfg.loss.cov_weight)
    mixup = MixupCutmix(loader.num_classes, cfg.data.mixup_alpha, cfg.data.cutmix_alpha,
                        cfg.data.mixup_prob, cfg.data.mixup_switch_prob, cfg.data.label_smoothing)
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
    step, epoch, nonfinite = 0, 0, 0
    ckpt_path, state = resume_state(args, run_dir)
    if state is not None:
        restore(state, model, optimizer, scaler, loader)
        step, epoch, nonfinite = state["step"], state["epoch"], state["nonfinite"]
        runtime.log(env, f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    if env.is_main:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    if env.distributed:
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.model.compile:
        model = torch.compile(model)
    micro_batch = cfg.data.batch_size * env.world_size
    if cfg.loss.w_inf and micro_batch <= cfg.model.expander_dim:
        # The covariance of B samples has rank < B, so with B <= D_e the off-diagonal term cannot
        # reach zero: it keeps a floor of about D_e/(B-1) - 1 whose gradient fights the others.
        runtime.log(env, f"warning: informative loss over {micro_batch} clips per step with expander_dim "
                         f"{cfg.model.expander_dim}: its covariance term cannot vanish; use more clips "
                         "per step (GPUs x data.batch_size) or a smaller model.expander_dim")
    logger = Logger(env, run_dir)
    stop = StopFlag()
    runtime.log(env, f"training {cfg.model.arch} on {', '.join(loader.names)}: {env.world_size} process(es), "
                     f"{precision}, batch {cfg.data.batch_size}x{env.world_size}x{accum} = "
                     f"{cfg.optim.global_batch}, {steps_per_epoch} steps/epoch, {total_steps} steps")

    # ---- loop
    speed, waited, busy_t0 = runtime.Throughput(), 0.0, time.perf_counter()
    run_t0, steps_at_start = time.perf_counter(), step
    while step < total_steps:
        batches = []
        for batch, wait_s in timed(loader.epoch(epoch)):
            waited += wait_s
            if batch.epoch_step == 0:
                logger.clips(step, batch.video, cfg, [loader.names[i] for i in batch.dataset_ids.tolist()])
            batches.append(batch)
            if len(batches) < accum:
                continue
            set_lr(optimizer, lr_at(cfg, step, steps_per_epoch, total_steps))
            generator = torch.Generator(device=env.device).manual_seed(
                cfg.train.seed * 1_000_003 + step)  # mixup draws reproduce on resume
            loss, terms, gnorm, applied = train_step(model, loss_fn, batches, mixup, optimizer, scaler,
                                                     cfg, precision, env.device, generator)
            speed.add(sum(b.video.shape[0] for b in batches) * env.world_size)
            epoch_step = batches[-1].epoch_step // accum + 1  # optimizer steps done in this epoch
            batches = []
            step += 1
            nonfinite = check_nonfinite(env, cfg, step, applied, nonfinite)
            if step % cfg.train.log_every == 0 or step == total_steps:
                busy = time.perf_counter() - busy_t0
                log_step(env, logger, loader, step, epoch, total_steps, steps_at_start, run_t0,
                         loss, terms, gnorm, speed, optimizer, min(waited / max(busy, 1e-9), 1.0))
                waited, busy_t0 = 0.0, time.perf_counter()
            end_of_epoch = epoch_step == steps_per_epoch
            stopping = stop.agreed(env)
            if stopping or end_of_epoch or step == total_steps or step % cfg.train.ckpt_every == 0:
                position = {"epoch": epoch + 1, "step": 0} if end_of_epoch else \
                    {"epoch": epoch, "step": epoch_step * accum}
                save_checkpoint(env, cfg, run_dir, checkpoint_state(
                    cfg, model, optimizer, scaler, position, step, nonfinite, meta))
            if stopping:
                runtime.log(env, f"stop signal: checkpoint saved at step {step}; the same command resumes")
                shutdown(env, logger, loader)
                return 0
            if end_of_epoch or step == total_steps:
                break
        epoch += 1
        if step == total_steps or (cfg.train.eval_every and epoch % cfg.train.eval_every == 0):
            run_evaluation(env, cfg, model, loader, logger, step, num_frames, crop, run_dir)

    # ---- save
    export_inference(env, cfg, model, meta, run_dir)
    runtime.log(env, f"done: {step} steps in {runtime.format_eta(time.perf_counter() - run_t0)}; "
                     f"TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tb')}")
    shutdown(env, logger, loader)
    return 0


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


def check_nonfinite(env, cfg, step, applied, nonfinite) -> int:
    nonfinite = 0 if applied else nonfinite + 1
    if nonfinite:
        runtime.log(env, f"step {step}: non-finite loss or gradient, step skipped ({nonfinite} in a row)")
    if nonfinite > cfg.train.max_nonfinite:
        raise RuntimeError(
            f"{nonfinite} non-finite steps in a row (train.max_nonfinite={cfg.train.max_nonfinite}): "
            "lower optim.lr, check the data, or use train.precision=bf16/fp32")
    return nonfinite


def shutdown(env, logger, loader) -> None:
    logger.close()
    loader.close()
    runtime.teardown_env(env)


def log_step(env, logger, loader, step, epoch, total_steps, steps_at_start, run_t0,
             loss, terms, gnorm, speed, optimizer, wait_frac):
    clips_s = speed.rate_and_reset()
    record = {"loss/total": loss, **{f"loss/{k}": v for k, v in terms.items() if k != "total"},
              "lr": optimizer.param_groups[0]["lr"], "grad_norm": gnorm,
              "perf/clips_per_s": clips_s, "perf/data_wait_frac": wait_frac,
              "perf/gpu_mem_gb": runtime.memory_gb(env.device), "data/quarantined": float(loader.num_quarantined)}
    logger.step(step, record)
    elapsed = time.perf_counter() - run_t0
    eta = elapsed / max(step - steps_at_start, 1) * (total_steps - step)
    runtime.log(env, f"epoch {epoch + 1} step {step}/{total_steps} loss {loss:.4f} lr {record['lr']:.2e} "
                     f"|g| {gnorm:.2f} {clips_s:.1f} clips/s data-wait {100 * wait_frac:.0f}% "
                     f"eta {runtime.format_eta(eta)}")


def run_evaluation(env, cfg, model, loader, logger, step, num_frames, crop, run_dir):
    if not any(ds.val_manifest for ds in cfg.data.datasets):
        return
    plain = runtime.unwrap(model)
    results = evaluate(plain, cfg, env, num_frames, crop, loader.classes)
    if env.is_main:
        write_eval_summaries(logger.tb, results, step)
        logger.relations(step, projection_pairs(plain, loader.classes, k=5))
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    plain.train()


def export_inference(env, cfg, model, meta, run_dir) -> None:
    """Weights for inference: heads kept, training-only projections and expander left out."""
    from models import inference_state_dict
    if env.is_main:
        runtime.atomic_save({"model": inference_state_dict(runtime.unwrap(model)),
                             "config": config_to_dict(cfg), "meta": meta, "inference": True},
                            os.path.join(run_dir, "model_inference.pt"))


if __name__ == "__main__":
    runtime.run_cli(main)
