"""Clip-level RandAugment as timm's `rand-m7-n4-mstd0.5-inc1`, driven by parameters drawn in
Python.

DALI's `nvidia.dali.auto_aug.rand_augment` picks its ops with DALI's own random generator, so
its choices cannot be replayed from (seed, epoch, sample id). Here `draw_ops` draws the recipe
from the sample's numpy generator as timm's `RandAugment` does (timm 1.0,
`timm/data/auto_augment.py`; PySlowFast, which MultiTrain builds on, carries a copy of it):
n ops uniformly from the 15 "increasing" ops with replacement, each applied with probability
0.5, magnitude N(m, mstd) clipped to [0, 10], a random sign for the signed ops, and the same
level-to-argument mappings. `draw_rand_augment` turns that plan into one stage per drawn op
(an op id and a 12-float argument vector); the DALI graph (`apply_dali`) and the torch peer
(`apply_torch`) run the stages in the drawn order, each on the previous result, with the same
parameters for every frame of a clip. Statistics that PIL takes per image (autocontrast and
equalize histograms, the contrast op's mean luma) are taken per frame, inside the graph.

Geometry: the reference augments the whole decoded frame and crops afterwards; here the
stages run on the crop (fewer pixels). Each geometric op is therefore built in the frame's
pixel coordinates (translate relative to the frame's width/height, rotation about the frame's
centre, shear about its top-left corner) and conjugated by the crop window's map, so every
pixel of the crop moves exactly as it would in the frame. What differs: content the op would
bring in from outside the crop window is fill here, and per-frame statistics cover the crop.
"""
from __future__ import annotations

import math

import numpy as np

# timm's _RAND_INCREASING_TRANSFORMS, in timm's order (the op index is the drawn integer).
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
PROB = 0.5  # timm's AugmentOp prob for RandAugment ('p' of the config string)
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10] and divided by it
FILL = 128  # grey of uncovered pixels after geometric ops (timm's _FILL)
STAGES = 4  # stages in the graph: the recipe's n; draws with n > STAGES are refused

# Stage kinds: the branches of one graph stage. The 5 geometric ops share AFFINE.
(SKIP, AFFINE, AUTOCONTRAST, EQUALIZE, INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD, COLOR,
 CONTRAST, BRIGHTNESS, SHARPNESS) = range(12)
ARG_LEN = 12  # arguments: a 2x3 matrix, a 3x3 kernel (+ its factor) or one value
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

# External-source names and dtypes, shared by the graph and the feeder.
PARAM_SPECS = {}
for _s in range(STAGES):
    PARAM_SPECS[f"ra_op{_s}"] = (np.int32, ())  # stage kind
    PARAM_SPECS[f"ra_arg{_s}"] = (np.float32, (ARG_LEN,))  # its arguments (layouts above)
del _s

# PIL's RGB -> L weights (ITU-R 601 in 16-bit fixed point); "L" rounds their sum.
LUMA = np.array([19595, 38470, 7471], np.float64) / 65536.0
# Every DALI op used here rounds to nearest when it converts to uint8, PIL's blends and
# autocontrast truncate; rounding (v - 0.5 + 1e-3) is floor(v) unless v lies within 1e-3
# below an integer (autocontrast's v = i * 255 / span never does: span <= 255).
FLOOR_SHIFT = -0.5 + 1e-3
# PIL's ImageFilter.SMOOTH, which ImageEnhance.Sharpness blends with (factor 0 = smoothed).
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13.0


def level_to_arg(op: str, level: float, sign: float = 1.0):
    """The op's argument at a clipped magnitude `level` in [0, 10] (timm's LEVEL_TO_ARG for the
    increasing ops); `sign` is the random negation of the signed ops. None: no argument."""
    f = level / MAX_LEVEL
    if op == "Rotate":
        return sign * (f * 30.0)  # degrees, counter-clockwise
    if op in ("ShearX", "ShearY"):
        return sign * (f * 0.3)
    if op in ("TranslateXRel", "TranslateYRel"):
        return sign * (f * 0.45)  # fraction of the frame's width / height
    if op in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing"):
        return max(0.1, 1.0 + sign * (f * 0.9))  # enhance factor, 1 = unchanged
    if op == "PosterizeIncreasing":
        return 4 - int(f * 4)  # bits kept
    if op == "SolarizeIncreasing":
        return 256 - min(256, int(f * 256))  # pixels >= threshold are inverted
    if op == "SolarizeAdd":
        return min(128, int(f * 110))  # added to pixels below 128
    return None


