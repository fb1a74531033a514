"""MViTv2 video backbone (SPEC §2, seed Table 2).

Architecture facts follow the MViTv2 paper (Li et al., arXiv:2112.01526) and the tensor
names of the public PySlowFast implementation, so that its ``.pyth`` checkpoints map 1:1.
Attention runs through ``F.scaled_dot_product_attention`` so CUDA picks a fused kernel.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6

Thw = tuple[int, int, int]


# --------------------------------------------------------------------------- config
@dataclass
class MViTConfig:
    """Hyper-parameters of one MViTv2 variant; every field is a valid factory override."""

    num_frames: int = 32
    crop_size: int = 224
    in_chans: int = 3
    embed_dim: int = 96
    num_heads: int = 1
    depth: int = 24
    # Blocks that open a new stage: width and heads double, Q is pooled by 1x2x2.
    transitions: tuple[int, ...] = (2, 5, 21)
    mlp_ratio: float = 4.0
    patch_kernel: Thw = (3, 7, 7)
    patch_stride: Thw = (2, 4, 4)
    patch_padding: Thw = (1, 3, 3)
    pool_kernel: Thw = (3, 3, 3)
    q_stride: Thw = (1, 2, 2)
    kv_stride: Thw = (1, 8, 8)  # initial KV stride, divided by q_stride at each transition
    cls_embed: bool = False
    rel_pos: bool = False
    abs_pos: bool | None = None  # None: absolute tables exactly when rel_pos is off
    drop_path: float = 0.1
    act_checkpoint: bool = False
    skip_from_norm: bool = True  # seed/MViTv2: skip Linear sees LN1(x); authors' code: raw x

    def __post_init__(self) -> None:
        if self.abs_pos is None:
            self.abs_pos = not self.rel_pos
        if any(not 0 < t < self.depth for t in self.transitions):
            raise ValueError(f"transitions {self.transitions} must lie in 1..depth-1")


PRESETS: dict[str, dict] = {
    # seed Table 2: 24 blocks in stages 2/3/16/3, 32x3 frames, 224².
    "mvitv2_b_32x3": dict(depth=24, transitions=(2, 5, 21), num_frames=32),
    # MViTv2-S: 16 blocks, transitions at 1, 3, 14, 16x4 frames.
    "mvitv2_s_16x4": dict(depth=16, transitions=(1, 3, 14), num_frames=16),
    # CPU-sized: 5 blocks in stages 1/2/2 (two transitions), 32→64→128 wide. Its 16x16 patch
    # grid needs a KV stride of 4, not 8: with 8 the 3x3 pooling kernel samples only a 2x2
    # subset of the grid and the keys miss most of the frame.
    "mvitv2_tiny": dict(depth=5, transitions=(1, 3), embed_dim=32, num_frames=8,
                        crop_size=64, drop_path=0.0, kv_stride=(1, 4, 4)),
}


def build_backbone(name: str, **overrides) -> "MViT":
    """Build a preset by name (like ``timm.create_model``); overrides replace config fields.

    Raises ValueError for an unknown name or override, listing the valid ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown backbone {name!r}; valid names: {sorted(PRESETS)}")
    valid = [f.name for f in dataclasses.fields(MViTConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name!r}; valid overrides: {valid}")
    return MViT(MViTConfig(**{**PRESETS[name], **overrides}))


# --------------------------------------------------------------------------- helpers
def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a whole residual branch per sample; survivors rescaled."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B,1,1)
    return x * mask / keep


def pooled_size(thw: Thw, kernel: Thw, stride: Thw) -> Thw:
    """Output size of a Conv3d/MaxPool3d with 'same'-style padding kernel//2."""
    return tuple((s + 2 * (k // 2) - k) // st + 1 for s, k, st in zip(thw, kernel, stride))


def split_cls(x: torch.Tensor, has_cls: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(…, 1+N, C) -> cls (…, 1, C) and spatial (…, N, C); the cls row is never pooled."""
    if not has_cls:
        return None, x
    return x[..., :1, :], x[..., 1:, :]


def join_cls(cls: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if cls is None else torch.cat([cls, x], dim=-2)


def pool_tokens(x: torch.Tensor, pool: nn.Module, thw: Thw, has_cls: bool) -> tuple[torch.Tensor, Thw]:
    """Apply a 3-D pooling op to the token grid of x: (B, [heads,] N, C) -> pooled tokens."""
    cls, x = split_cls(x, has_cls)
    lead, c = x.shape[:-2], x.shape[-1]
    grid = x.reshape(-1, *thw, c).permute(0, 4, 1, 2, 3)  # (B·heads, C, T, H, W)
    grid = pool(grid)
    new_thw = tuple(grid.shape[2:])
    x = grid.flatten(2).transpose(1, 2).reshape(*lead, -1, c)  # (B, [heads,] N', C)
    return join_cls(cls, x), new_thw


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a (L, C) relative-position table to `length` rows (as MViTv2 does)."""
    if table.shape[0] == length:
        return table
    t = F.interpolate(table.t()[None], size=length, mode="linear")  # (1, C, length)
    return t[0].t()


def rel_index(q_len: int, k_len: int, device) -> torch.Tensor:
    """(q_len, k_len) indices into a 2·max-1 table; the coarser axis is scaled up so both
    grids span the same extent (MViTv2 §3.1 decomposed relative positions)."""
    q_ratio = max(k_len / q_len, 1.0)
    k_ratio = max(q_len / k_len, 1.0)
    q = torch.arange(q_len, device=device)[:, None] * q_ratio
    k = torch.arange(k_len, device=device)[None, :] * k_ratio
    return (q - k + (k_len - 1) * k_ratio).long()


# --------------------------------------------------------------------------- modules
class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiScaleAttention(nn.Module):
    """Pooling attention with residual pooling and optional decomposed relative positions."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, input_thw: Thw, kernel: Thw,
                 q_stride: Thw, kv_stride: Thw, has_cls: bool, rel_pos: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_out // num_heads
        self.has_cls = has_cls
        self.use_rel_pos = rel_pos
        # Width changes here, not in the MLP (MViTv2 "dim_mul_in_att").
        self.qkv = nn.Linear(dim, 3 * dim_out, bias=True)
        self.proj = nn.Linear(dim_out, dim_out)
        pad = tuple(k // 2 for k in kernel)
        hd = self.head_dim
        # Depthwise over head_dim and shared by all heads: heads are folded into the batch.
        self.pool_q = nn.Conv3d(hd, hd, kernel, q_stride, pad, groups=hd, bias=False)
        self.pool_k = nn.Conv3d(hd, hd, kernel, kv_stride, pad, groups=hd, bias=False)
        self.pool_v = nn.Conv3d(hd, hd, kernel, kv_stride, pad, groups=hd, bias=False)
        self.norm_q = nn.LayerNorm(hd, eps=LN_EPS)
        self.norm_k = nn.LayerNorm(hd, eps=LN_EPS)
        self.norm_v = nn.LayerNorm(hd, eps=LN_EPS)
        if rel_pos:
            q_thw = pooled_size(input_thw, kernel, q_stride)
            kv_thw = pooled_size(input_thw, kernel, kv_stride)
            # Table sizes as in the official checkpoints: 2·max(q, kv)-1 spatially, 2·T-1 in time.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * max(q_thw[1], kv_thw[1]) - 1, hd))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * max(q_thw[2], kv_thw[2]) - 1, hd))
            self.rel_pos_t = nn.Parameter(torch.zeros(2 * input_thw[0] - 1, hd))
            for p in (self.rel_pos_h, self.rel_pos_w, self.rel_pos_t):
                nn.init.trunc_normal_(p, std=0.02)

    def _pool(self, x, pool, norm, thw):
        x, new_thw = pool_tokens(x, pool, thw, self.has_cls)
        return norm(x), new_thw

    def rel_pos_bias(self, q: torch.Tensor, q_thw: Thw, k_thw: Thw) -> torch.Tensor:
        """Additive attention bias (B, heads, Nq, Nk) from decomposed t/h/w tables.

        Built from q·R per axis and broadcast, never a full (Nq, Nk, C) gather."""
        _, q_sp = split_cls(q, self.has_cls)
        b, h, _, c = q_sp.shape
        r_q = q_sp.reshape(b, h, *q_thw, c)  # (B, heads, qt, qh, qw, C)
        tables = (self.rel_pos_t, self.rel_pos_h, self.rel_pos_w)
        rel = []
        for axis, table in enumerate(tables):
            length = 2 * max(q_thw[axis], k_thw[axis]) - 1
            r = resize_rel_pos(table, length)[rel_index(q_thw[axis], k_thw[axis], q.device)]
            rel.append(r.to(q.dtype))  # (q_axis, k_axis, C)
        rel_t = torch.einsum("bhtyxc,tkc->bhtyxk", r_q, rel[0])  # (B,heads,qt,qh,qw,kt)
        rel_h = torch.einsum("bhtyxc,ykc->bhtyxk", r_q, rel[1])  # (…, kh)
        rel_w = torch.einsum("bhtyxc,xkc->bhtyxk", r_q, rel[2])  # (…, kw)
        bias = (rel_t[..., :, None, None] + rel_h[..., None, :, None]
                + rel_w[..., None, None, :])  # (B, heads, qt, qh, qw, kt, kh, kw)
        bias = bias.reshape(b, h, math.prod(q_thw), math.prod(k_thw))
        if self.has_cls:
            bias = F.pad(bias, (1, 0, 1, 0))  # cls row/column get no positional bias
        return bias

    def forward(self, x: torch.Tensor, thw: Thw) -> tuple[torch.Tensor, Thw]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, hd)
        q, q_thw = self._pool(q, self.pool_q, self.norm_q, thw)
        k, k_thw = self._pool(k, self.pool_k, self.norm_k, thw)
        v, _ = self._pool(v, self.pool_v, self.norm_v, thw)
        mask = self.rel_pos_bias(q, q_thw, k_thw) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Nq, hd)
        # Residual pooling (MViTv2 §3.1): add pooled q; the cls row is left untouched.
        # Out-of-place, since the fused kernels keep `out` for their backward.
        q_res = F.pad(q[:, :, 1:], (0, 0, 1, 0)) if self.has_cls else q
        out = out + q_res
        out = out.transpose(1, 2).reshape(b, out.shape[2], -1)  # (B, Nq, dim_out)
        return self.proj(out), q_thw


class MultiScaleBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, num_heads: int, input_thw: Thw, cfg: MViTConfig,
                 q_stride: Thw, kv_stride: Thw, drop_path: float):
        super().__init__()
        self.has_cls = cfg.cls_embed
        self.skip_from_norm = cfg.skip_from_norm
        self.drop_path_p = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, input_thw, cfg.pool_kernel,
                                        q_stride, kv_stride, cfg.cls_embed, cfg.rel_pos)
        self.norm2 = nn.LayerNorm(dim_out, eps=LN_EPS)
        self.mlp = Mlp(dim_out, int(dim_out * cfg.mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)
        if math.prod(q_stride) > 1:
            # Kernel s+1 for stride s>1, as the MViTv2 reference does for its skip pooling.
            kernel = tuple(s + 1 if s > 1 else s for s in q_stride)
            self.pool_skip = nn.MaxPool3d(kernel, q_stride, tuple(k // 2 for k in kernel))

    def forward(self, x: torch.Tensor, thw: Thw) -> tuple[torch.Tensor, Thw]:
        x_norm = self.norm1(x)  # (B, N, dim)
        x_attn, new_thw = self.attn(x_norm, thw)  # (B, N', dim_out)
        skip = x
        if hasattr(self, "proj"):
            skip = self.proj(x_norm if self.skip_from_norm else x)  # (B, N, dim_out)
        if hasattr(self, "pool_skip"):
            skip, _ = pool_tokens(skip, self.pool_skip, thw, self.has_cls)  # (B, N', dim_out)
        x = skip + drop_path(x_attn, self.drop_path_p, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_p, self.training)
        return x, new_thw


class MViT(nn.Module):
    """MViTv2 backbone: (B, 3, T, H, W) -> pooled feature (B, embed_dim)."""

    def __init__(self, cfg: MViTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_frames = cfg.num_frames
        self.crop_size = cfg.crop_size
        self.patch_embed = PatchEmbed(cfg)
        thw = pooled_size((cfg.num_frames, cfg.crop_size, cfg.crop_size), cfg.patch_kernel,
                          cfg.patch_stride)
        self.patch_thw = thw
        dim = cfg.embed_dim
        if cfg.cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.abs_pos:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, thw[1] * thw[2], dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, thw[0], dim))
            if cfg.cls_embed:
                self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks, self.stage_ends, self.embed_dim = self._make_blocks(cfg, thw)
        self.norm = nn.LayerNorm(self.embed_dim, eps=LN_EPS)
        self.apply(_init_weights)
        for name, p in self.named_parameters():
            if name in ("cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"):
                nn.init.trunc_normal_(p, std=0.02)

    @staticmethod
    def _make_blocks(cfg: MViTConfig, thw: Thw):
        # linear 0 -> rate; plain Python so building under torch.device('meta') works
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        dim, heads, kv_stride = cfg.embed_dim, cfg.num_heads, cfg.kv_stride
        blocks, stage_ends = nn.ModuleList(), []
        for i in range(cfg.depth):
            q_stride = (1, 1, 1)
            dim_out = dim
            if i in cfg.transitions:
                stage_ends.append(i - 1)
                q_stride, heads, dim_out = cfg.q_stride, heads * 2, dim * 2
                kv_stride = tuple(max(kv // q, 1) for kv, q in zip(kv_stride, q_stride))
            blocks.append(MultiScaleBlock(dim, dim_out, heads, thw, cfg, q_stride, kv_stride,
                                          rates[i]))
            thw = pooled_size(thw, cfg.pool_kernel, q_stride)
            dim = dim_out
        stage_ends.append(cfg.depth - 1)
        return blocks, stage_ends, dim

    def no_weight_decay(self) -> set[str]:
        """Names the recipe exempts from weight decay besides biases/1-D params."""
        return {n for n, _ in self.named_parameters()
                if n.startswith(("cls_token", "pos_embed")) or ".rel_pos_" in n}

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Thw]:
        x = self.patch_embed(x)  # (B, T, H, W, D) tokens on the patch grid
        b, t, h, w, d = x.shape
        if self.cfg.abs_pos:
            if (t, h * w) != (self.pos_embed_temporal.shape[1], self.pos_embed_spatial.shape[1]):
                raise ValueError(f"input gives a {t}x{h}x{w} patch grid but the position tables "
                                 f"were built for {self.patch_thw}; rebuild with matching "
                                 "num_frames/crop_size or load with interpolation")
            # Spatial table repeated over t, temporal table over h·w (seed eq. 1).
            x = (x.reshape(b, t, h * w, d) + self.pos_embed_spatial[:, None]
                 + self.pos_embed_temporal[:, :, None])  # (B, T, HW, D)
        x = x.reshape(b, t * h * w, d)  # t-major token order
        if self.cfg.cls_embed:
            cls = self.cls_token
            if self.cfg.abs_pos:
                cls = cls + self.pos_embed_class
            x = torch.cat([cls.expand(b, -1, -1), x], dim=1)  # (B, 1+N, D)
        return x, (t, h, w)

    def _run_block(self, block: nn.Module, x: torch.Tensor, thw: Thw):
        if self.cfg.act_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, thw, use_reentrant=False)
        return block(x, thw)

    def forward_features(self, x: torch.Tensor, return_stages: bool = False):
        """Tokens after the last block (B, [1+]N, D); with return_stages also the list of
        stage outputs as (B, C, T, H, W) grids (cls token dropped)."""
        x, thw = self._embed(x)
        stages = []
        for i, block in enumerate(self.blocks):
            x, thw = self._run_block(block, x, thw)
            if return_stages and i in self.stage_ends:
                _, grid = split_cls(x, self.cfg.cls_embed)
                stages.append(grid.transpose(1, 2).reshape(x.shape[0], -1, *thw))
        return (x, stages) if return_stages else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.forward_features(x))
        if self.cfg.cls_embed:
            return x[:, 0]  # (B, D)
        return x.mean(dim=1)  # (B, D)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MViTConfig):
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, cfg.patch_kernel, cfg.patch_stride,
                              cfg.patch_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)  # (B, T, H, W, D)


def _init_weights(m: nn.Module) -> None:
    # PySlowFast init: truncated normal 0.02 for linears, LayerNorm identity.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
