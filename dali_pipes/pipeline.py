"""DALI graphs of the training and evaluation data path.

One builder makes every graph: mode "train" (random crop window resize, flip, RandAugment,
normalise) or "eval" (short side to test_scale, spatial crops of decoded clip unions), fed
either with encoded bytes decoded by `fn.decoders.video` (source "bytes") or with frames the
PyAV fallback decoded (source "frames"), so augmentation code exists once.

All randomness comes from Python (`draw_train_params`) through `fn.external_source`, so a
clip is a pure function of (seed, epoch, sample id) and resumed runs replay exactly.
"""
from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from dali_pipes import randaug

TRAIN, EVAL = "train", "eval"
BYTES, FRAMES = "bytes", "frames"


@dataclass(frozen=True)
class GraphSpec:
    mode: str  # TRAIN or EVAL
    source: str  # BYTES or FRAMES
    decode_device: str  # "cpu" or "mixed" (NVDEC); augmentation runs where decoding outputs
    crop_size: int
    mean: tuple
    std: tuple
    rand_aug: bool = True  # train only: graph contains the RandAugment branches
    num_sample: int = 1  # train only: augmented copies of each decoded clip (data.num_sample)
    num_spatial: int = 1  # eval only: crops per decoded clip union
    test_scale: int = 256  # eval only: short side before the crops
    # Resampling of RandAugment's geometric ops. DALI 2.4's CPU warp_affine is ~6x slower
    # bilinear than nearest (15 vs 95 clips/s of 16x224x224 on 2 cores), so CPU graphs use
    # nearest by default and GPU graphs bilinear (see default_geom_interp).
    geom_interp: str = "linear"

    @property
    def on_gpu(self) -> bool:
        return self.decode_device == "mixed"


def default_geom_interp(decode_device: str) -> str:
    return "linear" if decode_device == "mixed" else "nn"


# ------------------------------------------------------------------ per-sample parameters ---

def dedup_indices(indices) -> tuple[np.ndarray, np.ndarray]:
    """(unique, order) int32: the sorted distinct frames to decode, and for each output frame
    its position among them (the graphs' "indices"/"frames" and "order" inputs)."""
    unique, order = np.unique(np.asarray(indices), return_inverse=True)
    return unique.astype(np.int32), order.reshape(-1).astype(np.int32)


def copy_name(name: str, copy: int) -> str:
    """Graph input name of per-sample parameter `name` for augmented copy `copy` (repeated
    augmentation: copy 0 keeps the plain name)."""
    return name if copy == 0 else f"{name}@{copy}"


def split_copy(name: str) -> tuple[str, int]:
    """copy_name's inverse: (plain name, copy)."""
    base, _, copy = name.partition("@")
    return base, int(copy or 0)


def copy_params(params: dict, copy: int) -> dict:
    """The plain-named parameters of one augmented copy, out of a sample's inputs."""
    named = (split_copy(k) + (v,) for k, v in params.items())
    return {base: v for base, c, v in named if c == copy}


def num_copies(params: dict) -> int:
    return 1 + max((split_copy(k)[1] for k in params), default=0)


def draw_train_copies(rng: np.random.Generator, copies: int, *args, **kwargs) -> dict:
    """`copies` independent draws of draw_train_params(rng, *args, **kwargs), named by
    copy_name (the first copy draws exactly what a single clip would)."""
    params: dict = {}
    for c in range(copies):
        params.update({copy_name(k, c): v for k, v in
                       draw_train_params(rng, *args, **kwargs).items()})
    return params


