"""The one typed configuration schema of the project.

Every YAML file under configs/ is loaded into `Config` by `load_config`. Each field carries a
comment saying what it controls; defaults are the MultiTrain paper recipe (SPEC section 4)
where the paper has one. Errors name the key, the value and what was expected, and all of
them are raised before any data is read or any model is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts."""


@dataclass
class DatasetConfig:
    # Short name of the dataset: names its head, its TensorBoard tags and its entry in eval.json.
    name: str = ""
    # Folder holding manifest.jsonl/classes.json for training (made by `python -m dali_pipes.manifest`).
    manifest: str = ""
    # Folder holding the validation manifest; empty means this dataset is not evaluated.
    val_manifest: str = ""
    # "stride": clips of num_frames frames taken every `stride` frames from a random start
    # (Kinetics, MiT, ActivityNet); "uniform": num_frames segments over the whole video, one
    # frame per segment (SSv2, SPEC section 4).
    sampling: str = "stride"
    # Temporal stride between sampled frames for "stride" sampling (32x3 in the paper),
    # measured at data.target_fps.
    stride: int = 3
    # Random horizontal flip during training; off for datasets where left/right is the label (SSv2).
    flip: bool = True
    # Training spatial augmentation of this dataset: "scale" or "rrc" (see data.train_aug);
    # empty: data.train_aug. The MViTv2 recipe: "rrc" for Kinetics, "scale" for SSv2.
    train_aug: str = ""
    # "scale" draws the short side inverse-uniformly, round(1 / U(1/max, 1/min)), as
    # PySlowFast's DATA.INV_UNIFORM_SAMPLE (on for SSv2 in the MViTv2 recipe); false: uniform.
    inverse_scale: bool = False
    # Relative sampling weight in the mixed batches; 0 means proportional to dataset size (the
    # authors' choice: a shuffled concatenation).
    weight: float = 0.0
    # lambda_d: the weight of this dataset's classification and projection terms in the loss.
    loss_weight: float = 1.0
    # Test views as [temporal clips, spatial crops]; the paper uses 3x3, official MViTv2 uses 5x1.
    test_views: list = field(default_factory=lambda: [3, 3])