def draw_ops(rng: np.random.Generator, n: int, magnitude: float,
             magnitude_std: float) -> list:
    """One clip's RandAugment plan: n entries, (op name, argument) or None where the op drawn
    for that slot is not applied. Same distribution as timm's RandAugment.__call__ with
    AugmentOp(prob=0.5, magnitude_std=magnitude_std)."""
    plan = []
    for _ in range(n):
        op = OPS[int(rng.integers(len(OPS)))]
        if rng.random() >= PROB:
            plan.append(None)
            continue
        if magnitude_std == float("inf"):  # timm: mstd > 100 means uniform in [0, m]
            m = rng.uniform(0.0, magnitude)
        elif magnitude_std > 0:
            m = rng.normal(magnitude, magnitude_std)
        else:
            m = magnitude
        level = min(max(float(m), 0.0), MAX_LEVEL)
        sign = -1.0 if rng.random() < 0.5 else 1.0
        plan.append((op, level_to_arg(op, level, sign)))
    return plan


def identity_params() -> dict:
    return {name: np.zeros(shape, dt) for name, (dt, shape) in PARAM_SPECS.items()}


def draw_rand_augment(rng: np.random.Generator, n: int, magnitude: float, magnitude_std: float,
                      size: int, frame_hw: tuple | None = None, roi: tuple | None = None) -> dict:
    """Graph parameters of one clip's RandAugment (`draw_ops`, then `stage_params` per slot).

    size: the square crop side. frame_hw: (H, W) of the frame the crop is taken from, roi:
    ((y0, x0), (y1, x1)) the crop window relative to that frame; both None when the crop is
    the whole frame. Stages past n are SKIP.
    """
    if n > STAGES:
        raise ValueError(f"rand_aug_n={n} > {STAGES}: the graph has {STAGES} RandAugment "
                         "stages (randaug.STAGES)")
    p = identity_params()
    for s, entry in enumerate(draw_ops(rng, n, magnitude, magnitude_std)):
        if entry is not None:
            kind, arg = stage_params(*entry, size, frame_hw, roi)
            p[f"ra_op{s}"] = np.array(kind, np.int32)
            p[f"ra_arg{s}"] = arg
    return p


def crop_map(size: int, frame_hw, roi) -> np.ndarray:
    """3x3 map of continuous crop-pixel coordinates (x, y, 1) to frame pixels (DALI's resize
    and PIL's transform both sample output pixel i at i + 0.5 of this continuous scale)."""
    if frame_hw is None:
        return np.eye(3)
    (h, w), ((y0, x0), (y1, x1)) = frame_hw, roi
    return np.array([[(x1 - x0) * w / size, 0, x0 * w],
                     [0, (y1 - y0) * h / size, y0 * h],
                     [0, 0, 1]], np.float64)


def frame_affine(op: str, arg: float, frame_hw: tuple) -> np.ndarray:
    """3x3 inverse map (output -> input pixel, continuous coordinates) of a geometric op on an
    H x W frame, as PIL's Image.transform / Image.rotate apply it in timm's op functions."""
    h, w = frame_hw
    m = np.eye(3)
    if op == "ShearX":
        m[0, 1] = arg
    elif op == "ShearY":
        m[1, 0] = arg
    elif op == "TranslateXRel":
        m[0, 2] = arg * w
    elif op == "TranslateYRel":
        m[1, 2] = arg * h
    elif op == "Rotate":
        # Counter-clockwise by `arg` degrees about the frame centre.
        a = math.radians(arg)
        c, s = math.cos(a), math.sin(a)
        cx, cy = w / 2.0, h / 2.0
        m[:2, :2] = [[c, -s], [s, c]]
        m[:2, 2] = [cx - c * cx + s * cy, cy - s * cx - c * cy]
    else:
        raise ValueError(op)
    return m