def draw_train_params(rng: np.random.Generator, height: int, width: int, crop: int,
                      train_aug: str, scale: Sequence[int], rrc_area: Sequence[float],
                      flip: bool, rand_aug_n: int, rand_aug_m: float,
                      rand_aug_m_std: float, inverse_scale: bool = False) -> dict:
    """Random spatial parameters of one training clip whose frames are height x width, drawn
    as PySlowFast's spatial_sampling draws them (see _scale_crop and _rrc_box).

    The crop window is returned relative to the source frame ("roi_start"/"roi_end", (y, x)),
    so the graph resizes only the window to crop x crop: the same sampling positions as
    resizing the whole frame and cropping, at a fraction of the work (SPEC section 6).
    """
    if train_aug == "rrc":
        y0, x0, h, w = _rrc_box(rng, height, width, rrc_area)
        start = (y0 / height, x0 / width)
        end = ((y0 + h) / height, (x0 + w) / width)
    else:
        start, end = _scale_crop(rng, height, width, crop, scale, inverse_scale)
    mirror = bool(flip) and rng.random() < 0.5
    p = {"roi_start": np.asarray(start, np.float32), "roi_end": np.asarray(end, np.float32),
         "mirror": np.array(int(mirror), np.int32)}
    if rand_aug_n > 0:
        # Geometric ops are relative to the frame (as the reference augments before cropping).
        p.update(randaug.draw_rand_augment(rng, rand_aug_n, rand_aug_m, rand_aug_m_std, crop,
                                           (height, width), (start, end)))
    return p


def _scale_crop(rng, height: int, width: int, crop: int, scale, inverse: bool) -> tuple:
    """PySlowFast's random_short_side_scale_jitter + random_crop: the short side to
    round(U(min, max)) (inverse-uniform, round(1 / U(1/max, 1/min)), for SSv2), the long side
    floor(long / short * size), then an integer crop offset from numpy's randint, whose upper
    end is exclusive (the last offset is never drawn, as in the reference). A size below the
    crop is raised to it (the reference would crop less than `crop`). -> (start, end) rel."""
    lo, hi = float(scale[0]), float(scale[1])
    size = round(1.0 / rng.uniform(1.0 / hi, 1.0 / lo)) if inverse else round(rng.uniform(lo, hi))
    size = max(int(size), crop)
    if width <= height:
        rw, rh = size, int(math.floor(height / width * size))
    else:
        rh, rw = size, int(math.floor(width / height * size))
    oy = int(rng.integers(0, rh - crop)) if rh > crop else 0
    ox = int(rng.integers(0, rw - crop)) if rw > crop else 0
    return (oy / rh, ox / rw), ((oy + crop) / rh, (ox + crop) / rw)


def _rrc_box(rng, height: int, width: int, area_range, ratio=(3 / 4, 4 / 3)) -> tuple:
    """PySlowFast's _get_param_spatial_crop (torchvision's RandomResizedCrop): 10 tries of a
    box of area U(area_range) x frame and log-uniform aspect; else the central crop of the
    frame clamped to the aspect range. -> (y, x, h, w)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*area_range)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def eval_crop_positions(height: int, width: int, num_spatial: int) -> list[tuple[float, float]]:
    """Relative (y, x) crop anchors: spread along the long side (left/centre/right or
    top/centre/bottom for 3 crops), centred on the short side."""
    along = [0.5] if num_spatial == 1 else list(np.linspace(0.0, 1.0, num_spatial))
    return [(a, 0.5) if height > width else (0.5, a) for a in along]


def eval_inputs(num_spatial: int, height: int, width: int) -> dict:
    pos = eval_crop_positions(height, width, num_spatial)
    out = {}
    for k, (y, x) in enumerate(pos):
        out[f"crop_y{k}"] = np.array(y, np.float32)
        out[f"crop_x{k}"] = np.array(x, np.float32)
    return out


# ------------------------------------------------------------------------------- graphs ---

def _frames_input(spec: GraphSpec):
    """uint8 FHWC clips (F, H, W, 3) on the graph's device."""
    from nvidia.dali import fn, types

    if spec.source == BYTES:
        enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        idx = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
        # pad_mode "none": an index past the frames DALI finds (a file truncated after probing)
        # is an error that quarantines the file, never a silent black frame.
        return fn.decoders.video(enc, frames=idx, device=spec.decode_device, pad_mode="none")
    frames = fn.external_source(name="frames", dtype=types.UINT8, ndim=4, layout="FHWC")
    return frames.gpu() if spec.on_gpu else frames