@dataclass
class DataConfig:
    # The datasets trained together; each gets its own classification head.
    datasets: list = field(default_factory=list)
    # Videos per process and per step (the global batch is optim.global_batch videos, reached
    # with gradient accumulation when batch_size x world size is smaller); each video gives
    # num_sample training clips.
    batch_size: int = 4
    # Clips per process and per step during evaluation (each clip is one video's views).
    eval_batch_size: int = 1
    # DALI CPU worker threads per process.
    num_threads: int = 4
    # Batches prepared ahead of the training step (DALI prefetch queue depth and loader queue).
    prefetch: int = 2
    # "auto": NVDEC ("mixed") when a GPU is present, else DALI's CPU decoder; "cpu"/"gpu" force it.
    decode_device: str = "auto"
    # Workers of the PyAV fallback decoder used for codecs the chosen DALI decoder cannot read.
    fallback_workers: int = 2
    # Seconds a single video may take to be read or decoded; a file that times out twice is
    # quarantined as hung (a FIFO or a hung network mount never blocks training for longer).
    decode_timeout: float = 60.0
    # Leave out files whose probe saw decode errors (FFmpeg concealed a corrupt stretch: the
    # manifest builder keeps them only with --keep-decode-errors); false trains on them.
    skip_decode_errors: bool = True
    # Frame rate at which "stride" sampling measures the stride (PySlowFast's DATA.TARGET_FPS,
    # 30): a clip spans stride x frames x fps / target_fps source frames, frames spaced
    # linearly inside, so 25 and 30 fps videos give clips of the same duration. 0 takes every
    # stride-th source frame whatever the video's fps.
    target_fps: float = 30.0
    # Training spatial augmentation of every dataset without its own: "scale" = short side to
    # a random size in train_scale then a random crop (the seed); "rrc" = random-resized-crop
    # of area rrc_area and aspect [3/4, 4/3] (the MViTv2 Kinetics recipe, the authors' code).
    train_aug: str = "scale"
    # Range [min, max] of the random short side before the training crop.
    train_scale: list = field(default_factory=lambda: [256, 320])
    # Area range of the random-resized-crop alternative.
    rrc_area: list = field(default_factory=lambda: [0.08, 1.0])
    # Crop size; 0 means the backbone's own (model.crop_size).
    crop_size: int = 0
    # Short side before the test crops.
    test_scale: int = 256
    # RandAugment (timm's rand-m7-n4-mstd0.5-inc1, docs/data.md): ops drawn per clip, each
    # applied with probability 0.5 (0 disables; at most 4, the graph's stages).
    rand_aug_n: int = 4
    # RandAugment magnitude (0..10 scale of the original paper).
    rand_aug_m: float = 7.0
    # Standard deviation of each op's magnitude noise (authors: 0.5).
    rand_aug_m_std: float = 0.5
    # Augmented clips per decoded training video (repeated augmentation: PySlowFast's
    # AUG.NUM_SAMPLE, default 1; 2 in the MultiTrain authors' config (SPEC section 4), which
    # multi.yaml and the Kinetics-recipe baselines set). Each copy gets its own crop window,
    # flip, RandAugment, erasing and mixup partner from the same decoded frames; the model sees
    # batch_size x num_sample clips a step.
    num_sample: int = 1
    # Random erasing per clip (PySlowFast/timm, the MViTv2 recipe's AUG.RE_PROB 0.25, "pixel"
    # mode, one box): probability that a clip gets one box, the same on all its frames, of
    # 2-33% of the frame filled with N(0, 1) noise; 0 disables it. Runs on the training device.
    random_erase_prob: float = 0.25
    # Mixup Beta(alpha, alpha); 0 disables mixup.
    mixup_alpha: float = 0.8
    # CutMix Beta(alpha, alpha); 0 disables CutMix.
    cutmix_alpha: float = 1.0
    # Probability of applying mixup or CutMix to a batch.
    mixup_prob: float = 1.0
    # Probability of CutMix instead of mixup when both are enabled.
    mixup_switch_prob: float = 0.5
    # Mixup/CutMix between clips of different datasets mixes the pixels either way; false (the
    # MultiTrain authors): a clip's targets and loss stay in its own dataset, the partner's
    # dataset gets nothing from it; true: the partner's dataset head also learns (1 - lam) of
    # the partner's label from the mixed clip.
    mixup_cross_dataset: bool = False
    # Label smoothing of the per-dataset soft targets.
    label_smoothing: float = 0.1
    # Ground-truth cross-dataset class relations (relations.json of the synthetic demo data);
    # when set, evaluation reports how many of them the learned projections rank first.
    relations: str = ""
    # Per-channel mean and std (0..255 scale) used to normalise clips (Kinetics statistics).
    mean: list = field(default_factory=lambda: [114.75, 114.75, 114.75])
    std: list = field(default_factory=lambda: [57.375, 57.375, 57.375])


@dataclass
class ModelConfig:
    # Backbone factory name: mvitv2_b_32x3, mvitv2_s_16x4 or mvitv2_tiny.
    arch: str = "mvitv2_b_32x3"
    # Input frames (every dataset's clips have this length); 0 keeps the preset's.
    num_frames: int = 0
    # Input crop size in pixels; 0 keeps the preset's.
    crop_size: int = 0
    # Class token (official MViTv2 checkpoints) instead of mean pooling (MultiTrain).
    cls_embed: bool = False
    # Decomposed relative position embedding (official MViTv2 checkpoints).
    rel_pos: bool = False
    # Skip projection from the normalised input (seed) or the raw input (authors' code).
    skip_from_norm: bool = True
    # Stochastic depth rate at the last block (linear from 0).
    drop_path: float = 0.1
    # Recompute each block in backward to save activation memory.
    act_checkpoint: bool = False
    # Compile the model with torch.compile.
    compile: bool = False
    # Hidden width of every classification head.
    head_hidden: int = 2048
    # Dropout inside the classification heads (authors: 0.5).
    head_dropout: float = 0.5
    # Hidden width of the expander (seed: 2048; authors' code 4096).
    expander_hidden: int = 2048
    # Output width of the expander, the space of the informative loss.
    expander_dim: int = 768
    # PySlowFast/MultiTrain .pyth or train.py checkpoint whose backbone initialises training;
    # empty: random init.
    pretrained: str = ""


