"""MultiTrain losses (SPEC §3): soft-target CE, projection loss, informative (VICReg-style) loss."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−Σ_c y_c log softmax(z)_c per row, in fp32 (log-softmax in bf16 loses the small
    probabilities that mixup/label smoothing targets put weight on). (B, C), (B, C) -> (B,)"""
    return -(y.float() * F.log_softmax(z.float(), dim=-1)).sum(dim=-1)


def informative_loss(e: torch.Tensor, var_weight: float = 25.0, cov_weight: float = 1.0,
                     eps: float = 1e-4) -> torch.Tensor:
    """VICReg variance + covariance terms on e (B, D_e), batch-centred, unbiased, fp32.

    var_weight · mean_k relu(1 − sqrt(Var_k + eps)) + cov_weight · (1/D_e) Σ_{k≠l} Cov_kl².
    Needs B ≥ 2 (a variance of one sample is undefined); returns 0 otherwise.
    """
    b, d = e.shape
    if b < 2:
        return e.float().sum() * 0.0  # keeps the graph connected for DDP
    e = e.float()
    e = e - e.mean(dim=0)  # (B, D_e)
    cov = e.t() @ e / (b - 1)  # (D_e, D_e)
    var = cov.diagonal()
    std_term = F.relu(1.0 - torch.sqrt(var + eps)).mean()
    off_diag = cov.pow(2).sum() - var.pow(2).sum()
    return var_weight * std_term + cov_weight * off_diag / d


