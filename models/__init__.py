"""MViTv2 backbone, multi-dataset heads, MultiTrain losses, FLOP counter, checkpoint import."""
from .checkpoint import load_pyslowfast
from .flops import count_flops
from .heads import MultiTrainModel, inference_state_dict, projection_argmax, projection_pairs
from .losses import MultiTrainLoss, informative_loss, soft_cross_entropy
from .mvit import PRESETS, MViT, MViTConfig, build_backbone

__all__ = [
    "build_backbone", "MViT", "MViTConfig", "PRESETS", "MultiTrainModel", "MultiTrainLoss",
    "soft_cross_entropy", "informative_loss", "count_flops", "load_pyslowfast",
    "projection_pairs", "projection_argmax", "inference_state_dict",
]