def stage_params(op: str, arg, size: int, frame_hw: tuple | None = None,
                 roi: tuple | None = None) -> tuple:
    """(stage kind, float32 argument vector (ARG_LEN,)) of one applied op on a size x size
    crop; frame_hw and roi as in `draw_rand_augment`."""
    v = np.zeros(ARG_LEN, np.float32)
    if op in GEOMETRIC:
        # Built on the frame, seen through the crop window: crop -> frame -> op -> crop.
        c = crop_map(size, frame_hw, roi)
        m = frame_affine(op, arg, frame_hw if frame_hw is not None else (size, size))
        v[:6] = (np.linalg.inv(c) @ m @ c)[:2].ravel()
        return AFFINE, v
    if op == "AutoContrast":
        return AUTOCONTRAST, v
    if op == "Equalize":
        return EQUALIZE, v
    if op == "Invert":
        return INVERT, v
    if op == "PosterizeIncreasing":
        if arg >= 8:
            return SKIP, v
        # Keep the top `arg` bits. 0 bits (magnitude 10 only) gives black, as older Pillow
        # did; Pillow 13's posterize refuses bits=0.
        v[0] = (0xFF << (8 - arg)) & 0xFF
        return POSTERIZE, v
    if op == "SolarizeIncreasing":
        if arg >= 256:
            return SKIP, v
        v[0] = arg
        return SOLARIZE, v
    if op == "SolarizeAdd":
        v[0] = arg
        return (SOLARIZE_ADD if arg > 0 else SKIP), v
    if op == "ColorIncreasing":
        v[0] = arg
        return COLOR, v
    if op == "ContrastIncreasing":
        v[0] = arg
        return CONTRAST, v
    if op == "BrightnessIncreasing":
        v[0] = arg
        return BRIGHTNESS, v
    if op == "SharpnessIncreasing":
        ident = np.zeros((3, 3))
        ident[1, 1] = 1.0
        v[:9] = (arg * ident + (1.0 - arg) * SMOOTH).ravel()
        v[9] = arg  # the factor itself, for the torch peer
        return SHARPNESS, v
    raise ValueError(op)


# ----------------------------------------------------------------------------------- DALI ---

def dali_param_inputs(rename=None) -> dict:
    """One external_source per parameter (CPU, per-sample), keyed by the plain name; `rename`
    gives the input's graph name (one set per augmented copy)."""
    from nvidia.dali import fn
    return {name: fn.external_source(name=rename(name) if rename else name,
                                     dtype=_dali_dtype(dt), ndim=len(shape))
            for name, (dt, shape) in PARAM_SPECS.items()}


def _dali_dtype(dt):
    from nvidia.dali import types
    return {np.float32: types.FLOAT, np.int32: types.INT32, np.uint8: types.UINT8}[dt]


def apply_dali(x, p: dict, on_gpu: bool, geom_interp: str = "linear"):
    """RandAugment on uint8 FHWC clips x (F, S, S, 3) -> same shape and type: STAGES stages in
    the drawn order. Needs a pipeline with enable_conditionals=True; conditions and named
    arguments stay on the CPU, operands of arithmetic go to the data's device."""
    for s in range(STAGES):
        x = _stage_dali(x, p[f"ra_op{s}"], p[f"ra_arg{s}"], on_gpu, geom_interp)
    return x