@dataclass
class LossConfig:
    # w_p: weight of the cross-dataset projection terms.
    w_proj: float = 1.0
    # Weight of the informative loss in the total.
    w_inf: float = 0.1
    # Variance-term weight inside the informative loss.
    var_weight: float = 25.0
    # Covariance-term weight inside the informative loss.
    cov_weight: float = 1.0


@dataclass
class OptimConfig:
    # "torch": torch.optim.AdamW (fused on CUDA); "apex": NVIDIA apex FusedAdam (must be installed).
    impl: str = "torch"
    # Peak learning rate, reached after warm-up, for the global batch.
    lr: float = 2e-4
    # Learning rate at the start of warm-up.
    warmup_start_lr: float = 2e-6
    # Final learning rate of the cosine decay.
    min_lr: float = 2e-6
    # Warm-up length in epochs (may be fractional).
    warmup_epochs: float = 10.0
    # Training length in epochs.
    epochs: int = 50
    # AdamW weight decay; biases and 1-D parameters get none.
    weight_decay: float = 0.05
    # AdamW betas.
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # AdamW epsilon.
    eps: float = 1e-8
    # Gradient clipping by global norm; 0 disables.
    clip_grad: float = 1.0
    # Clips per optimizer step over all processes; reached by gradient accumulation.
    global_batch: int = 512
    # Learning-rate multiplier for the projection heads W_{s->d}; 1 is the paper. AdamW moves a
    # weight by about lr per step, so a short schedule (the demo's ~1.7k steps against the
    # paper's ~120k) leaves these zero-initialised maps nearly where they started.
    proj_lr_scale: float = 1.0


@dataclass
class TrainConfig:
    # Run directory: checkpoints, TensorBoard events, resolved config, eval.json.
    output_dir: str = "runs/multi"
    # "auto": bf16 on GPUs that support it, fp16 + GradScaler otherwise, fp32 on CPU;
    # or force "bf16", "fp16", "fp32".
    precision: str = "auto"
    # Save a checkpoint every this many optimizer steps (0: only at epoch ends).
    ckpt_every: int = 500
    # Checkpoints kept in the run directory (oldest removed first; 0 keeps all).
    keep_ckpts: int = 3
    # Console/TensorBoard scalar logging period in optimizer steps (0: at epoch ends). Values
    # are summed on the GPU and read once per period, so a run of non-finite steps longer
    # than train.max_nonfinite is noticed at the next log, up to this many steps late.
    log_every: int = 20
    # Evaluate every this many epochs (0: only at the end).
    eval_every: int = 5
    # Also evaluate every this many optimizer steps inside epochs (0: off), for long epochs.
    eval_every_steps: int = 0
    # Stop after this many optimizer steps (0: train all epochs); for smoke tests and benchmarks.
    max_steps: int = 0
    # Consecutive non-finite losses tolerated (each skips its step) before the run stops.
    max_nonfinite: int = 20
    # Base seed of sampling, augmentation, mixup and initialisation.
    seed: int = 0
    # Augmented training clips per dataset written to TensorBoard at each epoch start (one
    # image per dataset, tag train_clips/<dataset>); 0: none.
    vis_clips: int = 2


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Element types of list fields that hold structured entries.
_LIST_ITEM = {("data", "datasets"): DatasetConfig}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Checks `value` against the annotated type `tp`; ints are accepted for floats."""
    tp = {"str": str, "int": int, "float": float, "bool": bool, "list": list}.get(tp, tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" as a string; accept it as the number it means.
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool, list) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    obj = cls()
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint} (valid: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            setattr(obj, key, _from_dict(tp, value, full))
            continue
        value = _coerce(value, tp, full)
        item_cls = _LIST_ITEM.get(tuple(full.split(".")))
        if item_cls is not None:
            value = [_from_dict(item_cls, v, f"{full}[{i}]") for i, v in enumerate(value)]
        setattr(obj, key, value)
    return obj


def _parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw != "" else ""


def _apply_override(raw: dict, key: str, value):
    """Sets a dotted key in the raw YAML dict; `data.datasets.0.stride=2` indexes lists."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts):
        where = ".".join(parts[:i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{key}': '{where}' is not an entry of a list of "
                                  f"{len(node)} (indices 0..{len(node) - 1})")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:i])}' is a value, not a section")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part] if isinstance(node, list) else node.setdefault(part, {})


