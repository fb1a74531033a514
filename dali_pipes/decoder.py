"""Decode and augment a list of samples: NVDEC or DALI's CPU decoder where they can read the
file, the PyAV fallback (frames then go through the same DALI augmentation graph) elsewhere.

Faults: a sample's error is returned for the loader to quarantine only when it follows the file
(it fails alone, again, in a fresh pipeline, while a file that decoded before still decodes);
errors of the machine raise InfrastructureError (dali_pipes/faults.py). Timeouts are retried
once before they count against a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from dali_pipes import pipeline as P
from dali_pipes import routing
from dali_pipes.decode_av import DecodeError, DecodeTimeout, FallbackPool
from dali_pipes.faults import InfrastructureError, raise_if_infrastructure, short_error


@dataclass
class Item:
    """One sample: which video, which frames, which augmentation, and its file's data."""
    dataset: int
    video: int
    sample_id: int
    record: dict
    indices: np.ndarray  # (T,) or (t*T,) int32 frame indices of the output clip(s)
    params: dict  # named per-sample graph inputs
    attempt: int = 0  # replacement attempt that chose this video (0: the sampler's own)
    encoded: Optional[np.ndarray] = None  # file bytes for DALI's decoder
    frames: Optional[np.ndarray] = None  # (U, H, W, 3) uint8 from the PyAV fallback
    error: Optional[str] = None  # read error, reported by Decoder.run
    unique: np.ndarray = field(init=False)  # (U,) int32 sorted distinct frame indices
    order: np.ndarray = field(init=False)  # (T,) int32 position of each output frame in unique

    def __post_init__(self):
        self.unique, self.order = P.dedup_indices(self.indices)

    @property
    def path(self) -> str:
        return self.record["path"]


def resolve_decode_device(cfg, device: torch.device) -> str:
    """"mixed" (NVDEC) or "cpu" for cfg.data.decode_device on the training device."""
    choice = cfg.data.decode_device
    if choice == "gpu" or (choice == "auto" and device.type == "cuda"):
        if not torch.cuda.is_available():
            raise InfrastructureError("data.decode_device=gpu asks for NVDEC but CUDA is "
                                      "unavailable; use data.decode_device=cpu or auto")
        return "mixed"
    return "cpu"


def gpu_formats(device_index: int) -> dict:
    """What this GPU's NVDEC decodes, asked of the driver; a missing libnvcuvid stops the run."""
    from dali_pipes import nvdec
    try:
        return nvdec.supported_formats(device_index)
    except nvdec.NvdecUnavailable as exc:
        raise InfrastructureError(f"NVDEC is unusable on GPU {device_index}: {exc}") from exc