def _stage_dali(x, op, arg, on_gpu: bool, geom_interp: str):
    """One stage: the branch of its kind runs on the clips that drew it (SKIP: unchanged)."""
    from nvidia.dali import fn, types

    def dev(node):
        return node.gpu() if on_gpu else node

    u8 = types.Constant(255, dtype=types.UINT8)
    if op == AFFINE:
        x = fn.warp_affine(x, matrix=fn.reshape(arg[0:6], shape=[2, 3]), fill_value=FILL,
                           interp_type=types.INTERP_NN if geom_interp == "nn"
                           else types.INTERP_LINEAR)
    elif op == AUTOCONTRAST:
        x = _autocontrast(x, on_gpu)
    elif op == EQUALIZE:
        x = _equalize(x, on_gpu)
    elif op == INVERT:
        x = x ^ u8  # 255 - x for uint8, no casts
    elif op == POSTERIZE:
        x = x & dev(fn.cast(arg[0], dtype=types.UINT8))
    elif op == SOLARIZE:
        x = x ^ ((x >= dev(fn.cast(arg[0], dtype=types.UINT8))) * u8)
    elif op == SOLARIZE_ADD:
        # x < 128 plus at most 110: no overflow, as PIL's min(255, x + add) never clips here.
        x = x + (x < types.Constant(128, dtype=types.UINT8)) * dev(
            fn.cast(arg[0], dtype=types.UINT8))
    elif op == COLOR:
        x = _color(x, arg[0], on_gpu)
    elif op == CONTRAST:
        x = _contrast(x, arg[0], on_gpu)
    elif op == BRIGHTNESS:
        x = fn.brightness_contrast(x, brightness=arg[0], brightness_shift=FLOOR_SHIFT / 255.0)
    elif op == SHARPNESS:
        # One 3x3 pass: the blend of x with its smoothed version folded into the kernel.
        x = fn.filter(x, dev(fn.reshape(arg[0:9], shape=[3, 3])), border="clamp")
    return x


