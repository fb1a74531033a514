"""Training and evaluation loaders: sampler -> per-sample parameters -> DALI or PyAV -> torch.

Each batch is decoded by DALI for the files its decoder reads and by the PyAV fallback for the
rest (frames then go through the same augmentation graph), then put back in sampler order.
A file that fails is quarantined (manifest dir's quarantine.jsonl, source "train") and its
slot is refilled with another video of the same dataset, chosen from (seed, epoch, sample id,
attempt), so a resumed run makes the same replacement.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from dali_pipes import pipeline as P
from dali_pipes.decode_av import DecodeError, FallbackPool, needs_fallback
from dali_pipes.sampling import (MultiDatasetSampler, clip_indices, sample_rng,
                                 test_clip_indices, uniform_indices)

MAX_REPLACEMENTS = 20  # attempts to refill one slot before the batch fails loudly


@dataclass
class Batch:
    video: torch.Tensor  # (B, 3, T, H, W) float32, normalised, on the training device
    dataset_ids: torch.Tensor  # (B,) long, index into cfg.data.datasets
    labels: torch.Tensor  # (B,) long, class index within the sample's own dataset
    sample_ids: torch.Tensor  # (B,) long, global sample id of the epoch ordering
    epoch_step: int  # step of this batch within its epoch
    wait_s: float = 0.0  # time the consumer waited for this batch (0 when prefetch kept up)


@dataclass
class EvalBatch:
    video: torch.Tensor  # (N, V, 3, T, H, W) float32, V = temporal x spatial, temporal-major
    dataset: str  # dataset name
    labels: torch.Tensor  # (N,) long
    video_ids: torch.Tensor  # (N,) long, index in the validation manifest

    def __iter__(self):  # unpacks as (video, dataset name, labels, video indices)
        return iter((self.video, self.dataset, self.labels, self.video_ids))


@dataclass
class _Item:
    dataset: int
    video: int
    sample_id: int
    record: dict
    indices: np.ndarray  # (T,) or (t*T,) int32 frame indices
    params: dict  # named per-sample graph inputs
    encoded: Optional[np.ndarray] = None  # file bytes, read ahead by the preparing thread

    def load(self) -> "_Item":
        if self.encoded is None:
            self.encoded = np.fromfile(self.record["path"], dtype=np.uint8)
        return self


def resolve_decode_device(cfg, device: torch.device) -> str:
    """"mixed" (NVDEC) or "cpu" for cfg.data.decode_device on the training device."""
    choice = cfg.data.decode_device
    if choice == "gpu" or (choice == "auto" and device.type == "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("data.decode_device asks for the GPU decoder but CUDA is unavailable")
        return "mixed"
    return "cpu"


def display_size(probe: dict) -> tuple[int, int]:
    """(height, width) of the upright frames both decoders hand to the augmentation."""
    h, w = int(probe.get("height", 0)), int(probe.get("width", 0))
    if int(probe.get("rotation", 0) or 0) % 180 == 90:
        h, w = w, h
    return h, w


def frame_bounds(record: dict) -> tuple[int, Optional[int]]:
    """[start, end) frames of an ActivityNet segment (whole video when start/end are None)."""
    fps = float(record["probe"].get("fps") or 0.0)
    if record.get("start") is None or fps <= 0:
        return 0, None
    start = int(np.floor(float(record["start"]) * fps))
    end = None if record.get("end") is None else int(np.ceil(float(record["end"]) * fps))
    return start, end


class _Decoder:
    """Runs items through the DALI bytes graph or the PyAV fallback + frames graph."""

    def __init__(self, cfg, mode: str, num_frames: int, crop_size: int, device: torch.device,
                 batch_size: int, num_spatial: int = 1):
        self.device = device
        self.decode_device = resolve_decode_device(cfg, device)
        mk = lambda source: P.GraphSpec(  # noqa: E731
            mode, source, self.decode_device, crop_size, tuple(cfg.data.mean), tuple(cfg.data.std),
            rand_aug=cfg.data.rand_aug_n > 0, num_spatial=num_spatial, test_scale=cfg.data.test_scale,
            geom_interp=self.geom_interp)
        self.geom_interp = P.default_geom_interp(self.decode_device)
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if self.decode_device == "mixed" else None
        self._specs = {P.BYTES: mk(P.BYTES), P.FRAMES: mk(P.FRAMES)}
        self._runner_args = (batch_size, max(1, cfg.data.num_threads), device_id, cfg.train.seed)
        self._runners: dict = {}
        self.pool = FallbackPool(cfg.data.fallback_workers, cfg.data.decode_timeout)

    def _runner(self, source: str) -> P.GraphRunner:
        # Built lazily: a run whose files all suit DALI never builds the frames graph.
        if source not in self._runners:
            self._runners[source] = P.GraphRunner(self._specs[source], *self._runner_args)
        return self._runners[source]

    def uses_fallback(self, item: _Item) -> bool:
        return needs_fallback(item.record["probe"], self.decode_device)

    def run(self, items: list[_Item]) -> tuple[list, list]:
        """(outputs, errors): per item a tensor (DALI output of one sample) or None + reason."""
        outs: list = [None] * len(items)
        errs: list = [None] * len(items)
        fb = [i for i, it in enumerate(items) if self.uses_fallback(it)]
        dali = [i for i in range(len(items)) if i not in set(fb)]
        jobs = [(items[i].record["path"], items[i].indices,
                 int(items[i].record["probe"].get("stream_index", 0) or 0),
                 int(items[i].record["probe"].get("rotation", 0) or 0)) for i in fb]
        futures = [self.pool.submit(*job) for job in jobs]  # decode while DALI runs
        self._run_graph(P.BYTES, [items[i] for i in dali], dali, outs, errs, self._bytes_inputs)
        frames_ok, frames = [], []
        for i, job, fut in zip(fb, jobs, futures):
            try:
                frames.append(self.pool.result(fut, job[0]))
                frames_ok.append(i)
            except DecodeError as exc:
                errs[i] = exc.reason
            except Exception as exc:  # noqa: BLE001 - any failure is the file's
                errs[i] = f"{type(exc).__name__}: {exc}"
        feed = {i: f for i, f in zip(frames_ok, frames)}
        self._run_graph(P.FRAMES, [items[i] for i in frames_ok], frames_ok, outs, errs,
                        lambda its, pos: self._frames_inputs(its, [feed[p] for p in pos]))
        return outs, errs

    def _run_graph(self, source, items, positions, outs, errs, make_inputs) -> None:
        if not items:
            return
        runner = self._runner(source)
        try:
            batch = runner.run(make_inputs(items, positions))
            for k, pos in enumerate(positions):
                outs[pos] = batch[k]
            return
        except Exception as exc:  # noqa: BLE001 - DALI fails the whole batch; find culprits
            if len(items) == 1:
                errs[positions[0]] = _short_error(exc)
                return
        for it, pos in zip(items, positions):
            try:
                outs[pos] = runner.run(make_inputs([it], [pos]))[0]
            except Exception as exc:  # noqa: BLE001
                errs[pos] = _short_error(exc)

    @staticmethod
    def _bytes_inputs(items: list[_Item], _positions) -> dict:
        inputs = {"encoded": [it.load().encoded for it in items],
                  "indices": [it.indices.astype(np.int32) for it in items]}
        return _merge_params(inputs, items)

    @staticmethod
    def _frames_inputs(items: list[_Item], frames: list) -> dict:
        return _merge_params({"frames": frames}, items)

    def close(self) -> None:
        self.pool.close()
        self._runners.clear()


def stack_samples(xs: list) -> torch.Tensor:
    """torch.stack, skipped when xs are already the rows of one batch tensor in order (the
    usual all-DALI batch): a (B, 3, T, 224, 224) float copy costs ~10% of CPU throughput."""
    base = xs[0]._base
    if base is not None and base.shape[0] == len(xs) and base.is_contiguous() and all(
            x._base is base and x.data_ptr() == base[i].data_ptr() for i, x in enumerate(xs)):
        return base
    return torch.stack(xs)


def _merge_params(inputs: dict, items: list[_Item]) -> dict:
    for it in items:
        for name, value in it.params.items():
            inputs.setdefault(name, []).append(value)
    return inputs


def _short_error(exc: BaseException) -> str:
    """The informative line of a (long, multi-line) DALI error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "rror" in ln and "Critical error" not in ln]
    text = (useful or lines or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text}"[:400]


