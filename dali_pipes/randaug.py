"""Clip-level RandAugment driven by per-sample parameters drawn in Python.

DALI's `nvidia.dali.auto_aug.rand_augment` picks its ops with DALI's own random generator, so
its choices cannot be replayed from (seed, epoch, sample id). Here the n ops and their noisy
magnitudes are drawn by `draw_rand_augment` from the sample's numpy generator and folded into
one parameter set per clip, which the DALI graph (`apply_dali`) and the torch peer
(`apply_torch`) both execute; every frame of a clip gets the same transform.

Folding: the drawn ops keep their magnitudes but run in a fixed family order (geometry,
autocontrast, colour, sharpness, posterize, solarize), so the graph needs one conditional
branch per family instead of n x ops. Geometric picks compose into one affine matrix (one
resampling instead of several), colour factors multiply, posterize/solarize keep the
strongest pick. Colour picks without "color" (brightness, contrast) compose to a scalar
affine a * x + b, the "tone", which DALI's CPU applies ~20x faster than a 3x4 matrix; after
autocontrast the tone joins its per-channel affine (one pass, one rounding). Magnitude
ranges follow timm's RandAugment (rotate 30 deg, shear 0.3, translate 0.45 of the side,
enhance factors 1 +- 0.9, posterize down to 4 bits, solarize threshold down to 0) on the
paper's 0..10 scale.
"""
from __future__ import annotations

import numpy as np

OPS = ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness",
       "contrast", "color", "sharpness", "posterize", "solarize", "autocontrast")
MAX_MAGNITUDE = 10.0
FILL = 128  # grey fill of uncovered pixels after geometric ops (timm's default)

# External-source names and dtypes of the parameters, shared by the graph and the feeder.
PARAM_SPECS = {
    "ra_affine": (np.float32, (2, 3)),  # forward map of (x, y, 1) in crop pixels
    "ra_do_affine": (np.bool_, ()),
    "ra_do_autocontrast": (np.bool_, ()),
    "ra_tone_scale": (np.float32, ()),  # brightness/contrast composed: a * x + b, this is a
    "ra_tone_shift": (np.float32, ()),  # ... and this b, in 0..255 units
    "ra_do_tone": (np.bool_, ()),  # tone on its own (else folded into autocontrast or colour)
    "ra_color": (np.float32, (3, 4)),  # [M T]: out_rgb = M @ rgb + T (colour ops composed)
    "ra_do_color": (np.bool_, ()),  # a "color" pick: the full matrix, tone included
    "ra_sharp": (np.float32, (3, 3)),  # convolution kernel
    "ra_do_sharp": (np.bool_, ()),
    "ra_post_mask": (np.uint8, ()),  # bit mask keeping the top `bits` bits
    "ra_do_post": (np.bool_, ()),
    "ra_sol_thr": (np.uint8, ()),  # pixels >= threshold are inverted
    "ra_do_sol": (np.bool_, ()),
}


def identity_params() -> dict:
    return {"ra_affine": np.array([[1, 0, 0], [0, 1, 0]], np.float32),
            "ra_do_affine": np.array(False), "ra_do_autocontrast": np.array(False),
            "ra_tone_scale": np.array(1.0, np.float32), "ra_tone_shift": np.array(0.0, np.float32),
            "ra_do_tone": np.array(False),
            "ra_color": np.eye(3, 4, dtype=np.float32), "ra_do_color": np.array(False),
            "ra_sharp": _sharp_kernel(1.0), "ra_do_sharp": np.array(False),
            "ra_post_mask": np.array(0xFF, np.uint8), "ra_do_post": np.array(False),
            "ra_sol_thr": np.array(255, np.uint8), "ra_do_sol": np.array(False)}


def _sharp_kernel(factor: float) -> np.ndarray:
    # PIL's Sharpness: blend of the image (factor 1) with its 3x3 smoothed version (factor 0).
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    ident = np.zeros((3, 3), np.float32)
    ident[1, 1] = 1.0
    return (factor * ident + (1.0 - factor) * smooth).astype(np.float32)


def _about_centre(m: np.ndarray, size: int) -> np.ndarray:
    c = size / 2.0
    to0 = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]], np.float64)
    back = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]], np.float64)
    return back @ m @ to0


def _geometry(op: str, f: float, sign: float, size: int) -> np.ndarray:
    """3x3 forward map of one geometric op with relative magnitude f in [0, 1]."""
    m = np.eye(3)
    if op == "rotate":
        a = np.deg2rad(sign * 30.0 * f)
        m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    elif op == "shear_x":
        m[0, 1] = sign * 0.3 * f
    elif op == "shear_y":
        m[1, 0] = sign * 0.3 * f
    elif op == "translate_x":
        m[0, 2] = sign * 0.45 * f * size
    elif op == "translate_y":
        m[1, 2] = sign * 0.45 * f * size
    return _about_centre(m, size)


_GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, PIL's "L" conversion


def _colour_matrix(op: str, factor: float) -> np.ndarray:
    """4x4 affine map of homogeneous RGB for one enhance op (PIL ImageEnhance semantics, with
    a fixed mid-grey contrast centre): blending with black, grey 128 or the pixel's luma."""
    m = np.eye(4)
    if op == "brightness":
        m[:3, :3] *= factor
    elif op == "contrast":
        m[:3, :3] *= factor
        m[:3, 3] = 128.0 * (1.0 - factor)
    elif op == "color":
        m[:3, :3] = factor * np.eye(3) + (1.0 - factor) * np.tile(_GREY, (3, 1))
    return m


def draw_rand_augment(rng: np.random.Generator, n: int, magnitude: float, magnitude_std: float,
                      size: int) -> dict:
    """Parameters of one clip's RandAugment: n ops (uniform, with replacement), magnitude
    m + N(0, std) clipped to [0, 10], random sign; `size` is the square crop side."""
    p = identity_params()
    affine, colour, mixes = np.eye(3), np.eye(4), False
    for _ in range(n):
        op = OPS[int(rng.integers(len(OPS)))]
        m = magnitude + (rng.normal(0.0, magnitude_std) if magnitude_std > 0 else 0.0)
        f = float(np.clip(m, 0.0, MAX_MAGNITUDE)) / MAX_MAGNITUDE
        sign = -1.0 if rng.random() < 0.5 else 1.0
        if op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
            affine = _geometry(op, f, sign, size) @ affine
            p["ra_do_affine"] = np.array(True)
        elif op in ("brightness", "contrast", "color"):
            colour = _colour_matrix(op, max(0.0, 1.0 + sign * 0.9 * f)) @ colour
            mixes = mixes or op == "color"
            p["ra_do_tone"] = np.array(True)
        elif op == "sharpness":
            p["ra_sharp"] = _sharp_kernel(1.0 + sign * 0.9 * f)
            p["ra_do_sharp"] = np.array(True)
        elif op == "posterize":
            bits = int(round(8 - 4 * f))
            p["ra_post_mask"] = np.array(min(int(p["ra_post_mask"]), (0xFF << (8 - bits)) & 0xFF),
                                         np.uint8)
            p["ra_do_post"] = np.array(True)
        elif op == "solarize":
            thr = int(round(255 * (1.0 - f)))
            p["ra_sol_thr"] = np.array(min(int(p["ra_sol_thr"]), thr), np.uint8)
            p["ra_do_sol"] = np.array(True)
        elif op == "autocontrast":
            p["ra_do_autocontrast"] = np.array(True)
    p["ra_affine"] = affine[:2].astype(np.float32)
    _set_colour(p, colour, mixes)
    return p


def _set_colour(p: dict, colour: np.ndarray, mixes: bool) -> None:
    """Route the composed 4x4 colour map: the full matrix when a "color" op mixes channels,
    else the scalar tone (brightness and contrast keep M = a I and T = b 1)."""
    if mixes:
        p["ra_color"] = colour[:3].astype(np.float32)
        p["ra_do_color"], p["ra_do_tone"] = np.array(True), np.array(False)
        return
    scale = float(colour[0, 0])
    if bool(p["ra_do_autocontrast"]):
        p["ra_do_tone"] = np.array(False)  # the autocontrast pass applies it ...
        # ... and divides by the scale (a product of n factors >= 0.1: tiny only for huge n)
        scale = max(scale, 1e-6)
    p["ra_tone_scale"] = np.array(scale, np.float32)
    p["ra_tone_shift"] = np.array(colour[0, 3], np.float32)


# ----------------------------------------------------------------------------------- DALI ---

def dali_param_inputs() -> dict:
    """One external_source per parameter (CPU, per-sample)."""
    from nvidia.dali import fn
    return {name: fn.external_source(name=name, dtype=_dali_dtype(dt), ndim=len(shape))
            for name, (dt, shape) in PARAM_SPECS.items()}


def _dali_dtype(dt):
    from nvidia.dali import types
    return {np.float32: types.FLOAT, np.bool_: types.BOOL, np.uint8: types.UINT8}[dt]


