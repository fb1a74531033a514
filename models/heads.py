"""Multi-dataset model: shared backbone, per-dataset heads, expander, projection heads (SPEC §3)."""
from __future__ import annotations

import torch
from torch import nn


def mlp_head(dim: int, hidden: int, out: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> GELU -> Dropout -> Linear (seed §2.1: 2-layer MLP, hidden 2048, GELU)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out))


def pair_key(src: str, dst: str) -> str:
    # ModuleDict keys cannot hold tuples or dots; "->" keeps state-dict names readable.
    return f"{src}->{dst}"


class MultiTrainModel(nn.Module):
    """Backbone + one classification head per dataset (+ expander + projections for training).

    forward(x) -> {"feat": (B, D), "logits": {name: (B, C_d)}, "embed": (B, D_e),
                   "proj": {(s, d): (B, C_d)}}
    proj[(s, d)] = W_{s→d}(logits[s]) on the raw logits of head s. "embed" is absent when
    expander_dim is 0/None; "proj" is empty when projections=False.
    """

    def __init__(self, backbone: nn.Module, num_classes: dict[str, int], head_hidden: int = 2048,
                 head_dropout: float = 0.5, expander_hidden: int = 2048,
                 expander_dim: int | None = 768, projections: bool = True):
        super().__init__()
        if not num_classes:
            raise ValueError("num_classes must name at least one dataset")
        self.backbone = backbone
        self.names = list(num_classes)
        self.num_classes = dict(num_classes)
        dim = backbone.embed_dim
        self.heads = nn.ModuleDict({n: mlp_head(dim, head_hidden, c, head_dropout)
                                    for n, c in num_classes.items()})
        self.expander = mlp_head(dim, expander_hidden, expander_dim) if expander_dim else None
        self.pairs = [(s, d) for s in self.names for d in self.names if s != d] if projections else []
        self.proj = nn.ModuleDict({pair_key(s, d): nn.Linear(num_classes[s], num_classes[d], bias=False)
                                   for s, d in self.pairs})
        # The authors initialise every Linear of the model this way, the projections included:
        # W_{s→d} starts near zero ("no relation known") instead of at PyTorch's default
        # ±1/sqrt(C_s), a random relation pattern that the loss would first have to unlearn.
        for m in [*self.heads.modules(), *(self.expander.modules() if self.expander else []),
                  *self.proj.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.register_load_state_dict_post_hook(_allow_missing_training_parts)

    def forward(self, x: torch.Tensor) -> dict:
        feat = self.backbone(x)  # (B, D)
        logits = {n: self.heads[n](feat) for n in self.names}  # each (B, C_d)
        out = {"feat": feat, "logits": logits,
               "proj": {(s, d): self.proj[pair_key(s, d)](logits[s]) for s, d in self.pairs}}
        if self.expander is not None:
            out["embed"] = self.expander(feat)  # (B, D_e)
        return out


def _allow_missing_training_parts(module: MultiTrainModel, incompatible) -> None:
    """An inference state dict has no expander; loading one keeps the module's own expander
    (only the training loss uses it) instead of failing a strict load."""
    missing = incompatible.missing_keys
    expander = [k for k in missing if k.startswith("expander.")]
    n_expander = len(list(module.expander.state_dict())) if module.expander is not None else 0
    if expander and len(expander) == n_expander:  # whole expander absent, not a partial dict
        for k in expander:
            missing.remove(k)


def inference_state_dict(model: MultiTrainModel) -> dict[str, torch.Tensor]:
    """State dict for deployment: backbone + classification heads only.

    Drops the projection heads (training-only, SPEC §3) and the expander (used only by the
    informative loss). Load it into MultiTrainModel(..., projections=False).
    """
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("proj.", "expander."))}


def projection_pairs(model: MultiTrainModel, class_names: dict[str, list[str]], k: int = 5
                     ) -> dict[str, list[tuple[str, str, float]]]:
    """Top-k (source class, target class, weight) over the whole W_{s→d}, keyed "s->d"
    (seed Table 4)."""
    result = {}
    for s, d in model.pairs:
        w = model.proj[pair_key(s, d)].weight.detach().float()  # (C_d, C_s)
        vals, idx = w.flatten().topk(min(k, w.numel()))
        rows, cols = idx // w.shape[1], idx % w.shape[1]
        result[pair_key(s, d)] = [(class_names[s][c], class_names[d][r], v)
                                  for r, c, v in zip(rows.tolist(), cols.tolist(), vals.tolist())]
    return result


def projection_argmax(model: MultiTrainModel) -> dict[tuple[str, str], torch.Tensor]:
    """For each source class of s, the target class of d with the largest weight: (C_s,) long."""
    return {(s, d): model.proj[pair_key(s, d)].weight.detach().argmax(dim=0)
            for s, d in model.pairs}