def _order_inputs():
    """The "order" (F,) int32 and "repeats" () bool inputs of `_expand`."""
    from nvidia.dali import fn, types
    return (fn.external_source(name="order", dtype=types.INT32, ndim=1),
            fn.external_source(name="repeats", dtype=types.BOOL, ndim=0))


def _expand(x, order, repeats):
    """Distinct decoded frames (U, H, W, C) -> the clip's frames in order (F, H, W, C).

    Short videos repeat frame indices (a 90-frame clip sampled 32x3); DALI re-seeks for every
    repeat (16 frames + 16 repeats: 595 ms against 84 ms for 32 distinct ones), so both
    decoders produce each frame once and this gather restores the clip. Only clips with
    repeats take the gather (a per-sample branch): on the CPU it costs ~3 ms a 16x224² clip,
    15% of the graph, for nothing when every frame is distinct.
    """
    from nvidia.dali import fn

    if repeats:
        x = fn.sequence_rearrange(x, new_order=order)
    return x


def order_inputs(orders) -> dict:
    """The "order" and "repeats" inputs of clips whose output frame k is decoded frame
    orders[i][k] (from dedup_indices; an identity order for clips without repeats)."""
    orders = [np.asarray(o, np.int32) for o in orders]
    return {"order": orders,
            "repeats": [np.array(not np.array_equal(o, np.arange(len(o)))) for o in orders]}


def _normalise(x, spec: GraphSpec, **crop_args):
    """uint8 FHWC -> float32 CFHW, (x - mean) / std, optional crop and flip."""
    from nvidia.dali import fn, types
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CFHW",
                                    mean=list(spec.mean), std=list(spec.std),
                                    out_of_bounds_policy="pad", **crop_args)


def _train_graph(frames, spec: GraphSpec):
    """(3, F, crop, crop), or (S, 3, F, crop, crop) with S = spec.num_sample copies."""
    from nvidia.dali import fn

    order, repeats = _order_inputs()
    clips = [_train_copy(frames, spec, c, order, repeats) for c in range(spec.num_sample)]
    # Video-major, as PySlowFast's multiple_samples_collate orders repeated augmentations.
    return clips[0] if len(clips) == 1 else fn.stack(*clips)


def _train_copy(frames, spec: GraphSpec, copy: int, order, repeats):
    """One augmented copy of the decoded frames, from its own named parameter inputs."""
    from nvidia.dali import fn, types

    def param(name, dtype, ndim):
        return fn.external_source(name=copy_name(name, copy), dtype=dtype, ndim=ndim)

    start, end = param("roi_start", types.FLOAT, 1), param("roi_end", types.FLOAT, 1)
    mirror = param("mirror", types.INT32, 0)
    # (F, crop, crop, 3): only the crop window is resampled; one window for all frames.
    x = fn.resize(frames, size=[spec.crop_size, spec.crop_size], roi_start=start, roi_end=end,
                  roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=False)
    if spec.rand_aug:
        x = randaug.apply_dali(x, randaug.dali_param_inputs(lambda n: copy_name(n, copy)),
                               spec.on_gpu, spec.geom_interp)
    return _normalise(_expand(x, order, repeats), spec, mirror=mirror)  # (3, F, crop, crop)


def _eval_graph(frames, spec: GraphSpec):
    from nvidia.dali import fn, types

    x = _expand(fn.resize(frames, resize_shorter=spec.test_scale, interp_type=types.INTERP_LINEAR),
                *_order_inputs())
    views = []
    for k in range(spec.num_spatial):
        py = fn.external_source(name=f"crop_y{k}", dtype=types.FLOAT, ndim=0)
        px = fn.external_source(name=f"crop_x{k}", dtype=types.FLOAT, ndim=0)
        views.append(_normalise(x, spec, crop=(spec.crop_size, spec.crop_size),
                                crop_pos_x=px, crop_pos_y=py))
    return fn.stack(*views)  # (S, 3, F, crop, crop)


