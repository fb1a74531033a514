"""Training and evaluation loaders: sampler -> per-sample parameters -> decoder -> torch.

Each batch is decoded by DALI for the files its decoder reads and by the PyAV fallback for the
rest (dali_pipes/decoder.py), then put back in sampler order, on the training device.

A file that fails (alone, again, in a fresh pipeline) is quarantined (manifest dir's
quarantine.jsonl, source "train") and its slot is refilled with another video of the same
dataset. The candidates for a slot are a fixed sequence drawn from (seed, epoch, sample id,
attempt), the first one not known to be bad is taken: the choice depends on which files are
broken, not on when the run found out, so a resumed run makes the same replacement.
"""
from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from dali_pipes import pipeline as P
from dali_pipes.decoder import Decoder, Item, stack_samples
# Quarantine helpers live with the manifest (light to import); kept importable from here.
from dali_pipes.manifest import read_quarantine, reason_kind  # noqa: F401
from dali_pipes.sampling import (MultiDatasetSampler, clip_indices, sample_rng,
                                 test_clip_indices, uniform_indices)

MAX_REPLACEMENTS = 20  # failed decodes in a row for one slot before the batch fails loudly
MAX_CANDIDATES = 100_000  # replacement candidates looked at for one slot
JOIN_TIMEOUT_S = 5.0  # longest wait for a loader thread at the end of an epoch


@dataclass
class Batch:
    # B = data.batch_size videos x data.num_sample augmented copies, each video's adjacent
    video: torch.Tensor  # (B, 3, T, H, W) float32, normalised, on the training device
    dataset_ids: torch.Tensor  # (B,) long on the training device, index into cfg.data.datasets
    labels: torch.Tensor  # (B,) long on the training device, class index in its own dataset
    sample_ids: torch.Tensor  # (B,) long on the training device, global sample id of the epoch
    epoch_step: int  # step of this batch within its epoch
    datasets: list  # (B,) dataset index of every row, on the host (no device read needed)
    wait_s: float = 0.0  # time the consumer waited for this batch (0 when prefetch kept up)
    ready: Optional[object] = None  # CUDA event: the loader stream finished writing the tensors

    def tensors(self) -> list:
        return [self.video, self.dataset_ids, self.labels, self.sample_ids]


