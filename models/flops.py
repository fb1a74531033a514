"""Multiply-add counter in the fvcore convention, run on meta tensors (no real compute).

fvcore (the counter behind the MViTv2 / SPEC reference numbers) counts 1 multiply-add as 1
flop for convolutions, linears and matmuls (bias adds not counted), 5 flops per element for
an affine LayerNorm (4 without affine), and nothing for softmax, GELU, element-wise adds,
max pooling or means. We reproduce that at the ATen level: a TorchDispatchMode sees the
decomposed ops (linear -> addmm/mm, einsum/matmul -> bmm, SDPA -> one fused op or bmm's),
so models that use fused SDPA are counted exactly like PySlowFast's explicit q@kᵀ, attn@v.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _mm(args, out) -> int:
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * b.shape[1]


def _addmm(args, out) -> int:
    return _mm(args[1:], out)


def _bmm(args, out) -> int:
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _baddbmm(args, out) -> int:
    return _bmm(args[1:], out)


def _conv(args, out) -> int:
    # out elements × (in_channels / groups) × kernel volume; weight is (Cout, Cin/g, k...)
    weight = args[1]
    return out.numel() * math.prod(weight.shape[1:])


def _sdpa(args, out) -> int:
    # q@kᵀ and attn@v: B·heads·Nq·Nk·(d_qk + d_v)
    q, k, v = args[0], args[1], args[2]
    return math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _layer_norm(args, out) -> int:
    x, weight = args[0], args[2] if len(args) > 2 else None
    return x.numel() * (5 if weight is not None else 4)


_HANDLERS = {
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.bmm.default: _bmm,
    aten.baddbmm.default: _baddbmm,
    aten.convolution.default: _conv,
    aten.native_layer_norm.default: _layer_norm,
}
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_fused_attention_overrideable"):
    if hasattr(aten, _name):
        _HANDLERS[getattr(aten, _name).default] = _sdpa


class MacCounter(TorchDispatchMode):
    """Accumulates fvcore-style multiply-adds of every op that runs inside it."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        handler = _HANDLERS.get(func)
        if handler is not None:
            first = out[0] if isinstance(out, (tuple, list)) else out
            macs = handler(args, first)
            self.total += macs
            self.by_op[str(func)] = self.by_op.get(str(func), 0) + macs
        return out


def _default_shape(module: nn.Module) -> tuple[int, ...]:
    net = getattr(module, "backbone", module)
    if isinstance(net, nn.Sequential):
        net = net[0]
    if not hasattr(net, "num_frames"):
        raise ValueError("pass input_shape: the module exposes no num_frames/crop_size")
    return (1, 3, net.num_frames, net.crop_size, net.crop_size)


def count_flops(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> float:
    """fvcore-convention multiply-adds of one eval-mode forward at `input_shape`.

    `input_shape` defaults to (1, 3, num_frames, crop, crop) of the backbone. The forward runs
    on meta tensors (parameters swapped for meta stand-ins), so it costs no compute and
    leaves `module` untouched; works for a backbone, backbone+head or a MultiTrainModel.
    """
    shape = tuple(input_shape) if input_shape is not None else _default_shape(module)
    state = {n: torch.empty_like(t, device="meta")
             for n, t in [*module.named_parameters(), *module.named_buffers()]}
    modes = {m: m.training for m in module.modules()}
    module.eval()  # dropout / drop path off, as fvcore measures
    counter = MacCounter()
    try:
        with torch.no_grad(), counter:
            functional_call(module, state, (torch.empty(shape, device="meta"),))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return float(counter.total)