# Presets of models/mvit.py (checked against it by a test): known here without importing torch.
ARCHS = ("mvitv2_b_32x3", "mvitv2_s_16x4", "mvitv2_tiny")

# Allowed numeric ranges: key -> (low, high, low inclusive); None is unbounded.
_RANGES = {
    "data.batch_size": (1, None, True), "data.eval_batch_size": (1, None, True),
    "data.num_threads": (1, None, True), "data.prefetch": (1, None, True),
    "data.fallback_workers": (1, None, True), "data.decode_timeout": (0, None, False),
    "data.crop_size": (0, None, True), "data.test_scale": (1, None, True),
    "data.target_fps": (0, None, True),
    "data.rand_aug_n": (0, 4, True), "data.rand_aug_m": (0, 10, True),  # 4: randaug.STAGES
    "data.rand_aug_m_std": (0, None, True), "data.mixup_alpha": (0, None, True),
    "data.random_erase_prob": (0, 1, True), "data.num_sample": (1, 8, True),
    "data.cutmix_alpha": (0, None, True), "data.mixup_prob": (0, 1, True),
    "data.mixup_switch_prob": (0, 1, True), "data.label_smoothing": (0, 1, True),
    "model.num_frames": (0, None, True), "model.crop_size": (0, None, True),
    "model.drop_path": (0, 1, True), "model.head_dropout": (0, 1, True),
    "model.head_hidden": (1, None, True), "model.expander_hidden": (1, None, True),
    "model.expander_dim": (1, None, True),
    "loss.w_proj": (0, None, True), "loss.w_inf": (0, None, True),
    "loss.var_weight": (0, None, True), "loss.cov_weight": (0, None, True),
    "optim.lr": (0, None, False), "optim.warmup_start_lr": (0, None, True),
    "optim.min_lr": (0, None, True), "optim.warmup_epochs": (0, None, True),
    "optim.epochs": (1, None, True), "optim.weight_decay": (0, None, True),
    "optim.eps": (0, None, False), "optim.clip_grad": (0, None, True),
    "optim.global_batch": (1, None, True), "optim.proj_lr_scale": (0, None, False),
    "train.ckpt_every": (0, None, True), "train.keep_ckpts": (0, None, True),
    "train.log_every": (0, None, True), "train.eval_every": (0, None, True),
    "train.eval_every_steps": (0, None, True),
    "train.max_steps": (0, None, True), "train.max_nonfinite": (0, None, True),
    "train.vis_clips": (0, None, True),
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check_range(key: str, value, low, high, low_inclusive: bool) -> None:
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    if too_low or (high is not None and value > high):
        bounds = (f"{'>=' if low_inclusive else '>'} {low}" if low is not None else "") + \
            (f"{' and ' if low is not None else ''}<= {high}" if high is not None else "")
        raise ConfigError(f"config key '{key}': {value!r} is out of range; expected {bounds}")


def _check_numbers(key: str, values, kind, length: int | None = None) -> None:
    """A list of `length` numbers (ints when kind is int)."""
    ok = isinstance(values, list) and (length is None or len(values) == length) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and
        (kind is float or isinstance(v, int)) for v in values)
    if not ok:
        what = f"{length} " if length else ""
        raise ConfigError(f"config key '{key}': expected a list of {what}{kind.__name__}s, got {values!r}")


def _missing_path(key: str, path: str, what: str) -> ConfigError:
    where = "" if os.path.isabs(path) else f" (relative paths are taken from the working directory {os.getcwd()})"
    return ConfigError(f"config key '{key}': {what} '{path}' does not exist{where}")


