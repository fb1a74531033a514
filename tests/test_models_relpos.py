"""Decomposed relative position bias of MViTv2 against the formula, one (query, key) pair at a time.

Why not torchvision's MViT (or timm's, which imports torchvision): the torchvision wheels on the
package registry are built for the CUDA torch of the same release and do not load beside the
CPU torch these tests run on, so that reference cannot be imported here. The reference instead
is the MViTv2 paper's definition (Li et al. 2022, section 3.1) as PySlowFast computes it in
`cal_rel_pos_spatial` and `cal_rel_pos_temporal` (slowfast/models/attention.py), written out as
a plain loop over every query and key:

    bias(i, j) = q_i . (R_t[d_t] + R_h[d_h] + R_w[d_w]),
    d_a = floor(p_a(i) * max(K_a / Q_a, 1) - p_a(j) * max(Q_a / K_a, 1) + (K_a - 1) * max(Q_a / K_a, 1))

with p_a the position of a token along axis a on its own (query or key) grid of Q_a or K_a
positions: both grids are scaled to the finer one, so a pooled grid's step counts as several of
the other's. A table whose length is not 2 * max(Q_a, K_a) - 1 (a checkpoint trained at another
size) is linearly resampled first (`get_rel_pos`). The class token's row and column get no bias.
The residual pooling of the attention output (add the pooled query, not to the class token) is
checked with it, as MViTv2 section 3.1 and PySlowFast's `MultiScaleAttention.forward` define it.
"""
import math

import numpy as np
import pytest
import torch

from helpers import linear_resample
from models.mvit import MultiScaleAttention

# A block whose queries are pooled with stride 2 and keys/values with stride 4 in space; in time
# the queries are pooled (stride 2) and the keys are not, so both directions of scaling occur.
INPUT_THW, Q_STRIDE, KV_STRIDE = (4, 8, 12), (2, 2, 2), (1, 4, 4)
DIM, HEADS = 16, 2


def block(has_cls: bool) -> MultiScaleAttention:
    torch.manual_seed(0)
    attn = MultiScaleAttention(DIM, DIM, HEADS, INPUT_THW, (3, 3, 3), Q_STRIDE, KV_STRIDE,
                               has_cls=has_cls, rel_pos=True).double().eval()
    with torch.no_grad():  # tables far from their 0.02 init, so the bias matters in the softmax
        for p in (attn.rel_pos_t, attn.rel_pos_h, attn.rel_pos_w):
            p.normal_(0, 1.0)
    return attn


def grid(thw):
    """Token positions (t, y, x) in the t-major order of the token sequence."""
    return [(t, y, x) for t in range(thw[0]) for y in range(thw[1]) for x in range(thw[2])]


def reference_bias(q: np.ndarray, q_thw, k_thw, tables, has_cls: bool, sign: int = 1) -> np.ndarray:
    """(B, heads, Nq, Nk) bias by the formula above, a loop over every (query, key) pair. `sign`
    -1 computes it with the query and key positions swapped in the distance (a sign error)."""
    b, h, nq, c = q.shape
    cls = 1 if has_cls else 0
    resampled = []
    for axis, table in enumerate(tables):
        length = 2 * max(q_thw[axis], k_thw[axis]) - 1
        resampled.append(table if table.shape[0] == length else linear_resample(table, length))
    q_pos, k_pos = grid(q_thw), grid(k_thw)
    bias = np.zeros((b, h, nq, len(k_pos) + cls))
    for i, pq in enumerate(q_pos):
        for j, pk in enumerate(k_pos):
            r = np.zeros(c)
            for axis in range(3):
                nq_a, nk_a = q_thw[axis], k_thw[axis]
                q_scale, k_scale = max(nk_a / nq_a, 1.0), max(nq_a / nk_a, 1.0)
                d = sign * (pq[axis] * q_scale - pk[axis] * k_scale) + (nk_a - 1) * k_scale
                index = int(math.floor(d))
                assert sign == -1 or 0 <= index < resampled[axis].shape[0]
                r = r + resampled[axis][index]  # (a negative index counts from the end)
            bias[:, :, cls + i, cls + j] = q[:, :, cls + i] @ r
    return bias


def pooled_qkv(attn, x, thw):
    """The block's own projections and pooling (not under test here): q, k, v and their grids."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, q_thw = attn._pool(qkv[0], attn.pool_q, attn.norm_q, thw)
    k, k_thw = attn._pool(qkv[1], attn.pool_k, attn.norm_k, thw)
    v, _ = attn._pool(qkv[2], attn.pool_v, attn.norm_v, thw)
    return q, k, v, q_thw, k_thw


@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "no_cls"])
@pytest.mark.parametrize("thw", [INPUT_THW, (6, 12, 20)], ids=["trained_size", "resampled"])
def test_relative_position_bias_is_the_papers_formula(has_cls, thw):
    """At the size the tables were made for, and at a larger input whose grids need longer
    tables (each one then linearly resampled): the bias and the whole attention output."""
    attn = block(has_cls)
    x = torch.randn(2, (1 if has_cls else 0) + math.prod(thw), DIM, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    q, k, v, q_thw, k_thw = pooled_qkv(attn, x, thw)
    assert q_thw[0] < k_thw[0] and q_thw[1] > k_thw[1] and q_thw[2] > k_thw[2]
    tables = [p.detach().numpy() for p in (attn.rel_pos_t, attn.rel_pos_h, attn.rel_pos_w)]
    lengths = [2 * max(a, b) - 1 for a, b in zip(q_thw, k_thw)]
    assert ([t.shape[0] for t in tables] == lengths) == (thw == INPUT_THW)
    with torch.no_grad():
        got = attn.rel_pos_bias(q, q_thw, k_thw).numpy()
    want = reference_bias(q.detach().numpy(), q_thw, k_thw, tables, has_cls)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # A sign error in the distance is a different bias: the comparison above would catch it.
    flipped = reference_bias(q.detach().numpy(), q_thw, k_thw, tables, has_cls, sign=-1)
    assert np.abs(flipped - want).max() > 0.5

    # The attention itself: softmax(q k^T / sqrt(d) + bias) v, plus the pooled query on every
    # token but the class token, heads concatenated, then the output projection.
    qn, kn, vn = (t.detach().numpy() for t in (q, k, v))
    logits = qn @ kn.transpose(0, 1, 3, 2) / math.sqrt(attn.head_dim) + want
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = weights @ vn
    out[:, :, (1 if has_cls else 0):] += qn[:, :, (1 if has_cls else 0):]
    out = out.transpose(0, 2, 1, 3).reshape(2, out.shape[2], -1)
    out = out @ attn.proj.weight.detach().numpy().T + attn.proj.bias.detach().numpy()
    with torch.no_grad():
        full, full_thw = attn(x, thw)
    assert full_thw == q_thw
    np.testing.assert_allclose(full.numpy(), out, rtol=1e-9, atol=1e-11)