def apply_dali(x, p: dict, on_gpu: bool, geom_interp: str = "linear"):
    """RandAugment on uint8 FHWC clips x (F, S, S, 3) -> same shape and type.

    Needs a pipeline with enable_conditionals=True; conditions and named arguments stay on
    the CPU, operands of arithmetic go to the data's device.
    """
    from nvidia.dali import fn, types

    def dev(node):
        return node.gpu() if on_gpu else node

    if p["ra_do_affine"]:
        x = fn.warp_affine(x, matrix=p["ra_affine"], inverse_map=False, fill_value=FILL,
                           interp_type=types.INTERP_NN if geom_interp == "nn"
                           else types.INTERP_LINEAR)
    if p["ra_do_autocontrast"]:
        x = _autocontrast_tone(x, p, on_gpu)
    if p["ra_do_tone"]:
        x = fn.brightness_contrast(x, brightness=p["ra_tone_scale"],
                                   brightness_shift=p["ra_tone_shift"] / 255.0)
    if p["ra_do_color"]:
        # One pass for every colour op (rounded and saturated to uint8 once, at the end).
        x = fn.coord_transform(x, MT=p["ra_color"], dtype=types.UINT8)
    if p["ra_do_sharp"]:
        x = fn.filter(x, dev(p["ra_sharp"]), border="clamp")
    if p["ra_do_post"]:
        x = x & dev(p["ra_post_mask"])
    if p["ra_do_sol"]:
        # 255 - x == x ^ 255 for uint8: inverts pixels at or above the threshold, no casts.
        x = x ^ ((x >= dev(p["ra_sol_thr"])) * types.Constant(255, dtype=types.UINT8))
    return x


def _autocontrast_tone(x, p: dict, on_gpu: bool):
    """Per-channel stretch of the clip's (FHW) range to 0..255, then the tone a * x + b, as one
    per-channel affine: x * k + c, k = 255 a / span, c = b - lo * k; flat channels (span 0)
    only get the tone, as PIL leaves them. Clip-level extremes keep one transform per clip."""
    from nvidia.dali import fn, types

    lo = fn.cast(fn.reductions.min(x, axis_names="FHW", keep_dims=True), dtype=types.FLOAT)
    hi = fn.cast(fn.reductions.max(x, axis_names="FHW", keep_dims=True), dtype=types.FLOAT)
    span = hi - lo  # (1, 1, 1, 3)
    flat = span == 0.0
    a, b = p["ra_tone_scale"], p["ra_tone_shift"]
    if not on_gpu:
        # fn.normalize computes (x - mean) / stddev straight to uint8: ~30% faster on the CPU
        # than the expression below, whose float -> uint8 cast is the slow part.
        sd = (span + flat * 255.0) / (255.0 * a)
        return fn.normalize(x, axis_names="FHW", mean=lo * (1.0 - flat) - b * sd, stddev=sd,
                            dtype=types.UINT8)
    # Argument inputs must live on the CPU, so the GPU evaluates the affine as arithmetic.
    k = 255.0 / (span + flat * 255.0) * a.gpu()
    return fn.cast((x - lo * (1.0 - flat)) * k + b.gpu(), dtype=types.UINT8)


# ---------------------------------------------------------------------------------- torch ---

def apply_torch(x, p: dict, geom_interp: str = "linear"):
    """The same transform on a float tensor x (T, 3, S, S) in 0..255 (the throughput peer)."""
    import torch
    import torch.nn.functional as F

    if bool(p["ra_do_affine"]):
        t, _, h, w = x.shape
        fwd = np.vstack([p["ra_affine"].astype(np.float64), [0, 0, 1]])
        inv = np.linalg.inv(fwd)  # output pixel -> source pixel
        # Pixel centres (i + 0.5) to normalised [-1, 1] coordinates (align_corners=False).
        to_n = np.array([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
        theta = to_n @ inv @ np.linalg.inv(to_n)
        theta = torch.tensor(theta[:2], dtype=x.dtype).expand(t, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        mode = "nearest" if geom_interp == "nn" else "bilinear"
        x = F.grid_sample(x - FILL, grid, mode=mode, padding_mode="zeros",
                          align_corners=False) + FILL
    if bool(p["ra_do_autocontrast"]):
        lo = x.amin(dim=(0, 2, 3), keepdim=True)
        hi = x.amax(dim=(0, 2, 3), keepdim=True)
        span = hi - lo
        x = torch.where(span > 0, (x - lo) * 255.0 / span.clamp_min(1e-6), x)
    if bool(p["ra_do_autocontrast"]) or bool(p["ra_do_tone"]):
        x = (x * float(p["ra_tone_scale"]) + float(p["ra_tone_shift"])).round().clamp(0, 255)
    if bool(p["ra_do_color"]):
        mt = torch.from_numpy(p["ra_color"]).to(x.dtype)  # (3, 4)
        x = (torch.einsum("ij,tjhw->tihw", mt[:, :3], x) + mt[:, 3].view(1, 3, 1, 1))
        x = x.round().clamp(0, 255)
    if bool(p["ra_do_sharp"]):
        k = torch.from_numpy(p["ra_sharp"]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3).clamp(0, 255)
    if bool(p["ra_do_post"]):
        x = (x.round().to(torch.uint8) & int(p["ra_post_mask"])).float()
    if bool(p["ra_do_sol"]):
        x = torch.where(x >= float(p["ra_sol_thr"]), 255.0 - x, x)
    return x
