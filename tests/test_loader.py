"""Training/eval loaders end to end on CPU with hand-written manifests of the real clips."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from dali_pipes import pipeline as P
from dali_pipes.loader import build_eval_loader, build_train_loader

from helpers import CROP, T, break_file, entry, make_cfg, probe, write_manifest


def collect(loader, epoch):
    return [b for b in loader.epoch(epoch)]


def test_epoch_mixes_dali_and_fallback_in_sampler_order(tmp_path, two_datasets):
    cfg = make_cfg(tmp_path, two_datasets)
    loader = build_train_loader(cfg, T, CROP)
    assert loader.names == ["dali", "h264"] and loader.num_classes == {"dali": 3, "h264": 3}
    assert loader.steps_per_epoch == 2
    batches = collect(loader, 0)
    rows = np.concatenate([r for _, r in loader.sampler.iter_epoch(0)])
    assert len(batches) == 2
    ids = torch.cat([b.dataset_ids for b in batches])
    assert ids.tolist() == rows[:, 0].tolist()  # order of the sampler, both decoders merged
    assert torch.cat([b.sample_ids for b in batches]).tolist() == rows[:, 2].tolist()
    assert Counter(ids.tolist()) == {0: 3, 1: 5}  # H.264/MPEG-4 trained through the fallback
    for b in batches:
        assert b.video.shape == (4, 3, T, CROP, CROP) and b.video.dtype == torch.float32
        assert torch.isfinite(b.video).all() and b.video.std() > 0.1
        labels = [int(loader.records[d][v]["label"]) for d, v, _ in rows[b.epoch_step * 4:][:4]]
        assert b.labels.tolist() == labels
    assert loader.num_quarantined == 0
    assert loader.state_dict() == {"epoch": 1, "samples": 0, "quarantined": 0}
    loader.close()


def test_resume_mid_epoch_gives_identical_batches(tmp_path, two_datasets):
    cfg = make_cfg(tmp_path, two_datasets)
    full = build_train_loader(cfg, T, CROP)
    ref = collect(full, 1)
    first = build_train_loader(cfg, T, CROP)
    it = first.epoch(1)
    b0 = next(it)
    state = first.state_dict()
    it.close()
    assert state == {"epoch": 1, "samples": 4, "quarantined": 0}
    resumed = build_train_loader(cfg, T, CROP)
    resumed.load_state_dict(state)
    rest = collect(resumed, 1)
    assert [b.epoch_step for b in rest] == [1]
    for got, want in zip([b0] + rest, ref):
        assert torch.equal(got.sample_ids, want.sample_ids)
        assert torch.equal(got.video, want.video)  # same clips, same augmentation
    for ld in (full, first, resumed):
        ld.close()


def test_same_sample_id_same_clip_wherever_it_sits_in_a_batch(tmp_path, two_datasets):
    """A clip is a function of (seed, epoch, sample id): its temporal start, crop, flip and
    RandAugment do not depend on its row, its neighbours, the decoder or the loader instance."""
    cfg = make_cfg(tmp_path, two_datasets)  # RandAugment on (n=2), flips on for "dali"
    rows = np.array([[0, 0, 10], [1, 3, 11], [0, 0, 12], [0, 2, 13]])  # row 1: the fallback
    loader = build_train_loader(cfg, T, CROP)
    a = loader.build_batch(0, 0, rows)
    b = loader.build_batch(0, 0, rows[::-1])
    loader.close()
    for k in range(4):
        assert torch.equal(a.video[k], b.video[3 - k]), k
    assert b.sample_ids.tolist() == [13, 12, 11, 10] and b.labels.tolist() == a.labels.tolist()[::-1]
    assert not torch.equal(a.video[0], a.video[2])  # same video, another sample: another clip
    other = build_train_loader(cfg, T, CROP)  # e.g. the resumed run
    c = other.build_batch(0, 0, rows[[2, 0]])
    other.close()
    assert torch.equal(c.video[0], a.video[2]) and torch.equal(c.video[1], a.video[0])
    d = build_train_loader(cfg, T, CROP)
    assert not torch.equal(d.build_batch(1, 0, rows[:1]).video[0], a.video[0])  # next epoch
    d.close()


def test_repeated_augmentation_gives_each_video_its_own_copies(tmp_path, two_datasets):
    """data.num_sample 2 (PySlowFast's AUG.NUM_SAMPLE, the authors' recipe): a video's two
    clips sit next to each other with its label and sample id, and each is exactly the clip a
    one-copy graph makes from that copy's own parameters (window, flip, RandAugment), through
    DALI's decoder and the PyAV fallback alike; copy 0 is the clip of num_sample 1."""
    from dataclasses import replace
    rows = np.array([[0, 0, 10], [1, 3, 11], [0, 2, 13]])  # row 1: the fallback
    two = build_train_loader(make_cfg(tmp_path, two_datasets, num_sample=2), T, CROP)
    a = two.build_batch(0, 0, rows)
    items = [two.make_item(0, int(d), int(v), int(s)) for d, v, s in rows]
    two.close()
    assert a.video.shape == (6, 3, T, CROP, CROP)
    assert a.sample_ids.tolist() == [10, 10, 11, 11, 13, 13] and a.datasets == [0, 0, 1, 1, 0, 0]
    assert a.dataset_ids.tolist() == a.datasets and a.labels[0::2].tolist() == a.labels[1::2].tolist()
    one = build_train_loader(make_cfg(tmp_path, two_datasets, num_sample=1), T, CROP)
    plain = one.build_batch(0, 0, rows)
    for c in range(2):
        copies = [replace(it, params=P.copy_params(it.params, c)) for it in items]
        b = one.build_batch(0, 0, rows, items=copies)
        for k in range(3):
            assert torch.equal(a.video[2 * k + c], b.video[k]), (c, k)
    one.close()
    assert torch.equal(a.video[0::2], plain.video)  # the first copy draws what one clip draws
    for k in range(3):
        assert not torch.equal(a.video[2 * k], a.video[2 * k + 1]), k  # augmented apart