# ----------------------------------------------------------------------------- gathering
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batch(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate x (B_r, …) over ranks along dim 0, differentiably when x requires grad.

    Gradient design: every rank computes the SAME loss L on the global batch. The backward
    of torch.distributed.nn.functional.all_gather SUMS the incoming gradients over ranks, so
    rank r receives Σ_ranks ∂L/∂x_r = world·∂L/∂x_r for its own rows. DDP then AVERAGES the
    parameter gradients over ranks: (1/world)·Σ_r world·∂L/∂x_r·∂x_r/∂θ = ∂L/∂θ, exactly the
    single-process gradient on the concatenated batch.
    """
    from torch.distributed.nn.functional import all_gather

    pad = max(sizes) - x.shape[0]
    if pad:  # collectives need equal shapes; padded rows are cut off again below
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], dim=0)
    if x.requires_grad:
        parts = all_gather(x)
    else:
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def _pack(tensors: dict) -> tuple[torch.Tensor, list]:
    """Concatenate (B, C_k) tensors along dim 1 (fp32) so one collective moves them all."""
    keys = list(tensors)
    packed = torch.cat([tensors[k].float() for k in keys], dim=1)  # (B, ΣC_k)
    return packed, [(k, tensors[k].shape[1]) for k in keys]


def _unpack(packed: torch.Tensor, layout: list) -> dict:
    chunks = packed.split([c for _, c in layout], dim=1)
    return {k: t for (k, _), t in zip(layout, chunks)}


# ----------------------------------------------------------------------------- total loss
class MultiTrainLoss(nn.Module):
    """L = (1/B) Σ_i Σ_d m_d(i)·λ_d·[SCE(z_d, y_d) + w_p/(N−1)·Σ_{s≠d} SCE(W_{s→d} z_s, y_d)]
           + w_inf·L_inf(embed),  with B the GLOBAL batch.

    forward(out, targets, masks) -> (total, terms). `out` is MultiTrainModel's dict, targets
    {name: (B, C_d)}, masks (B, N) float in `names` order (weight of dataset n for sample i).
    terms (detached, on the device): "ce_sum/<name>" the mask-weighted CE summed over that
    dataset's samples and "n/<name>" their weight (the mean is ce_sum / n where n > 0), "cls" = (1/B)ΣΣ m·λ·CE, "proj" = (1/B)ΣΣ m·λ·mean_s CE(proj) (before w_p),
    "cls_proj" = cls + w_p·proj, "inf" = L_inf (before w_inf), "total".
    """

    def __init__(self, names: list[str], lambdas: dict[str, float] | None = None,
                 w_proj: float = 1.0, w_inf: float = 0.1, var_weight: float = 25.0,
                 cov_weight: float = 1.0):
        super().__init__()
        self.names = list(names)
        lambdas = lambdas or {}
        unknown = set(lambdas) - set(self.names)
        if unknown:
            raise ValueError(f"lambdas for unknown datasets {sorted(unknown)}; names: {self.names}")
        self.lambdas = {n: float(lambdas.get(n, 1.0)) for n in self.names}
        self.w_proj, self.w_inf = w_proj, w_inf
        self.var_weight, self.cov_weight = var_weight, cov_weight

    def _gather(self, out: dict, targets: dict, masks: torch.Tensor, sizes=None):
        """Global-batch view of the outputs: two collectives (with / without grad) per step."""
        if not _distributed():
            return out, targets, masks
        # Training batches have the same size on every rank (the sampler cuts each epoch to
        # whole global batches), so by default no sizes are exchanged (a host sync); callers
        # with uneven batches pass every rank's size.
        sizes = list(sizes) if sizes is not None else [masks.shape[0]] * dist.get_world_size()
        live = {("logits", n): z for n, z in out["logits"].items()}
        live.update({("proj", k): z for k, z in out.get("proj", {}).items()})
        if "embed" in out:
            live[("embed", None)] = out["embed"]
        packed, layout = _pack(live)
        live = _unpack(gather_batch(packed, sizes), layout)
        fixed = {("y", n): y.detach() for n, y in targets.items()}
        fixed[("m", None)] = masks.detach()
        packed, layout = _pack(fixed)
        fixed = _unpack(gather_batch(packed, sizes), layout)
        g = {"logits": {k: v for (kind, k), v in live.items() if kind == "logits"},
             "proj": {k: v for (kind, k), v in live.items() if kind == "proj"}}
        if ("embed", None) in live:
            g["embed"] = live[("embed", None)]
        return g, {k: v for (kind, k), v in fixed.items() if kind == "y"}, fixed[("m", None)]

    @staticmethod
    def _masked_sce(z: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """m·SCE per sample; rows with m == 0 give exactly 0 even if their targets are junk."""
        sce = soft_cross_entropy(z, torch.where(m[:, None] > 0, y.float(), 0.0))
        return m * sce  # (B,)

    def forward(self, out: dict, targets: dict[str, torch.Tensor], masks: torch.Tensor,
                sizes=None):
        """`sizes`: every rank's batch size when they differ (default: all equal)."""
        out, targets, masks = self._gather(out, targets, masks, sizes)
        masks = masks.float()
        b = masks.shape[0]
        n_data = len(self.names)
        proj = out.get("proj", {})
        zero = masks.sum() * 0.0
        cls_sum, proj_sum, terms = zero, zero, {}
        for j, d in enumerate(self.names):
            m, y = masks[:, j], targets[d]  # (B,), (B, C_d)
            ce = self._masked_sce(out["logits"][d], y, m)  # (B,)
            terms[f"ce_sum/{d}"], terms[f"n/{d}"] = ce.sum(), m.sum()
            cls_sum = cls_sum + self.lambdas[d] * ce.sum()
            srcs = [s for s in self.names if s != d and (s, d) in proj]
            if srcs:
                p = sum(self._masked_sce(proj[(s, d)], y, m) for s in srcs) / (n_data - 1)
                proj_sum = proj_sum + self.lambdas[d] * p.sum()
        cls, proj_term = cls_sum / b, proj_sum / b
        inf = zero
        if "embed" in out and self.w_inf:
            inf = informative_loss(out["embed"], self.var_weight, self.cov_weight)
        cls_proj = cls + self.w_proj * proj_term
        total = cls_proj + self.w_inf * inf
        terms.update(cls=cls, proj=proj_term, cls_proj=cls_proj, inf=inf, total=total)
        return total, {k: v.detach() for k, v in terms.items()}