def _validate(cfg: Config, check_paths: bool):
    choices = {
        "data.decode_device": (cfg.data.decode_device, ("auto", "cpu", "gpu")),
        "data.train_aug": (cfg.data.train_aug, ("scale", "rrc")),
        "optim.impl": (cfg.optim.impl, ("torch", "apex")),
        "train.precision": (cfg.train.precision, ("auto", "bf16", "fp16", "fp32")),
    }
    choices["model.arch"] = (cfg.model.arch, ARCHS)
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {allowed}")
    for key, bounds in _RANGES.items():
        _check_range(key, _get(cfg, key), *bounds)
    for key, kind, n in (("data.train_scale", int, 2), ("data.rrc_area", float, 2),
                         ("data.mean", float, 3), ("data.std", float, 3), ("optim.betas", float, 2)):
        _check_numbers(key, _get(cfg, key), kind, n)
    if not cfg.data.datasets:
        raise ConfigError("config key 'data.datasets': at least one dataset is required")
    seen = set()
    for i, ds in enumerate(cfg.data.datasets):
        where = f"data.datasets[{i}]"
        if not ds.name:
            raise ConfigError(f"config key '{where}.name': every dataset needs a name")
        if ds.name in seen:
            raise ConfigError(f"config key '{where}.name': dataset name '{ds.name}' is used twice")
        seen.add(ds.name)
        if ds.train_aug not in ("", "scale", "rrc"):
            raise ConfigError(f"config key '{where}.train_aug': {ds.train_aug!r} is not '', 'scale' or 'rrc'")
        if ds.sampling not in ("stride", "uniform"):
            raise ConfigError(f"config key '{where}.sampling': {ds.sampling!r} is not 'stride' or 'uniform'")
        _check_numbers(f"{where}.test_views", ds.test_views, int, 2)
        if min(ds.test_views) < 1:
            raise ConfigError(f"config key '{where}.test_views': expected [temporal, spatial] >= 1, got {ds.test_views}")
        for key, low in (("stride", 1), ("weight", 0), ("loss_weight", 0)):
            _check_range(f"{where}.{key}", getattr(ds, key), low, None, True)
        if check_paths:
            for key in ("manifest", "val_manifest"):
                path = getattr(ds, key)
                if key == "manifest" or path:
                    _check_manifest(f"{where}.{key}", ds.name, path)
    if cfg.data.train_scale[0] > cfg.data.train_scale[1]:
        raise ConfigError(f"config key 'data.train_scale': expected [min, max], got {cfg.data.train_scale}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas': expected two values in [0, 1), got {cfg.optim.betas}")
    if check_paths and cfg.data.relations and not Path(cfg.data.relations).is_file():
        raise _missing_path("data.relations", cfg.data.relations, "file")
    if check_paths and cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise _missing_path("model.pretrained", cfg.model.pretrained, "checkpoint")


def _check_manifest(key: str, name: str, path: str) -> None:
    """The manifest folder exists and holds at least one sample."""
    manifest = Path(path) / "manifest.jsonl"
    if not manifest.is_file():
        where = "" if os.path.isabs(path) else \
            f" (relative paths are taken from the working directory {os.getcwd()})"
        raise ConfigError(f"config key '{key}': dataset '{name}': no manifest.jsonl in '{path}'"
                          f"{where}; build it with `python -m dali_pipes.manifest ... --out "
                          f"{path or 'DIR'}` or fix the path")
    with open(manifest, encoding="utf-8") as f:
        if not any(line.strip() for line in f):
            raise ConfigError(f"config key '{key}': dataset '{name}': {manifest} has no samples "
                              "(every annotation row was quarantined: see quarantine.jsonl there)")


def config_from_dict(raw: dict, overrides=(), check_paths: bool = True) -> Config:
    """Builds and validates a Config from a raw dict plus `key=value` overrides."""
    raw = yaml.safe_load(yaml.safe_dump(raw or {}))  # deep copy of plain data
    for text in overrides:
        _apply_override(raw, *_parse_override(text))
    cfg = _from_dict(Config, raw, "")
    _validate(cfg, check_paths)
    return cfg


def load_config(path, overrides=(), check_paths: bool = True) -> Config:
    """Reads a YAML config; relative data paths are taken relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    return config_from_dict(raw, overrides, check_paths)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def clip_frames(cfg: Config, model_frames: int) -> int:
    """Frames per clip, shared by all datasets since one batch feeds one backbone."""
    return cfg.model.num_frames or model_frames


def crop_size(cfg: Config, model_crop: int) -> int:
    return cfg.data.crop_size or cfg.model.crop_size or model_crop


def exit_on_config_error(fn, *args, **kwargs):
    """fn(*args) or, on a ConfigError, one line on stderr and exit code 2 (not a traceback)."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