def build_pipeline(spec: GraphSpec, batch_size: int, num_threads: int,
                   device_id: Optional[int], seed: int = 0):
    """A built DALI pipeline for `spec`; batches of up to `batch_size` are fed by name."""
    from nvidia.dali import pipeline_def

    @pipeline_def(enable_conditionals=True)  # per-sample branches: RandAugment, _expand
    def graph():
        frames = _frames_input(spec)
        return _train_graph(frames, spec) if spec.mode == TRAIN else _eval_graph(frames, spec)

    # Depth 1: the loader feeds one batch and runs it; its own thread does the prefetching.
    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                 seed=seed, prefetch_queue_depth=1)
    pipe.build()
    return pipe


class GraphRunner:
    """Feeds named per-sample inputs into one pipeline and returns a stacked torch tensor.

    After a failed run (DALI fails the whole batch on one bad file) the pipeline is rebuilt,
    so the next batch starts from a clean executor.
    """

    POOL_SIZE = 8  # host output arrays kept for reuse (prefetch queue + consumer + spare)

    def __init__(self, spec: GraphSpec, batch_size: int, num_threads: int,
                 device_id: Optional[int], seed: int = 0):
        self.spec, self.batch_size = spec, batch_size
        self._args = (batch_size, num_threads, device_id, seed)
        self.device_id = device_id
        self.pipe = build_pipeline(spec, *self._args)
        self._pool: list = []

    def run(self, inputs: dict):
        """inputs: {name: [per-sample arrays]} (equal lengths <= batch_size) -> torch (N, ...)."""
        n = len(next(iter(inputs.values())))
        assert 0 < n <= self.batch_size, n
        try:
            for name, values in inputs.items():
                self.pipe.feed_input(name, values)
            (out,) = self.pipe.run()
        except Exception:
            self.rebuild()
            raise
        return self._to_torch(out)

    def _host_buffer(self, out) -> np.ndarray:
        """`out` (every graph ends in float32) copied into an array from a small pool. A fresh
        ~80 MB array per batch pays its page faults every time (5-7 ms a clip against under 1
        on 2 cores), so an array is filled again once nothing outside the pool refers to it
        (torch tensors made from it, and their views, hold it)."""
        tensor = out.as_tensor()
        shape = tuple(tensor.shape())
        for buf in self._pool:
            # 3 = the pool's list, `buf` and getrefcount's argument: nobody else holds it
            if buf.shape == shape and sys.getrefcount(buf) <= 3:
                break
        else:
            buf = np.empty(shape, np.float32)
            self._pool = (self._pool + [buf])[-self.POOL_SIZE:]
        tensor.copy_to_external(ctypes.c_void_p(buf.ctypes.data))
        return buf

    def rebuild(self) -> None:
        del self.pipe
        self.pipe = build_pipeline(self.spec, *self._args)

    def _to_torch(self, out):
        import torch

        if not self.spec.on_gpu:
            # A copy out of DALI's buffers, which the next run reuses.
            return torch.from_numpy(self._host_buffer(out))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = out.as_tensor()
        # The block is allocated on, and filled by, the calling thread's current stream (the
        # loader's own stream, see loader.LoaderStream): the caching allocator then reuses it
        # only for that stream, and the consumer records its own use (record_stream), so a
        # block the training step still reads is never handed to the next copy.
        stream = torch.cuda.current_stream(self.device_id)
        dst = torch.empty(tensor.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(tensor, dst, cuda_stream=stream)
        stream.synchronize()  # SYNC POINT (loader thread): DALI reuses this buffer next run
        return dst