def _color(x, factor, on_gpu: bool):
    """PIL's Color: blend each pixel with its grey value L (rounded luma, as PIL's "L"):
    floor(f x + (1 - f) L), in 16-bit fixed point on int32 (an error under 0.004 levels)."""
    from nvidia.dali import fn, types

    grey = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
    k = fn.cast(factor * float(1 << 16) + 0.5, dtype=types.INT32)
    if on_gpu:
        k = k.gpu()
    # Integer arithmetic: 10-11 ms a 16x224x224 clip on 2 cores, against 12-13 for
    # fn.normalize with a per-pixel mean (float -> uint8 is DALI's slow conversion).
    return fn.cast((x * k + grey * ((1 << 16) - k)) // (1 << 16), dtype=types.UINT8)


def _contrast(x, factor, on_gpu: bool):
    """PIL's Contrast per frame: blend toward the frame's mean luma, rounded to an integer."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    luma = types.Constant(LUMA.astype(np.float32))
    mean = fn.reductions.mean(x, axis_names="HW")  # (F, 3)
    centre = dmath.floor(fn.reductions.sum(mean * luma, axis_names="C") + 0.5)  # (F,)
    if not on_gpu:
        return fn.brightness_contrast(x, contrast=factor, contrast_center=fn.per_frame(centre),
                                      brightness_shift=FLOOR_SHIFT / 255.0)
    # Argument inputs must live on the CPU, the centre is computed on the GPU: arithmetic.
    c = fn.reshape(centre, shape=[-1, 1, 1, 1])  # (F, 1, 1, 1)
    f = factor.gpu()
    return fn.cast(c + (x - c) * f + FLOOR_SHIFT, dtype=types.UINT8)


def _autocontrast(x, on_gpu: bool):
    """PIL's autocontrast per frame and channel: the range [lo, hi] stretched to [0, 255],
    truncated; flat channels (lo == hi) unchanged."""
    from nvidia.dali import fn, types

    lo = fn.cast(fn.reductions.min(x, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    hi = fn.cast(fn.reductions.max(x, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    span = hi - lo  # (F, 1, 1, 3)
    flat = span == 0.0
    sd = (span + flat * 255.0) / 255.0
    mean = lo * (1.0 - flat)
    if not on_gpu:
        # fn.normalize computes (x - mean) / stddev + shift straight to uint8: faster on the
        # CPU than arithmetic, whose float -> uint8 cast is the slow part.
        return fn.normalize(x, axis_names="HW", mean=mean, stddev=sd, shift=FLOOR_SHIFT,
                            dtype=types.UINT8)
    return fn.cast((x - mean) / sd + FLOOR_SHIFT, dtype=types.UINT8)


def _equalize(x, on_gpu: bool):
    """PIL's equalize per frame and channel from DALI's fn.equalize (which follows OpenCV).

    PIL: lut[i] = (step // 2 + E(i)) // step, E(i) = pixels below i, step = D // 255, D =
    pixels below the top level; identity when step == 0 (this includes flat channels).
    OpenCV's formula run on the inverted image gives z = 255 - round(255 E(i) / D) (D and E
    as PIL counts them), so with w = 255 - z, floor(w D / (255 step) + (step // 2) / step)
    is PIL's lut to within one level (the rounding of w)."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    u8 = types.Constant(255, dtype=types.UINT8)
    z = fn.equalize(x ^ u8)  # 255 - round(255 E / D); 255 - x where the channel is flat
    top = fn.reductions.max(x, axis_names="HW", keep_dims=True)
    below = (x < top) * types.Constant(1, dtype=types.UINT8)
    d = fn.reductions.sum(below, axis_names="HW", keep_dims=True, dtype=types.FLOAT)  # (F,1,1,3)
    step = dmath.floor(d / 255.0)
    ok = step > 0.0
    st = step + (1.0 - ok)  # no division by 0 where step == 0 (the result is unused there)
    a = d / (255.0 * st) * ok + (1.0 - ok)  # w -> a w + b: identity on w where not ok ...
    b = dmath.floor(st / 2.0) / st * ok
    # ... which is x for flat channels (D == 0); for 0 < D < 255 PIL keeps x, w does not.
    keep = (d > 0.0) & (step == 0.0)
    if on_gpu:
        # Statistics are GPU tensors here: no argument inputs, no data-dependent `if`.
        y = fn.cast((u8 - z) * a + (b + FLOOR_SHIFT), dtype=types.UINT8)
        return y ^ ((y ^ x) & (fn.cast(keep, dtype=types.UINT8) * u8))
    # y = floor(a (255 - z) + b) as fn.normalize's (z - mean) / stddev * scale + shift,
    # straight to uint8 (the float -> uint8 cast of arithmetic is slow on the CPU).
    y = fn.normalize(z, axis_names="HW", mean=255.0 + b / a, stddev=1.0 / a, scale=-1.0,
                     shift=FLOOR_SHIFT, dtype=types.UINT8)
    if fn.reductions.max(fn.cast(keep, dtype=types.UINT8)) > 0:  # rare: skip the pass
        y = y ^ ((y ^ x) & (fn.cast(keep, dtype=types.UINT8) * u8))
    return y


# ---------------------------------------------------------------------------------- torch ---

def apply_torch(x, p: dict, geom_interp: str = "linear"):
    """The same stages on a float tensor x (T, 3, S, S) of integers in 0..255 (the throughput
    peer); the result is integer-valued too. Point and colour ops follow PIL exactly."""
    for s in range(STAGES):
        x = _stage_torch(x, int(p[f"ra_op{s}"]), np.asarray(p[f"ra_arg{s}"], np.float64),
                         geom_interp)
    return x


def _stage_torch(x, kind: int, arg: np.ndarray, geom_interp: str):
    import torch
    import torch.nn.functional as F

    if kind == SKIP:
        return x
    if kind == AFFINE and geom_interp == "nn":
        return _nearest_torch(x, arg[:6].reshape(2, 3))
    if kind == AFFINE:
        t, _, h, w = x.shape
        inv = np.vstack([arg[:6].reshape(2, 3), [0, 0, 1]])  # output pixel -> source pixel
        # Continuous pixel coordinates to grid_sample's [-1, 1] (align_corners=False).
        to_n = np.array([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
        theta = to_n @ inv @ np.linalg.inv(to_n)
        theta = torch.tensor(theta[:2], dtype=x.dtype).expand(t, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Zero padding around x - FILL: uncovered pixels get FILL (blended at edges, as DALI).
        x = F.grid_sample(x - FILL, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False) + FILL
        return x.round().clamp(0, 255)
    if kind == AUTOCONTRAST:
        lo = x.amin(dim=(2, 3), keepdim=True)  # (T, 3, 1, 1): per frame and channel
        hi = x.amax(dim=(2, 3), keepdim=True)
        span = hi - lo
        y = torch.floor((x - lo) * 255.0 / span.clamp_min(1.0))
        return torch.where(span > 0, y, x)
    if kind == EQUALIZE:
        return _equalize_torch(x)
    if kind == INVERT:
        return 255.0 - x
    if kind == POSTERIZE:
        return (x.to(torch.uint8) & int(arg[0])).to(x.dtype)
    if kind == SOLARIZE:
        return torch.where(x >= float(arg[0]), 255.0 - x, x)
    if kind == SOLARIZE_ADD:
        return torch.where(x < 128, (x + float(arg[0])).clamp_max(255), x)
    if kind == COLOR:
        return _blend(_luma(x), x, float(arg[0]))
    if kind == CONTRAST:
        # PIL: int(mean of the frame's "L" image + 0.5)
        centre = torch.floor(_luma(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)  # (T,1,1,1)
        return _blend(centre, x, float(arg[0]))
    if kind == BRIGHTNESS:
        return _blend(torch.zeros_like(x[:, :1]), x, float(arg[0]))
    if kind == SHARPNESS:
        # PIL: blend with SMOOTH(x), rounded, whose 1-pixel border is x itself.
        k = torch.tensor(SMOOTH, dtype=x.dtype).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        smooth = x.clone()
        smooth[:, :, 1:-1, 1:-1] = torch.floor(F.conv2d(x, k, groups=3) + 0.5)
        return _blend(smooth, x, float(arg[9]))
    raise ValueError(kind)


def _nearest_torch(x, inv: np.ndarray):
    """Nearest-neighbour affine warp of x (T, 3, H, W) by the inverse map `inv` (2, 3), as PIL
    and DALI sample: output pixel centre (i + 0.5) -> source coordinate -> floor. grid_sample
    rounds half to even instead, which on shears picks the other pixel at every tie."""
    import torch
    t, c, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5,
                            torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
    sx = torch.floor(inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]).long()  # (H, W)
    sy = torch.floor(inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]).long()
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    src = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).view(-1)
    y = x.reshape(t, c, h * w)[:, :, src].view(t, c, h, w)
    return torch.where(inside, y, torch.full_like(y, FILL))


def _luma(x):
    """PIL's "L" of RGB x (T, 3, H, W): rounded 16-bit fixed point -> (T, 1, H, W)."""
    import torch
    w = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)
    return ((x.to(torch.int32) * w).sum(dim=1, keepdim=True) + 32768).div(
        65536, rounding_mode="floor").to(x.dtype)


def _blend(degenerate, x, factor: float):
    """PIL's Image.blend(degenerate, x, factor): degenerate + factor (x - degenerate),
    truncated and clipped to uint8."""
    import torch
    return torch.floor(degenerate + factor * (x - degenerate)).clamp(0, 255)


def _equalize_torch(x):
    """PIL's ImageOps.equalize per frame and channel of x (T, 3, H, W)."""
    import torch
    t, c, h, w = x.shape
    idx = x.to(torch.int64).reshape(t * c, h * w)
    hist = torch.zeros(t * c, 256, dtype=torch.int64).scatter_add_(
        1, idx, torch.ones_like(idx))  # (T*3, 256)
    levels = torch.arange(256)
    top = torch.where(hist > 0, levels, -1).amax(dim=1)  # highest level present
    below = h * w - hist.gather(1, top[:, None])[:, 0]  # D: pixels under the top level
    step = below // 255
    before = torch.cumsum(hist, dim=1) - hist  # E(i): pixels below level i
    safe = step.clamp_min(1)[:, None]
    lut = ((safe // 2 + before) // safe).clamp_max(255)
    # step == 0 also covers a single level (D == 0): PIL returns the channel unchanged.
    lut = torch.where(step[:, None] > 0, lut, levels)
    return lut.gather(1, idx).view(t, c, h, w).to(x.dtype)