def _load_datasets(cfg, key: str, names: Optional[list] = None):
    from dali_pipes.manifest import load_manifest

    out = []
    for ds in cfg.data.datasets:
        if names is not None and ds.name not in names:
            continue
        records, classes = load_manifest(getattr(ds, key))
        out.append((ds, records, classes))
    return out


class TrainLoader:
    """Mixed-dataset training batches; see the module docstring."""

    def __init__(self, cfg, num_frames: int, crop_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu")):
        self.cfg, self.num_frames, self.crop_size = cfg, num_frames, crop_size
        self.device = torch.device(device)
        loaded = _load_datasets(cfg, "manifest")
        self.datasets = [ds for ds, _, _ in loaded]
        self.records = [recs for _, recs, _ in loaded]
        self.names = [ds.name for ds in self.datasets]
        self.classes = {ds.name: list(c) for ds, _, c in loaded}
        self.num_classes = {name: len(c) for name, c in self.classes.items()}
        self.seed = cfg.train.seed
        self.sampler = MultiDatasetSampler([len(r) for r in self.records],
                                           [ds.weight for ds in self.datasets],
                                           cfg.data.batch_size, rank, world_size, self.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self._decoder = _Decoder(cfg, P.TRAIN, num_frames, crop_size, self.device,
                                 cfg.data.batch_size)
        self.geom_interp = self._decoder.geom_interp
        self._bad: set = self._known_bad()
        self.num_quarantined = 0
        self.last_wait_s = 0.0
        self._epoch, self._step = 0, 0  # position of the consumer (what the step has used)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------- state ---
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    def _known_bad(self) -> set:
        """(dataset, video) pairs quarantined by earlier training runs (replaced on sight, the
        same way the run that found them replaced them)."""
        import json
        bad = set()
        for d, ds in enumerate(self.datasets):
            qfile = Path(ds.manifest) / "quarantine.jsonl"
            if not qfile.is_file():
                continue
            paths = {json.loads(ln).get("path") for ln in qfile.read_text().splitlines()
                     if ln.strip() and json.loads(ln).get("source") == "train"}
            bad |= {(d, v) for v, r in enumerate(self.records[d]) if r["path"] in paths}
        return bad

    # -------------------------------------------------------------------------- samples ---
    def make_item(self, epoch: int, dataset: int, video: int, sample_id: int,
                  attempt: int = 0) -> _Item:
        """Temporal indices and augmentation parameters of one sample, from its own RNG."""
        ds, rec = self.datasets[dataset], self.records[dataset][video]
        rng = sample_rng(self.seed, epoch, sample_id, attempt)
        probe = rec["probe"]
        n = int(probe["num_frames"])
        start, end = frame_bounds(rec)
        if ds.sampling == "uniform":
            idx = uniform_indices(n, self.num_frames, rng, start, end)
        else:
            idx = clip_indices(n, self.num_frames, ds.stride, rng, start, end)
        h, w = display_size(probe)
        d = self.cfg.data
        params = P.draw_train_params(rng, h, w, self.crop_size, d.train_aug, d.train_scale,
                                     d.rrc_area, ds.flip, d.rand_aug_n, d.rand_aug_m,
                                     d.rand_aug_m_std)
        return _Item(dataset, video, sample_id, rec, idx, params)

    def _replacement(self, epoch: int, dataset: int, sample_id: int, attempt: int) -> int:
        rng = sample_rng(self.seed, epoch, sample_id, 1000 + attempt)
        size = len(self.records[dataset])
        good = [v for v in range(size) if (dataset, v) not in self._bad]
        if not good:
            raise RuntimeError(f"every video of dataset '{self.names[dataset]}' is quarantined")
        return good[int(rng.integers(len(good)))]

    def _item_avoiding_bad(self, epoch, d, v, sid, attempt=0) -> tuple[_Item, int]:
        while (d, v) in self._bad:
            attempt += 1
            v = self._replacement(epoch, d, sid, attempt)
        return self.make_item(epoch, d, v, sid, attempt), attempt

    def _quarantine(self, item: _Item, reason: str) -> None:
        from dali_pipes.manifest import append_quarantine

        with self._lock:
            if (item.dataset, item.video) in self._bad:
                return
            self._bad.add((item.dataset, item.video))
            self.num_quarantined += 1
        append_quarantine(self.datasets[item.dataset].manifest, item.record["path"], reason, "train")

    def prepare(self, epoch: int, rows: np.ndarray) -> list:
        """[(item, attempt)] of sampler rows (dataset, video, sample id), DALI's bytes read."""
        slots = [self._item_avoiding_bad(epoch, int(d), int(v), int(s)) for d, v, s in rows]
        for it, _ in slots:
            if not self._decoder.uses_fallback(it):
                it.load()
        return slots

    def build_batch(self, epoch: int, step: int, rows: np.ndarray, slots=None) -> Batch:
        """Decodes and augments one batch of sampler rows (dataset, video, sample id)."""
        slots = self.prepare(epoch, rows) if slots is None else slots
        # A file quarantined after this batch was prepared is replaced as prepare would have.
        slots = [self._item_avoiding_bad(epoch, it.dataset, it.video, it.sample_id, a)
                 if (it.dataset, it.video) in self._bad else (it, a) for it, a in slots]
        items = [it for it, _ in slots]
        attempts = [a for _, a in slots]
        videos: list = [None] * len(items)
        todo = list(range(len(items)))
        for _ in range(MAX_REPLACEMENTS + 1):
            outs, errs = self._decoder.run([items[i] for i in todo])
            retry = []
            for i, out, err in zip(todo, outs, errs):
                if err is None:
                    videos[i] = out
                    continue
                self._quarantine(items[i], err)
                it = items[i]
                items[i], attempts[i] = self._item_avoiding_bad(epoch, it.dataset, it.video,
                                                                it.sample_id, attempts[i])
                retry.append(i)
            if not retry:
                break
            todo = retry
        else:
            raise RuntimeError(f"batch {step} of epoch {epoch}: {MAX_REPLACEMENTS} replacement "
                               "videos failed in a row; check the manifests")
        video = stack_samples(videos)  # (B, 3, T, crop, crop)
        if video.device != self.device:
            video = video.pin_memory().to(self.device, non_blocking=True) \
                if self.device.type == "cuda" else video.to(self.device)
        return Batch(video=video,
                     dataset_ids=torch.tensor([it.dataset for it in items], dtype=torch.long),
                     labels=torch.tensor([int(it.record["label"]) for it in items], dtype=torch.long),
                     sample_ids=torch.tensor([it.sample_id for it in items], dtype=torch.long),
                     epoch_step=step)

    # ---------------------------------------------------------------------- iteration ---
    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Batches of `epoch`, from the restored step when resuming that epoch."""
        start = self._step if epoch == self._epoch else 0
        self._epoch, self._step = epoch, start
        self.sampler.load_state_dict({"epoch": epoch, "step": start})
        q: queue.Queue = queue.Queue(maxsize=max(1, self.cfg.data.prefetch))
        prepared: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(target: queue.Queue, value) -> bool:
            while not stop.is_set():
                try:
                    target.put(value, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        # Two stages so that parameter drawing and file reading for batch k+1 (Python) overlap
        # DALI's run of batch k (which releases the GIL).
        def prepare():
            try:
                for step, rows in self.sampler.iter_epoch(epoch):
                    if not put(prepared, (step, rows, self.prepare(epoch, rows))):
                        return
                put(prepared, None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                put(prepared, exc)

        def produce():
            while not stop.is_set():
                try:
                    job = prepared.get(timeout=0.1)
                except queue.Empty:
                    continue
                if job is None or isinstance(job, BaseException):
                    put(q, job)
                    return
                try:
                    batch = self.build_batch(epoch, job[0], job[1], job[2])
                except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                    put(q, exc)
                    return
                if not put(q, batch):
                    return

        threads = [threading.Thread(target=f, name=f"train-loader-{f.__name__}", daemon=True)
                   for f in (prepare, produce)]
        for t in threads:
            t.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                wait = time.perf_counter() - t0
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                item.wait_s = self.last_wait_s = wait
                self._step = item.epoch_step + 1
                yield item
        finally:
            stop.set()
            for t in threads:
                while t.is_alive():
                    try:  # unblock a producer waiting on a queue
                        prepared.get_nowait()
                    except queue.Empty:
                        pass
                    t.join(timeout=0.05)
            if self._step >= self.steps_per_epoch:
                self._epoch, self._step = epoch + 1, 0

    def close(self) -> None:
        self._decoder.close()


class EvalLoader:
    """Every video of one dataset's validation manifest once (sharded over ranks), as all its
    test views: yields EvalBatch (video (N, V, 3, T, crop, crop), dataset name, labels (N,),
    video indices (N,)), which also unpacks as that tuple; V = temporal x spatial views in
    temporal-major order."""

    def __init__(self, cfg, dataset_name: str, num_frames: int, crop_size: int, rank: int = 0,
                 world_size: int = 1, device: torch.device = torch.device("cpu")):
        ((ds, records, classes),) = _load_datasets(cfg, "val_manifest", [dataset_name])
        self.cfg, self.ds, self.records, self.classes = cfg, ds, records, list(classes)
        self.name, self.num_frames, self.crop_size = ds.name, num_frames, crop_size
        self.temporal, self.spatial = int(ds.test_views[0]), int(ds.test_views[1])
        self.device = torch.device(device)
        self.indices = list(range(rank, len(records), world_size))
        self.batch_size = max(1, cfg.data.eval_batch_size)
        self._decoder = _Decoder(cfg, P.EVAL, num_frames, crop_size, self.device, self.batch_size,
                                 num_spatial=self.spatial)
        self.failed: list = []  # (video index, reason) of videos that could not be decoded

    def __len__(self) -> int:
        return len(self.indices)

    def make_item(self, video: int) -> _Item:
        rec = self.records[video]
        n = int(rec["probe"]["num_frames"])
        start, end = frame_bounds(rec)
        clips = test_clip_indices(n, self.num_frames, self.ds.stride, self.temporal,
                                  self.ds.sampling, start, end)  # (t, T)
        h, w = display_size(rec["probe"])
        # One decode of the union of the views: the t clips in sequence, split afterwards.
        return _Item(0, video, video, rec, clips.reshape(-1).astype(np.int32),
                     P.eval_inputs(self.spatial, h, w))

    def _views(self, out: torch.Tensor) -> torch.Tensor:
        """(S, 3, t*T, c, c) -> (t*S, 3, T, c, c), temporal-major."""
        s, c, _, h, w = out.shape
        out = out.reshape(s, c, self.temporal, self.num_frames, h, w).permute(2, 0, 1, 3, 4, 5)
        return out.reshape(self.temporal * s, c, self.num_frames, h, w)

    def __iter__(self):
        from dali_pipes.manifest import append_quarantine

        for lo in range(0, len(self.indices), self.batch_size):
            vids = self.indices[lo: lo + self.batch_size]
            items = [self.make_item(v) for v in vids]
            outs, errs = self._decoder.run(items)
            keep = [k for k, e in enumerate(errs) if e is None]
            for k, e in enumerate(errs):
                if e is not None:
                    self.failed.append((vids[k], e))
                    append_quarantine(self.ds.val_manifest, items[k].record["path"], e, "eval")
            if not keep:
                continue
            video = torch.stack([self._views(outs[k]) for k in keep]).to(self.device)
            labels = torch.tensor([int(items[k].record["label"]) for k in keep], dtype=torch.long)
            yield EvalBatch(video, self.name, labels,
                            torch.tensor([vids[k] for k in keep], dtype=torch.long))

    def close(self) -> None:
        self._decoder.close()


def build_train_loader(cfg, num_frames: int, crop_size: int, rank: int = 0, world_size: int = 1,
                       device: torch.device = torch.device("cpu")) -> TrainLoader:
    return TrainLoader(cfg, num_frames, crop_size, rank, world_size, device)


def build_eval_loader(cfg, dataset_name: str, num_frames: int, crop_size: int, rank: int = 0,
                      world_size: int = 1, device: torch.device = torch.device("cpu")) -> EvalLoader:
    return EvalLoader(cfg, dataset_name, num_frames, crop_size, rank, world_size, device)