@dataclass
class EvalBatch:
    video: torch.Tensor  # (N, V, 3, T, H, W) float32, V = temporal x spatial, temporal-major
    dataset: str  # dataset name
    labels: torch.Tensor  # (N,) long, on the evaluation device
    video_ids: torch.Tensor  # (N,) long, index in the validation manifest (host)

    def __iter__(self):  # unpacks as (video, dataset name, labels, video indices)
        return iter((self.video, self.dataset, self.labels, self.video_ids))


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


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> training device; pinned and asynchronous on CUDA (the copy is ordered on
    the caller's current stream)."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class LoaderStream:
    """The loader thread's own CUDA stream. Batches are made on it and handed over with an
    event the training stream waits for (no host sync) and record_stream, so the caching
    allocator never gives a block the training step still reads to the next batch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def producing(self):
        if self.stream is None:
            yield
            return
        torch.cuda.set_device(self.device)  # the current device is per thread
        with torch.cuda.stream(self.stream):
            yield

    def mark_ready(self, batch) -> None:
        if self.stream is not None:
            batch.ready = torch.cuda.Event()
            batch.ready.record(self.stream)

    def hand_over(self, batch) -> None:
        """On the consumer's thread: order its stream after the batch, record the tensors' use."""
        if self.stream is None or batch.ready is None:
            return
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(batch.ready)
        for t in batch.tensors():
            if t.is_cuda:
                t.record_stream(consumer)


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
                 device: torch.device = torch.device("cpu"),
                 on_quarantine: Optional[Callable[[str, str, str], None]] = None):
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
        self.global_batch = cfg.data.batch_size * world_size  # samples per step, all ranks
        self._decoder = Decoder(cfg, P.TRAIN, crop_size, self.device, cfg.data.batch_size)
        self.decode_device = self._decoder.decode_device
        self.geom_interp = self._decoder.geom_interp
        self.on_quarantine = on_quarantine  # (dataset name, path, reason), e.g. a console line
        self._bad: set = set()
        self._bad_count = [0] * len(self.datasets)
        self.excluded = self._exclude_known_bad()
        self.quarantined: dict = {}  # dataset name -> {reason kind: count}, this run
        self.num_quarantined = 0
        self._epoch, self._step = 0, 0  # position of the consumer (what the step has used)
        self._route_summaries = None
        self._lock = threading.Lock()
        self._decode_lock = threading.Lock()  # one producer at a time uses the DALI graphs
        self._stream = LoaderStream(self.device)

    def route(self, record: dict) -> tuple[str, str]:
        """(decoder, reason) of a manifest record: dali_pipes/routing.py on this machine."""
        return self._decoder.route(record)

    def route_summaries(self) -> dict:
        """{dataset: routing.summarize(...)} of every record, computed once (a pass over a
        Kinetics-size manifest is not free) for the console and TensorBoard."""
        from dali_pipes import routing
        if self._route_summaries is None:
            self._route_summaries = {name: routing.summarize(self.route(r) for r in recs)
                                     for name, recs in zip(self.names, self.records)}
        return self._route_summaries

    # ---------------------------------------------------------------------------- state ---
    def state_dict(self, pending: int = 0) -> dict:
        """Position in global samples (all ranks): a resume with another world size continues
        with exactly the unseen samples. `pending`: batches handed out but not trained on (an
        unfinished accumulation), which a resume hands out again."""
        return {"epoch": self._epoch, "samples": max(self._step - pending, 0) * self.global_batch,
                "quarantined": self.num_quarantined}

    def load_state_dict(self, state: dict) -> None:
        samples = int(state["samples"]) if "samples" in state else \
            int(state["step"]) * self.global_batch  # checkpoints before positions in samples
        if samples % self.global_batch:
            raise ValueError(
                f"the checkpoint stopped after {samples} samples of epoch {state['epoch']}, not a "
                f"whole number of steps of {self.global_batch} samples (data.batch_size x "
                "processes) in this run: resume with the world size and data.batch_size of the "
                "interrupted run, or from a checkpoint at an optimizer step")
        self._epoch, self._step = int(state["epoch"]), samples // self.global_batch
        self.num_quarantined = int(state.get("quarantined", 0))

    def _exclude_known_bad(self) -> dict:
        """Marks files quarantined by earlier training runs, and (data.skip_decode_errors) files
        whose probe saw decode errors, as bad; returns {dataset: {reason kind: count}}."""
        excluded: dict = {}
        for d, ds in enumerate(self.datasets):
            reasons = {r.get("path"): r.get("reason", "") for r in read_quarantine(ds.manifest)
                       if r.get("source") == "train"}
            counts: dict = {}
            for v, rec in enumerate(self.records[d]):
                reason = reasons.get(rec["path"])
                if reason is None and self.cfg.data.skip_decode_errors and \
                        rec["probe"].get("decode_errors"):
                    reason = "decode errors in the probe"
                if reason is not None:
                    self._mark_bad(d, v)
                    kind = reason_kind(reason)
                    counts[kind] = counts.get(kind, 0) + 1
            if counts:
                excluded[ds.name] = counts
        return excluded

    def _mark_bad(self, d: int, v: int) -> bool:
        if (d, v) in self._bad:
            return False
        self._bad.add((d, v))
        self._bad_count[d] += 1
        return True

    # -------------------------------------------------------------------------- samples ---
    def make_item(self, epoch: int, dataset: int, video: int, sample_id: int,
                  attempt: int = 0) -> Item:
        """Temporal indices and augmentation parameters of one sample, from its own RNG."""
        ds, rec = self.datasets[dataset], self.records[dataset][video]
        rng = sample_rng(self.seed, epoch, sample_id, attempt)
        probe = rec["probe"]
        n = int(probe["num_frames"])
        start, end = frame_bounds(rec)
        if ds.sampling == "uniform":
            idx = uniform_indices(n, self.num_frames, rng, start, end)
        else:
            idx = clip_indices(n, self.num_frames, ds.stride, rng, start, end,
                               float(probe.get("fps") or 0.0), self.cfg.data.target_fps)
        h, w = display_size(probe)
        d = self.cfg.data
        params = P.draw_train_copies(rng, d.num_sample, h, w, self.crop_size,
                                     ds.train_aug or d.train_aug, d.train_scale, d.rrc_area,
                                     ds.flip, d.rand_aug_n, d.rand_aug_m, d.rand_aug_m_std,
                                     ds.inverse_scale)
        return Item(dataset, video, sample_id, rec, idx, params, attempt)

    def _candidate(self, epoch: int, dataset: int, sample_id: int, attempt: int) -> int:
        rng = sample_rng(self.seed, epoch, sample_id, 1000 + attempt)
        return int(rng.integers(len(self.records[dataset])))

    def _item_avoiding_bad(self, epoch: int, d: int, v: int, sid: int, attempt: int = 0) -> Item:
        """The sample's own video, or the first replacement candidate not known to be bad."""
        while (d, v) in self._bad:
            if self._bad_count[d] >= len(self.records[d]):
                raise RuntimeError(f"every video of dataset '{self.names[d]}' is quarantined "
                                   f"(see {Path(self.datasets[d].manifest) / 'quarantine.jsonl'})")
            attempt += 1
            if attempt > MAX_CANDIDATES:
                raise RuntimeError(f"no usable video of dataset '{self.names[d]}' among "
                                   f"{MAX_CANDIDATES} candidates; check its quarantine.jsonl")
            v = self._candidate(epoch, d, sid, attempt)
        return self.make_item(epoch, d, v, sid, attempt)

    def _next_item(self, epoch: int, it: Item) -> Item:
        return self._item_avoiding_bad(epoch, it.dataset, it.video, it.sample_id, it.attempt)

    def _quarantine(self, item: Item, reason: str) -> None:
        from dali_pipes.manifest import append_quarantine

        name = self.names[item.dataset]
        with self._lock:
            if not self._mark_bad(item.dataset, item.video):
                return
            self.num_quarantined += 1
            kinds = self.quarantined.setdefault(name, {})
            kinds[reason_kind(reason)] = kinds.get(reason_kind(reason), 0) + 1
        append_quarantine(self.datasets[item.dataset].manifest, item.path, reason, "train")
        if self.on_quarantine is not None:
            self.on_quarantine(name, item.path, reason)

    def prepare(self, epoch: int, rows: np.ndarray) -> list[Item]:
        """Items of sampler rows (dataset, video, sample id), their files read (with timeouts)."""
        items = [self._item_avoiding_bad(epoch, int(d), int(v), int(s)) for d, v, s in rows]
        self._decoder.read(items)
        return items

    def build_batch(self, epoch: int, step: int, rows: np.ndarray,
                    items: Optional[list] = None) -> Batch:
        """Decodes and augments one batch of sampler rows (dataset, video, sample id)."""
        items = self.prepare(epoch, rows) if items is None else list(items)
        # A file quarantined after this batch was prepared is replaced as prepare would have.
        items = [self._next_item(epoch, it) if (it.dataset, it.video) in self._bad else it
                 for it in items]
        videos: list = [None] * len(items)
        todo = list(range(len(items)))
        with self._decode_lock:
            for _ in range(MAX_REPLACEMENTS + 1):
                outs, errs = self._decoder.run([items[i] for i in todo])
                retry = []
                for i, out, err in zip(todo, outs, errs):
                    if err is None:
                        videos[i] = out
                        continue
                    self._quarantine(items[i], err)
                    items[i] = self._next_item(epoch, items[i])
                    retry.append(i)
                if not retry:
                    break
                todo = retry
            else:
                raise RuntimeError(f"batch {step} of epoch {epoch}: {MAX_REPLACEMENTS} replacement "
                                   "videos failed in a row; check the manifests")
        dev, copies = self.device, self.cfg.data.num_sample
        video = stack_samples(videos)  # (B, 3, T, crop, crop) or (B, S, 3, T, crop, crop)
        if copies > 1:
            video = video.flatten(0, 1)  # (B*S, ...): a view, each video's copies adjacent

        def host(values):  # one value per video -> (B*S,) long, repeated for its copies
            return torch.tensor(values, dtype=torch.long).repeat_interleave(copies)

        return Batch(video=to_device(video, dev),  # (B*S, 3, T, crop, crop)
                     dataset_ids=to_device(host([it.dataset for it in items]), dev),
                     labels=to_device(host([int(it.record["label"]) for it in items]), dev),
                     sample_ids=to_device(host([it.sample_id for it in items]), dev),
                     epoch_step=step, datasets=[it.dataset for it in items for _ in range(copies)])

    # ---------------------------------------------------------------------- iteration ---
    def epoch(self, epoch: int, should_stop: Optional[Callable[[], bool]] = None
              ) -> Iterator[Batch]:
        """Batches of `epoch`, from the restored step when resuming that epoch. While waiting
        for a batch, `should_stop()` (e.g. a SIGTERM flag) ends the epoch early."""
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

        # Two stages so that parameter drawing and file reading for batch k+1 overlap the
        # decoding of batch k (DALI and PyAV release the GIL).
        def prepare():
            try:
                for step, rows in self.sampler.iter_epoch(epoch):
                    if stop.is_set() or not put(prepared, (step, rows, self.prepare(epoch, rows))):
                        return
                put(prepared, None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                put(prepared, exc)

        def produce():
            with self._stream.producing():
                while not stop.is_set():
                    try:
                        job = prepared.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if job is None or isinstance(job, BaseException):
                        put(q, job)
                        return
                    try:
                        batch = self.build_batch(epoch, *job)
                        self._stream.mark_ready(batch)
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
                item = self._next(q, should_stop)
                wait = time.perf_counter() - t0
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self._stream.hand_over(item)
                item.wait_s = wait
                self._step = item.epoch_step + 1
                yield item
        finally:
            stop.set()
            self._join(threads, prepared)
            if self._step >= self.steps_per_epoch:
                self._epoch, self._step = epoch + 1, 0

    @staticmethod
    def _next(q: queue.Queue, should_stop):
        while True:
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                if should_stop is not None and should_stop():
                    return None

    @staticmethod
    def _join(threads, prepared: queue.Queue) -> None:
        """Waits a bounded time for the loader threads; one blocked in a read or a decode
        (bounded by data.decode_timeout itself) is left to finish on its own."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for t in threads:
            while t.is_alive() and time.monotonic() < deadline:
                try:  # unblock a producer waiting on a queue
                    prepared.get_nowait()
                except queue.Empty:
                    pass
                t.join(timeout=0.05)
            if t.is_alive():
                print(f"warning: loader thread {t.name} is still busy (a slow read or decode); "
                      "it ends on its own within data.decode_timeout", file=sys.stderr)

    def close(self) -> None:
        self._decoder.close()


class EvalLoader:
    """Every video of one dataset's validation manifest once (sharded over ranks), as all its
    test views: yields EvalBatch (video (N, V, 3, T, crop, crop), dataset name, labels (N,),
    video indices (N,)), which also unpacks as that tuple; V = temporal x spatial views in
    temporal-major order. Videos that cannot be decoded are listed in `failed` (and quarantined
    with source "eval"); they are not scored."""

    def __init__(self, cfg, dataset_name: str, num_frames: int, crop_size: int, rank: int = 0,
                 world_size: int = 1, device: torch.device = torch.device("cpu")):
        ((ds, records, classes),) = _load_datasets(cfg, "val_manifest", [dataset_name])
        self.cfg, self.ds, self.records, self.classes = cfg, ds, records, list(classes)
        self.name, self.num_frames, self.crop_size = ds.name, num_frames, crop_size
        self.temporal, self.spatial = int(ds.test_views[0]), int(ds.test_views[1])
        self.device = torch.device(device)
        self.indices = list(range(rank, len(records), world_size))
        self.batch_size = max(1, cfg.data.eval_batch_size)
        self._decoder = Decoder(cfg, P.EVAL, crop_size, self.device, self.batch_size,
                                num_spatial=self.spatial)
        self.failed: list = []  # (video index, reason) of videos that could not be decoded
        # Videos an earlier evaluation quarantined: counted as failed again, not re-decoded
        # and not written twice (rebuilding the manifest re-probes them).
        self._known_bad = {r.get("path"): r.get("reason", "") for r in read_quarantine(ds.val_manifest)
                           if r.get("source") == "eval"}

    def __len__(self) -> int:
        return len(self.indices)

    def make_item(self, video: int) -> Item:
        rec = self.records[video]
        n = int(rec["probe"]["num_frames"])
        start, end = frame_bounds(rec)
        clips = test_clip_indices(n, self.num_frames, self.ds.stride, self.temporal,
                                  self.ds.sampling, start, end, float(rec["probe"].get("fps") or 0.0),
                                  self.cfg.data.target_fps)  # (t, T)
        h, w = display_size(rec["probe"])
        # One decode of the union of the views: the t clips in sequence, split afterwards.
        return Item(0, video, video, rec, clips.reshape(-1).astype(np.int32),
                    P.eval_inputs(self.spatial, h, w))

    def _views(self, out: torch.Tensor) -> torch.Tensor:
        """(S, 3, t*T, c, c) -> (t*S, 3, T, c, c), temporal-major."""
        s, c, _, h, w = out.shape
        out = out.reshape(s, c, self.temporal, self.num_frames, h, w).permute(2, 0, 1, 3, 4, 5)
        return out.reshape(self.temporal * s, c, self.num_frames, h, w)

    def __iter__(self):
        from dali_pipes.manifest import append_quarantine

        for lo in range(0, len(self.indices), self.batch_size):
            vids = [v for v in self.indices[lo: lo + self.batch_size] if not self._skip_known(v)]
            if not vids:
                continue
            items = [self.make_item(v) for v in vids]
            outs, errs = self._decoder.run(items)
            keep = [k for k, e in enumerate(errs) if e is None]
            for k, e in enumerate(errs):
                if e is not None:
                    self.failed.append((vids[k], e))
                    append_quarantine(self.ds.val_manifest, items[k].path, e, "eval")
            if not keep:
                continue
            video = torch.stack([self._views(outs[k]) for k in keep])  # (N, V, 3, T, c, c)
            labels = torch.tensor([int(items[k].record["label"]) for k in keep], dtype=torch.long)
            yield EvalBatch(to_device(video, self.device), self.name,
                            to_device(labels, self.device),
                            torch.tensor([vids[k] for k in keep], dtype=torch.long))

    def _skip_known(self, video: int) -> bool:
        reason = self._known_bad.get(self.records[video]["path"])
        if reason is not None:
            self.failed.append((video, reason))
        return reason is not None

    def close(self) -> None:
        self._decoder.close()


def build_train_loader(cfg, num_frames: int, crop_size: int, rank: int = 0, world_size: int = 1,
                       device: torch.device = torch.device("cpu"),
                       on_quarantine: Optional[Callable] = None) -> TrainLoader:
    return TrainLoader(cfg, num_frames, crop_size, rank, world_size, device, on_quarantine)


def build_eval_loader(cfg, dataset_name: str, num_frames: int, crop_size: int, rank: int = 0,
                      world_size: int = 1, device: torch.device = torch.device("cpu")) -> EvalLoader:
    return EvalLoader(cfg, dataset_name, num_frames, crop_size, rank, world_size, device)
