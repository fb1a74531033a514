"""Evaluation: views cut from resized frames, videos that fail during evaluation (quarantined
with source "eval", left out of the accuracy and said so in eval.json), accuracy denominators."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import runtime
from config import config_from_dict
from dali_pipes import pipeline as P
from dali_pipes.loader import EvalLoader, build_eval_loader, read_quarantine
from dali_pipes.manifest import build_manifest
from helpers import break_file, clip_id_of, to_pixels, write_indexed_clip

MEAN, STD = (114.75,) * 3, (57.375,) * 3


def test_eval_views_are_crops_of_frames_resized_to_test_scale():
    """40x72 frames, short side resized to 20 (20x36), three 16x16 crops along the width at
    x = 0, 10, 20 and centred in height (y = 2); two temporal clips, temporal-major views.
    Against torch's antialiased bilinear resize of the same frames."""
    t_clips, clip_len, h, w, scale, crop = 2, 3, 40, 72, 20, 16
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.uniform(0, 255, (t_clips * clip_len, 3, 5, 9))).float()
    frames = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)  # smooth
    frames = frames.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    spec = P.GraphSpec(P.EVAL, P.FRAMES, "cpu", crop, MEAN, STD, num_spatial=3, test_scale=scale)
    out = P.GraphRunner(spec, 1, 1, None).run(
        {"frames": [frames], **P.order_inputs([np.arange(t_clips * clip_len)]),
         **{k: [v] for k, v in P.eval_inputs(3, h, w).items()}})
    loader = EvalLoader.__new__(EvalLoader)  # only its view splitting
    loader.temporal, loader.num_frames = t_clips, clip_len
    views = loader._views(out[0])  # (t*S, 3, T, c, c)
    assert views.shape == (6, 3, clip_len, crop, crop)
    small = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(scale, 36),
                          mode="bilinear", align_corners=False, antialias=True)  # (F, 3, 20, 36)
    for v in range(6):
        tc, s = divmod(v, 3)
        got = to_pixels(views[v]).astype(np.float32)  # (T, c, c, 3)
        errors = {}
        for x0 in (0, 10, 20):
            want = small[tc * clip_len:(tc + 1) * clip_len, :, 2:2 + crop, x0:x0 + crop]
            errors[x0] = np.abs(got - want.permute(0, 2, 3, 1).numpy()).mean()
        assert errors[[0, 10, 20][s]] < 1.0, (v, errors)  # measured 0.25
        assert min(e for x0, e in errors.items() if x0 != [0, 10, 20][s]) > 20, (v, errors)  # 67


# ---------------------------------------------------------------- failures during evaluation

CLIPS = 6  # indexed VP9 clips; clip k names itself k in its corner block
LABELS = [0, 1, 2, 1, 1, 2]  # the stand-in classifier predicts k % 3: right for 0, 1, 2, 4
BROKEN = 5  # broken after the manifest was built


@pytest.fixture
def val_manifest(tmp_path):
    for k in range(CLIPS):
        write_indexed_clip(tmp_path / f"c{k}.webm", "libvpx-vp9", frames=16, clip_id=k)
    (tmp_path / "list.txt").write_text("".join(f"c{k}.webm {LABELS[k]}\n" for k in range(CLIPS)))
    summary = build_manifest("list", tmp_path / "list.txt", tmp_path, tmp_path / "m", progress=False)
    assert summary["num_quarantined"] == 0
    break_file(tmp_path / f"c{BROKEN}.webm", "text")
    return tmp_path / "m"


def config(manifest, **data):
    return config_from_dict({"data": {
        "datasets": [{"name": "v", "manifest": str(manifest), "val_manifest": str(manifest),
                      "stride": 2, "test_views": [2, 1]}],
        "batch_size": 1, "eval_batch_size": 4, "num_threads": 1, "crop_size": 64,
        "test_scale": 64, "rand_aug_n": 0, "fallback_workers": 1, **data}})


class ClipIdClassifier(nn.Module):
    """Predicts class (clip id mod 3) of each view from the clip's corner block: known answers,
    so the accuracy is known. Stands in for MultiTrainModel's forward on evaluation batches."""
    pairs: list = []

    def forward(self, video):  # (N*V, 3, T, H, W)
        ids = [clip_id_of(to_pixels(v)[0]) for v in video]
        return {"logits": {"v": F.one_hot(torch.tensor(ids) % 3, 3).float() * 10}}


def test_a_video_failing_in_evaluation_is_quarantined_and_left_out(val_manifest):
    loader = build_eval_loader(config(val_manifest), "v", 4, 64)
    batches = list(loader)
    loader.close()
    ids = [int(i) for b in batches for i in b.video_ids]
    assert ids == [0, 1, 2, 3, 4]  # the broken one is missing, the order is kept
    assert [b.video.shape[0] for b in batches] == [4, 1]
    for b in batches:
        assert b.labels.tolist() == [LABELS[i] for i in b.video_ids]
        assert [clip_id_of(to_pixels(v[0])[0]) for v in b.video] == b.video_ids.tolist()
    assert [k for k, _ in loader.failed] == [BROKEN]
    (row,) = read_quarantine(val_manifest)
    assert row["source"] == "eval" and row["path"].endswith(f"c{BROKEN}.webm")
    assert row["reason"] == loader.failed[0][1] and "video decoder" in row["reason"]
    again = build_eval_loader(config(val_manifest), "v", 4, 64)  # the next evaluation
    assert [int(i) for b in again for i in b.video_ids] == ids
    again.close()
    assert again.failed == loader.failed and len(read_quarantine(val_manifest)) == 1  # no 2nd row


def test_accuracy_counts_only_scored_videos_and_eval_json_says_how_many_failed(val_manifest, tmp_path):
    from eval import evaluate, save_results
    from torch.utils.tensorboard import SummaryWriter
    cfg = config(val_manifest)
    env = runtime.Env(0, 1, 0, torch.device("cpu"))
    results = evaluate(ClipIdClassifier(), cfg, env, 4, 64, {"v": ["0", "1", "2"]})
    out = tmp_path / "run" / "eval.json"
    out.parent.mkdir()
    with SummaryWriter(str(tmp_path / "run" / "tb")) as tb:
        save_results(results, str(out), tb, 0, ClipIdClassifier(), {"v": ["0", "1", "2"]})
    r = json.loads(out.read_text())["datasets"]["v"]
    assert (r["videos"], r["failed"]) == (5, 1)
    assert r["top1"] == pytest.approx(4 / 5)  # not 4 / 6: the failed video is not a miss
    assert r["top5"] is None  # 3 classes
    assert "1 video(s) could not be decoded and are not scored" in r["failed_note"]
    assert str(val_manifest / "quarantine.jsonl") in r["failed_note"]
    confusion = np.load(tmp_path / "run" / "eval_confusion.npz")["v"]
    assert confusion.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]  # rows true, columns predicted