class Decoder:
    """Runs Items through the DALI bytes graph or the PyAV fallback + frames graph."""

    def __init__(self, cfg, mode: str, crop_size: int, device: torch.device, batch_size: int,
                 num_spatial: int = 1):
        self.device = device
        self.decode_device = resolve_decode_device(cfg, device)
        self.geom_interp = P.default_geom_interp(self.decode_device)
        device_id = None
        self.nvdec_formats = None
        if self.decode_device == "mixed":
            device_id = device.index if device.index is not None else torch.cuda.current_device()
            self.nvdec_formats = gpu_formats(device_id)
        self._specs = {src: P.GraphSpec(
            mode, src, self.decode_device, crop_size, tuple(cfg.data.mean), tuple(cfg.data.std),
            rand_aug=cfg.data.rand_aug_n > 0, num_spatial=num_spatial,
            num_sample=cfg.data.num_sample if mode == P.TRAIN else 1,
            test_scale=cfg.data.test_scale, geom_interp=self.geom_interp)
            for src in (P.BYTES, P.FRAMES)}
        self._runner_args = (batch_size, max(1, cfg.data.num_threads), device_id, cfg.train.seed)
        self._runners: dict = {}
        self._canary: dict = {}  # source -> an Item that decoded: tells machine from file faults
        self.pool = FallbackPool(cfg.data.fallback_workers, cfg.data.decode_timeout)

    def route(self, record: dict) -> tuple[str, str]:
        return routing.route(record["probe"], self.decode_device, self.nvdec_formats)

    def uses_fallback(self, item: Item) -> bool:
        return self.route(item.record)[0] == routing.PYAV

    def _runner(self, source: str) -> P.GraphRunner:
        # Built lazily: a run whose files all suit DALI never builds the frames graph.
        if source not in self._runners:
            self._runners[source] = P.GraphRunner(self._specs[source], *self._runner_args)
        return self._runners[source]

    # ------------------------------------------------------------------------ reading ---
    def read(self, items: list[Item]) -> None:
        """Reads the bytes of DALI-routed items that lack them, in parallel, each bounded by
        data.decode_timeout; a failure is kept in item.error (a timeout is read again first)."""
        todo = [it for it in items if it.encoded is None and it.error is None
                and not self.uses_fallback(it)]
        futures = [self.pool.submit_read(it.path) for it in todo]
        for it, fut in zip(todo, futures):
            it.encoded, it.error = self._collect(fut, it, lambda i=it: self.pool.submit_read(i.path))

    def _collect(self, future, item: Item, resubmit) -> tuple[Optional[np.ndarray], Optional[str]]:
        """(value, None) or (None, reason) of a pool job; a timeout gets one more try."""
        for tries_left in (1, 0):
            try:
                return self.pool.result(future, item.path), None
            except DecodeTimeout as exc:
                if not tries_left:
                    return None, exc.reason
                future = resubmit()
            except DecodeError as exc:
                return None, exc.reason
            except Exception as exc:  # noqa: BLE001 - classified: the machine's or the file's
                raise_if_infrastructure(exc, f"{item.path}: ")
                return None, short_error(exc)
        return None, "unreachable"

    # ----------------------------------------------------------------------- decoding ---
    def run(self, items: list[Item]) -> tuple[list, list]:
        """(outputs, errors): per item a tensor (its graph output) or None + reason."""
        self.read(items)
        outs: list = [None] * len(items)
        errs: list = [it.error for it in items]
        pending = [i for i in range(len(items)) if errs[i] is None]
        fallback = {i for i in pending if self.uses_fallback(items[i])}  # routed once per item
        fb = [i for i in pending if i in fallback]
        dali = [i for i in pending if i not in fallback]
        futures = [self._submit_frames(items[i]) for i in fb]  # decode while DALI runs
        self._run_graph(P.BYTES, dali, items, outs, errs)
        ok = []
        for i, fut in zip(fb, futures):
            items[i].frames, errs[i] = self._collect(fut, items[i],
                                                     lambda it=items[i]: self._submit_frames(it))
            if errs[i] is None:
                ok.append(i)
        self._run_graph(P.FRAMES, ok, items, outs, errs)
        return outs, errs

    def _submit_frames(self, it: Item):
        probe = it.record["probe"]
        return self.pool.submit(it.path, it.unique, int(probe.get("stream_index", 0) or 0),
                                int(probe.get("rotation", 0) or 0))

    def _run_graph(self, source: str, positions: list, items: list, outs: list, errs: list):
        if not positions:
            return
        runner = self._runner(source)
        batch_items = [items[i] for i in positions]
        try:
            batch = runner.run(self._inputs(source, batch_items))
        except Exception as exc:  # noqa: BLE001 - DALI fails the whole batch; find the culprits
            raise_if_infrastructure(exc, f"{source} graph: ")
        else:
            for k, pos in enumerate(positions):
                outs[pos] = batch[k]
            self._canary[source] = batch_items[0]
            return
        failed = {}
        for pos in positions:
            outs[pos], reason = self._alone(runner, source, items[pos])
            if reason is not None:
                failed[pos] = reason
        if failed:
            self._confirm_file_faults(runner, source, [items[p] for p in failed], failed)
        for pos, reason in failed.items():
            errs[pos] = reason

    def _alone(self, runner, source: str, item: Item):
        """(output, None), or (None, reason) when the item fails alone twice (each run after a
        failure is in a rebuilt pipeline)."""
        reason = None
        for _ in range(2):
            try:
                out = runner.run(self._inputs(source, [item]))[0]
            except Exception as exc:  # noqa: BLE001
                raise_if_infrastructure(exc, f"{item.path}: ")
                reason = short_error(exc)
                continue
            self._canary[source] = item
            return out, None
        return None, reason

    def _confirm_file_faults(self, runner, source: str, failed: list, reasons: dict) -> None:
        """A file that decoded before must still decode; if not, the machine is at fault."""
        canary = self._canary.get(source)
        if canary is None or any(canary is it for it in failed):
            return
        try:
            runner.run(self._inputs(source, [canary]))
        except Exception as exc:  # noqa: BLE001
            raise InfrastructureError(
                f"the {source} decoder now also fails on {canary.path}, which it decoded before "
                f"({short_error(exc)}; the batch's files failed with "
                f"{next(iter(reasons.values()))}): the fault is the machine's, not the files'. "
                "Fix: restart the run; if it recurs, run `python -m dali_pipes.doctor --cfg "
                "<config>`") from exc

    def _inputs(self, source: str, items: list[Item]) -> dict:
        if source == P.BYTES:
            inputs = {"encoded": [it.encoded for it in items], "indices": [it.unique for it in items]}
        else:
            inputs = {"frames": [it.frames for it in items]}
        inputs.update(P.order_inputs([it.order for it in items]))
        for it in items:
            for name, value in it.params.items():
                inputs.setdefault(name, []).append(value)
        return inputs

    def close(self) -> None:
        self.pool.close()
        self._runners.clear()
        self._canary.clear()


def stack_samples(xs: list) -> torch.Tensor:
    """torch.stack, skipped when xs are already the rows of one batch tensor in order (the
    usual all-DALI batch): a (B, 3, T, 224, 224) float copy costs ~10% of CPU throughput."""
    base = xs[0]._base
    if base is not None and base.shape[0] == len(xs) and base.is_contiguous() and all(
            x._base is base and x.data_ptr() == base[i].data_ptr() for i, x in enumerate(xs)):
        return base
    return torch.stack(xs)
