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
    # Temporal stride between sampled frames for "stride" sampling (32x3 in the paper).
    stride: int = 3
    # Random horizontal flip during training; off for datasets where left/right is the label (SSv2).
    flip: bool = True
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
    # Clips per process and per step (the global batch is optim.global_batch, reached with
    # gradient accumulation when batch_size x world size is smaller).
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
    # Seconds a single video may take to decode before it is quarantined as hung.
    decode_timeout: float = 60.0
    # Training spatial augmentation: "scale" = short side to a random size in train_scale then a
    # random crop (the paper); "rrc" = random-resized-crop.
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
    # Mixup Beta(alpha, alpha); 0 disables mixup.
    mixup_alpha: float = 0.8
    # CutMix Beta(alpha, alpha); 0 disables CutMix.
    cutmix_alpha: float = 1.0
    # Probability of applying mixup or CutMix to a batch.
    mixup_prob: float = 1.0
    # Probability of CutMix instead of mixup when both are enabled.
    mixup_switch_prob: float = 0.5
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
    # Checkpoints kept in the run directory (oldest removed first).
    keep_ckpts: int = 3
    # Console/TensorBoard scalar logging period in optimizer steps.
    log_every: int = 20
    # Evaluate every this many epochs (0: only at the end).
    eval_every: int = 5
    # Stop after this many optimizer steps (0: train all epochs); for smoke tests and benchmarks.
    max_steps: int = 0
    # Consecutive non-finite losses tolerated (each skips its step) before the run stops.
    max_nonfinite: int = 20
    # Base seed of sampling, augmentation, mixup and initialisation.
    seed: int = 0
    # Augmented training clips written to TensorBoard as images at each epoch start.
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
    for i, part in enumerate(parts[:-1]):
        nxt = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list) and not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:i + 1])}' is not a section")
        node = nxt
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _validate(cfg: Config, check_paths: bool):
    choices = {
        "data.decode_device": (cfg.data.decode_device, ("auto", "cpu", "gpu")),
        "data.train_aug": (cfg.data.train_aug, ("scale", "rrc")),
        "optim.impl": (cfg.optim.impl, ("torch", "apex")),
        "train.precision": (cfg.train.precision, ("auto", "bf16", "fp16", "fp32")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {allowed}")
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
        if ds.sampling not in ("stride", "uniform"):
            raise ConfigError(f"config key '{where}.sampling': {ds.sampling!r} is not 'stride' or 'uniform'")
        if len(ds.test_views) != 2 or min(ds.test_views) < 1:
            raise ConfigError(f"config key '{where}.test_views': expected [temporal, spatial] >= 1, got {ds.test_views}")
        if ds.weight < 0 or ds.stride < 1:
            raise ConfigError(f"config key '{where}': weight must be >= 0 and stride >= 1")
        if check_paths:
            for key in ("manifest", "val_manifest"):
                path = getattr(ds, key)
                if (key == "manifest" or path) and not (Path(path) / "manifest.jsonl").is_file():
                    raise ConfigError(
                        f"config key '{where}.{key}': no manifest.jsonl in '{path}'; build it with "
                        f"`python -m dali_pipes.manifest ... --out {path or 'DIR'}` or fix the path")
    if len(cfg.data.train_scale) != 2 or cfg.data.train_scale[0] > cfg.data.train_scale[1]:
        raise ConfigError(f"config key 'data.train_scale': expected [min, max], got {cfg.data.train_scale}")
    if cfg.data.batch_size < 1 or cfg.optim.global_batch < 1:
        raise ConfigError("config keys 'data.batch_size' and 'optim.global_batch' must be >= 1")
    if cfg.optim.proj_lr_scale <= 0:
        raise ConfigError(f"config key 'optim.proj_lr_scale': expected a multiplier > 0 "
                          f"(1 = the paper), got {cfg.optim.proj_lr_scale}")
    if check_paths and cfg.data.relations and not Path(cfg.data.relations).is_file():
        raise ConfigError(f"config key 'data.relations': file '{cfg.data.relations}' does not exist")
    if check_paths and cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise ConfigError(f"config key 'model.pretrained': checkpoint '{cfg.model.pretrained}' does not exist")


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