def test_corrupt_files_quarantined_and_replaced(tmp_path, videos):
    vp9 = videos / "derived_juggle_vp9.webm"
    trunc = break_file(tmp_path / "bad" / "truncated.webm", "truncated", src=vp9, fraction=0.02)
    text = break_file(tmp_path / "bad" / "text.webm", "text")
    fake = lambda p: (p, 1, probe("vp9", "yuv420p", 640, 360, 72, 24.0, p))  # noqa: E731
    # label 1 of dataset "a" is only on the two broken files
    a = write_manifest(tmp_path / "a", [entry(videos, "derived_juggle_vp9.webm", 0), fake(trunc),
                                        fake(text), entry(videos, "derived_juggle_mjpeg.avi", 2)])
    b = write_manifest(tmp_path / "b", [entry(videos, "carphone_qcif_176x144.mp4", 0),
                                        entry(videos, "k400_arm_wrestling_340x256.mp4", 1),
                                        entry(videos, "carphone_qcif_176x144.mp4", 2),
                                        entry(videos, "k400_arm_wrestling_340x256.mp4", 0)])
    cfg = make_cfg(tmp_path, [{"name": "a", "manifest": str(a)}, {"name": "b", "manifest": str(b)}])
    loader = build_train_loader(cfg, T, CROP)
    rows = np.concatenate([r for _, r in loader.sampler.iter_epoch(0)])
    assert sorted(int(v) for d, v, _ in rows if d == 0) == [0, 1, 2, 3]  # both bad files drawn
    batches = collect(loader, 0)
    assert loader.num_quarantined == 2
    q = [json.loads(ln) for ln in (a / "quarantine.jsonl").read_text().splitlines()]
    assert {r["path"] for r in q} == {str(trunc), str(text)}
    assert all(r["source"] == "train" and r["reason"] for r in q)
    ids = torch.cat([b.dataset_ids for b in batches])
    assert ids.tolist() == rows[:, 0].tolist()  # replacements come from the same dataset
    labels = torch.cat([b.labels for b in batches])
    assert set(labels[ids == 0].tolist()) <= {0, 2}  # a good video of "a" in each bad slot
    for b in batches:
        assert b.video.shape == (4, 3, T, CROP, CROP) and torch.isfinite(b.video).all()
    # Later epochs never draw the quarantined files again: now repaired, they would decode
    # and show up as label-1 rows of "a"; none are, and nothing is quarantined again.
    for path in (trunc, text):
        path.write_bytes(vp9.read_bytes())
    rows = np.concatenate([r for _, r in loader.sampler.iter_epoch(1)])
    assert sorted(int(v) for d, v, _ in rows if d == 0) == [0, 1, 2, 3]  # the sampler still does
    batches = collect(loader, 1)
    ids, labels = torch.cat([b.dataset_ids for b in batches]), torch.cat([b.labels for b in batches])
    assert (ids == 0).sum() == 4 and set(labels[ids == 0].tolist()) <= {0, 2}
    assert loader.num_quarantined == 2
    assert len((a / "quarantine.jsonl").read_text().splitlines()) == 2
    loader.close()


def test_eval_loader_views_and_sharding(tmp_path, two_datasets):
    cfg = make_cfg(tmp_path, two_datasets, eval_batch_size=2)
    seen = []
    for rank in range(2):
        ev = build_eval_loader(cfg, "dali", T, CROP, rank=rank, world_size=2)
        for video, name, labels, idx in ev:  # EvalBatch unpacks as a tuple
            assert name == "dali"
            assert video.shape[1:] == (6, 3, T, CROP, CROP)  # V = 2 temporal x 3 spatial
            assert video.shape[0] == labels.shape[0] == idx.shape[0]
            # spatial crops of one clip differ, its temporal clips differ
            assert not torch.equal(video[0, 0], video[0, 1])
            assert not torch.equal(video[0, 0], video[0, 3])
            seen += idx.tolist()
        ev.close()
    assert sorted(seen) == [0, 1, 2]
    ev = build_eval_loader(cfg, "h264", T, CROP)  # fallback path, 1x1 views
    out = list(ev)
    assert sum(b.video.shape[0] for b in out) == 5 and out[0].video.shape[1:] == (1, 3, T, CROP, CROP)
    assert sorted(i for b in out for i in b.video_ids.tolist()) == list(range(5))
    assert out[0].dataset == "h264" and out[0].labels.dtype == torch.long
    ev.close()


@pytest.mark.gpu
def test_gpu_loader_outputs_cuda(tmp_path, two_datasets):
    cfg = make_cfg(tmp_path, two_datasets, decode_device="auto")
    loader = build_train_loader(cfg, T, CROP, device=torch.device("cuda", 0))
    b = next(iter(loader.epoch(0)))
    assert b.video.is_cuda and b.video.shape == (4, 3, T, CROP, CROP)
    loader.close()
