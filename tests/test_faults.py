"""Faults injected on the CPU: files truncated, deleted, replaced by a directory or a FIFO after
the manifest was built; reads that hang; machine faults; signals at chosen steps; a full disk;
unreadable and superseded checkpoints. Nothing is lost, nothing hangs, nothing is silent."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import runtime
from dali_pipes import decode_av
from dali_pipes.decoder import Decoder, Item
from dali_pipes.faults import InfrastructureError, classify, raise_if_infrastructure, short_error
from dali_pipes.loader import build_train_loader, read_quarantine, reason_kind
from helpers import CROP, T, break_file, entry, make_cfg, write_manifest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
FAST = ["data.num_threads=1", "data.fallback_workers=1", "optim.epochs=2", "train.vis_clips=0"]
NO_VAL = [f"data.datasets.{i}.val_manifest=" for i in range(4)]


def copy_of(videos, tmp_path, name, new_name=None):
    dst = tmp_path / (new_name or name)
    dst.write_bytes((videos / name).read_bytes())
    return dst


def one_dataset(tmp_path, entries, **data):
    """A config over one manifest of `entries`; clips of 8 frames 8 apart (a 57-frame span)."""
    m = write_manifest(tmp_path / "m", entries)
    return make_cfg(tmp_path, [{"name": "a", "manifest": str(m), "stride": 8}], **data), m


def reasons(manifest):
    return {Path(r["path"]).name: r["reason"] for r in read_quarantine(manifest) if r["source"] == "train"}


def run_epoch(cfg, frames=8):
    loader = build_train_loader(cfg, frames, CROP)
    batches = list(loader.epoch(0))
    loader.close()
    return loader, batches


# ----------------------------------------------------------------------- files changed later ---

def test_truncated_after_probing_is_quarantined_not_black(tmp_path, videos):
    """The manifest promises every frame, the files now hold about half: DALI (VP9) and PyAV
    (MPEG-4) both report the short decode instead of padding the clip with black frames."""
    vp9 = copy_of(videos, tmp_path, "derived_juggle_vp9.webm")
    avi = copy_of(videos, tmp_path, "ucf101_apply_eye_makeup_xvid_mp3.avi")
    entries = [entry(videos, "derived_juggle_mjpeg.avi", 0), (vp9, 1, entry(videos, vp9.name, 1)[2]),
               (avi, 2, entry(videos, avi.name, 2)[2]), entry(videos, "derived_juggle_vp9.webm", 0)]
    m = write_manifest(tmp_path / "m", entries)  # clips of 8 frames 16 apart: past either half
    cfg = make_cfg(tmp_path, [{"name": "a", "manifest": str(m), "stride": 16}], batch_size=4)
    for path in (vp9, avi):  # keep the header, lose the second half of the frames
        break_file(path, "truncated", fraction=0.5)
    loader, batches = run_epoch(cfg)
    got = reasons(m)
    assert set(got) == {vp9.name, avi.name}, got
    assert "out-of-bounds frame index" in got[vp9.name]  # DALI's own words (pad_mode "none")
    assert "Error in CPU operator" not in got[vp9.name]  # the informative line, not DALI's frame
    assert got[avi.name].startswith("short decode: the stream ends after")
    video = batches[0].video  # (4, 3, T, c, c): every slot refilled with a whole clip
    black = (video == video.new_tensor(-114.75 / 57.375)).flatten(3).all(-1)  # (4, 3, T)
    assert video.shape[0] == 4 and not black.all(1).any()


@pytest.mark.parametrize("fault", ["deleted", "directory", "fifo", "empty"])
def test_files_gone_or_replaced_are_quarantined(tmp_path, videos, fault):
    bad = copy_of(videos, tmp_path, "derived_juggle_vp9.webm", "bad.webm")
    probe = entry(videos, "derived_juggle_vp9.webm", 0)[2]
    entries = [(bad, 1, probe), entry(videos, "derived_juggle_mjpeg.avi", 0),
               entry(videos, "derived_juggle_vp9.webm", 2), entry(videos, "bbb_vp8_vorbis_1s.webm", 0)]
    cfg, m = one_dataset(tmp_path, entries, batch_size=4, decode_timeout=5.0)
    break_file(bad, fault)  # a FIFO: opening it would block until a writer comes
    t0 = time.monotonic()
    loader, batches = run_epoch(cfg)
    assert time.monotonic() - t0 < 60  # nothing waits on the FIFO
    want = {"deleted": "No such file", "directory": "a directory", "fifo": "a FIFO",
            "empty": "empty"}[fault]
    assert want in reasons(m)["bad.webm"]
    assert loader.num_quarantined == 1 and batches[0].video.shape[0] == 4


def test_decode_errors_in_the_probe_are_left_out_by_config(tmp_path, videos):
    noisy = entry(videos, "derived_juggle_vp9.webm", 1)
    noisy[2]["decode_errors"] = ["matroska,webm: Element at 0x1234 exceeds containing master element"]
    entries = [noisy, entry(videos, "derived_juggle_mjpeg.avi", 0), entry(videos, "bbb_vp8_vorbis_1s.webm", 2)]
    cfg, m = one_dataset(tmp_path, entries, batch_size=3)
    loader = build_train_loader(cfg, 8, CROP)
    assert loader.excluded == {"a": {"decode errors in the probe": 1}}
    labels = torch.cat([b.labels for b in loader.epoch(0)]).tolist()
    assert 1 not in labels  # the noisy clip (label 1) never trains
    loader.close()
    cfg.data.skip_decode_errors = False
    assert build_train_loader(cfg, 8, CROP).excluded == {}


# ------------------------------------------------------------------------- hangs and time ---

def test_a_hung_read_times_out_twice_then_quarantines(tmp_path, videos, monkeypatch):
    blocked = threading.Event()

    def hang(path):  # a read blocked on a hung network mount
        blocked.wait(30)
        return np.zeros(1, np.uint8)

    monkeypatch.setattr(decode_av, "read_file", hang)
    cfg, _ = one_dataset(tmp_path, [entry(videos, "derived_juggle_vp9.webm", 0)], batch_size=1,
                         decode_timeout=0.3)
    dec = Decoder(cfg, "train", CROP, torch.device("cpu"), 1)
    rec = {"path": str(videos / "derived_juggle_vp9.webm"), "label": 0,
           "probe": entry(videos, "derived_juggle_vp9.webm", 0)[2]}
    item = Item(0, 0, 0, rec, np.arange(4, dtype=np.int32), {})
    t0 = time.monotonic()
    dec.read([item])
    assert 2 * 1.3 <= time.monotonic() - t0 < 10  # two tries of timeout + grace
    assert item.encoded is None and "no answer for more than" in item.error
    assert dec.pool.hung == 2  # both abandoned threads were replaced
    blocked.set()
    dec.close()


def test_leaving_an_epoch_never_waits_long_on_a_busy_loader_thread(tmp_path, two_datasets, monkeypatch):
    cfg = make_cfg(tmp_path, two_datasets, decode_timeout=30.0)
    loader = build_train_loader(cfg, T, CROP)
    release = threading.Event()
    original = loader.build_batch

    def slow(*args, **kwargs):
        release.wait(20)  # a decode that takes long
        return original(*args, **kwargs)

    monkeypatch.setattr(loader, "build_batch", slow)
    flag = {"stop": False}
    it = loader.epoch(0, should_stop=lambda: flag["stop"])
    threading.Timer(0.5, lambda: flag.__setitem__("stop", True)).start()
    t0 = time.monotonic()
    assert list(it) == []  # the stop request ends the wait for the batch
    assert time.monotonic() - t0 < 0.5 + 6  # JOIN_TIMEOUT_S bounds the thread join
    release.set()
    loader.close()


# ------------------------------------------------------------------------- machine faults ---

@pytest.mark.parametrize("text,cause", [
    ("CUDA error: out of memory", "out of memory"),
    ("cudaErrorMemoryAllocation in mixed operator", "out of memory"),
    ("Failed to load libnvcuvid.so.1: cannot open shared object file", "NVDEC library"),
    ("Codec 27 (h264) is not supported", "cannot take this video format"),
    ("CUDA error: an illegal memory access was encountered", "CUDA context is broken"),
    ("[Errno 24] Too many open files: '/data/x.mp4'", "file descriptors"),
])
def test_machine_faults_are_named(text, cause):
    assert cause in classify(text)[0]
    with pytest.raises(InfrastructureError, match="Fix: "):
        raise_if_infrastructure(RuntimeError(text))


@pytest.mark.parametrize("text", ["Failed to open video file from memory buffer due to: Invalid data",
                                  "Unexpected out-of-bounds frame index 72 for pad_mode = 'none'",
                                  "Start frame 0 is out of bounds for sample #0"])
def test_file_faults_stay_file_faults(text):
    assert classify(text) is None
    raise_if_infrastructure(RuntimeError(text))  # does not raise


def test_dali_error_keeps_the_informative_line():
    text = ("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.video`,\n"
            "which was used in the pipeline definition with the following traceback:\n\n"
            '  File "x.py", line 8, in p\n    return fn.decoders.video(enc)\n\nencountered:\n\n'
            "Codec 27 (h264) is not supported\nC++ context: [frames_decoder.cc:12]\n"
            "Current pipeline object is no longer valid.")
    assert short_error(RuntimeError(text)) == "RuntimeError: Codec 27 (h264) is not supported"


def test_a_machine_fault_stops_the_run_and_quarantines_nothing(tmp_path, two_datasets, monkeypatch):
    from dali_pipes import pipeline as P
    cfg = make_cfg(tmp_path, two_datasets)
    loader = build_train_loader(cfg, T, CROP)

    def oom(self, inputs):
        raise RuntimeError("Critical error in pipeline:\nencountered:\n\nCUDA error: out of memory")

    monkeypatch.setattr(P.GraphRunner, "run", oom)
    with pytest.raises(InfrastructureError, match="out of memory.*Fix: lower data.batch_size"):
        list(loader.epoch(0))
    loader.close()
    assert loader.num_quarantined == 0
    assert not any(read_quarantine(d["manifest"]) for d in two_datasets)


def test_when_a_file_that_decoded_before_fails_too_the_machine_is_blamed(tmp_path, two_datasets, monkeypatch):
    """The canary: after a good batch, every file failing (with an unknown message) is the
    machine's fault, not the files'."""
    from dali_pipes import pipeline as P
    cfg = make_cfg(tmp_path, two_datasets)
    loader = build_train_loader(cfg, T, CROP)
    it = loader.epoch(0)
    next(it)
    it.close()
    monkeypatch.setattr(P.GraphRunner, "run", lambda self, inputs: (_ for _ in ()).throw(
        RuntimeError("something unheard of")))
    with pytest.raises(InfrastructureError, match="decoded before"):
        list(loader.epoch(1))
    loader.close()
    assert loader.num_quarantined == 0


# ---------------------------------------------------------------------------- run state ---

def test_replacements_do_not_depend_on_when_other_files_were_found_bad(tmp_path, videos):
    entries = [entry(videos, "derived_juggle_vp9.webm", i % 3) for i in range(12)]
    cfg, _ = one_dataset(tmp_path, entries, batch_size=4)
    early, late = build_train_loader(cfg, 8, CROP), build_train_loader(cfg, 8, CROP)
    early._mark_bad(0, 3)
    picked = early._item_avoiding_bad(0, 0, 3, 5)
    # a run that also knows other bad files (found later) picks the same, unless it is bad too
    late._mark_bad(0, 3)
    for v in range(12):
        if v not in (3, picked.video):
            late._mark_bad(0, v)
            break
    again = late._item_avoiding_bad(0, 0, 3, 5)
    assert (again.video, again.attempt) == (picked.video, picked.attempt)
    assert np.array_equal(again.indices, picked.indices)


def test_a_new_loader_skips_an_earlier_runs_quarantine_with_the_same_replacement(tmp_path, videos):
    """A resumed or restarted run reads quarantine.jsonl: the bad file is never opened again
    (repaired meanwhile, it would decode and change the batch) and its slots get the videos the
    first run gave them."""
    vp9 = videos / "derived_juggle_vp9.webm"
    bad = break_file(tmp_path / "bad.webm", "text")
    entries = [entry(videos, "derived_juggle_vp9.webm", 0), (bad, 1, entry(videos, vp9.name, 1)[2]),
               entry(videos, "derived_juggle_mjpeg.avi", 2), entry(videos, "bbb_vp8_vorbis_1s.webm", 0)]
    cfg, m = one_dataset(tmp_path, entries, batch_size=2)
    first, batches = run_epoch(cfg)
    assert first.num_quarantined == 1 and list(reasons(m)) == ["bad.webm"]
    bad.write_bytes(vp9.read_bytes())
    again = build_train_loader(cfg, 8, CROP)
    assert again.excluded == {"a": {reason_kind(reasons(m)["bad.webm"]): 1}}
    replayed = list(again.epoch(0))
    again.close()
    assert again.num_quarantined == 0 and len(read_quarantine(m)) == 1
    assert len(replayed) == len(batches) == 2
    for got, want in zip(replayed, batches):
        assert got.labels.tolist() == want.labels.tolist() and 1 not in got.labels.tolist()
        assert torch.equal(got.video, want.video)


def test_a_dataset_whose_every_video_fails_stops_the_run_and_says_so(tmp_path, videos):
    probe = entry(videos, "derived_juggle_vp9.webm", 0)[2]
    cfg, m = one_dataset(tmp_path, [(tmp_path / f"gone{i}.webm", i, probe) for i in range(3)],
                         batch_size=1)  # files that were never there
    loader = build_train_loader(cfg, 8, CROP)
    with pytest.raises(RuntimeError, match=r"every video of dataset 'a' is quarantined \(see "
                                           rf"{m}/quarantine.jsonl\)"):
        list(loader.epoch(0))
    loader.close()
    assert loader.num_quarantined == 3
    assert all("No such file" in r for r in reasons(m).values()) and len(reasons(m)) == 3


def test_a_slot_gives_up_after_max_replacements_in_a_row(tmp_path, videos):
    """Of 40 missing files, the first slot tries its own and 20 replacements (MAX_REPLACEMENTS),
    each quarantined once, then the batch fails loudly instead of searching on."""
    from dali_pipes.loader import MAX_REPLACEMENTS
    probe = entry(videos, "derived_juggle_vp9.webm", 0)[2]
    cfg, m = one_dataset(tmp_path, [(tmp_path / f"gone{i}.webm", i % 3, probe) for i in range(40)],
                         batch_size=1)
    loader = build_train_loader(cfg, 8, CROP)
    with pytest.raises(RuntimeError, match=f"batch 0 of epoch 0: {MAX_REPLACEMENTS} replacement "
                                           "videos failed in a row"):
        list(loader.epoch(0))
    loader.close()
    rows = read_quarantine(m)
    assert loader.num_quarantined == len(rows) == MAX_REPLACEMENTS + 1 == 21
    assert len({r["path"] for r in rows}) == len(rows)  # no file tried twice


def test_a_fallback_decode_past_its_timeout_is_retried_then_quarantined(tmp_path, videos):
    """H.264 goes through the PyAV fallback on a CPU machine; its decode checks the clock
    between frames and gives up past data.decode_timeout (twice: a loaded machine gets a second
    chance), while the DALI-decoded files of the batch go through."""
    entries = [entry(videos, "carphone_qcif_176x144.mp4", 1), entry(videos, "derived_juggle_vp9.webm", 0),
               entry(videos, "derived_juggle_mjpeg.avi", 2), entry(videos, "bbb_vp8_vorbis_1s.webm", 0)]
    cfg, m = one_dataset(tmp_path, entries, batch_size=4, decode_timeout=1e-4)
    loader, batches = run_epoch(cfg)
    assert reasons(m) == {"carphone_qcif_176x144.mp4": "decode timeout after 0 s"}
    assert loader.num_quarantined == 1 and 1 not in batches[0].labels.tolist()
    with pytest.raises(decode_av.DecodeTimeout, match="decode timeout"):
        decode_av.decode_frames(str(videos / "carphone_qcif_176x144.mp4"), [100], timeout=1e-4)
    # the same decode with time enough returns the frame
    assert decode_av.decode_frames(str(videos / "carphone_qcif_176x144.mp4"), [100]).shape == (1, 144, 176, 3)


def test_resume_with_another_world_size_continues_with_the_unseen_samples(tmp_path, videos):
    entries = [entry(videos, "derived_juggle_vp9.webm", i % 3) for i in range(16)]
    cfg, _ = one_dataset(tmp_path, entries, batch_size=2)
    seen = []
    for rank in range(2):  # 2 ranks x 2 steps x 2 clips
        ld = build_train_loader(cfg, 8, CROP, rank=rank, world_size=2)
        it = ld.epoch(0)
        seen += [int(s) for _ in range(2) for s in next(it).sample_ids]
        state = ld.state_dict()
        it.close()
    assert state == {"epoch": 0, "samples": 8, "quarantined": 0}
    solo = build_train_loader(cfg, 8, CROP, world_size=1)
    solo.load_state_dict(state)
    rest = [int(s) for b in solo.epoch(0) for s in b.sample_ids]
    assert sorted(seen) == list(range(8)) and rest == list(range(8, 16))
    odd = build_train_loader(cfg.__class__(**{**cfg.__dict__}), 8, CROP, world_size=3)
    with pytest.raises(ValueError, match="not a whole number of steps"):
        odd.load_state_dict({"epoch": 0, "samples": 8})


def _train(cwd, *args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", str(DEMO), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env, **kw)


def _start(cwd, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--cfg", str(DEMO), *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(run_dir: Path, proc, step: int, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(json.loads(ln)["step"] >= step for ln in path.read_text().splitlines()
                                  if ln.strip()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def test_ctrl_c_saves_and_a_second_one_exits_at_once(demo_root):
    run_dir = demo_root / "runs" / "ctrl_c"
    args = [f"train.output_dir={run_dir}", "train.log_every=1", "train.ckpt_every=1000",
            "train.max_steps=40", *FAST, *NO_VAL]
    proc = _start(demo_root, *args)
    _wait_for_step(run_dir, proc, 2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGINT: saving a checkpoint" in out and "stop signal" in out and "Traceback" not in out
    assert runtime.load_checkpoint(runtime.list_checkpoints(str(run_dir))[-1])["step"] >= 2
    proc = _start(demo_root, *args)  # resumes; two Ctrl-C in a row leave at once, unsaved
    _wait_for_step(run_dir, proc, 4)
    saved = runtime.list_checkpoints(str(run_dir))
    # Presses 20 ms apart, well within a training step, until it leaves: two SIGINTs that
    # arrive before Python's handler runs (the main thread inside a long torch call) are one.
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted: exiting without saving" in out
    assert "Traceback" not in out, out[-3000:]  # the presses after the second are ignored
    assert runtime.list_checkpoints(str(run_dir)) == saved


def test_sigterm_during_evaluation_stops_it_and_the_resume_evaluates_first(demo_root):
    run_dir = demo_root / "runs" / "eval_stop"
    args = [f"train.output_dir={run_dir}", "optim.epochs=1", "train.eval_every=1",
            "data.eval_batch_size=1", "data.datasets.0.test_views=[8,1]", *FAST[:2]]
    proc = _start(demo_root, *args)
    deadline = time.time() + 300
    out = ""
    while time.time() < deadline:  # wait for the first evaluation progress line
        line = proc.stdout.readline()
        out += line
        if "evaluating shapecolor" in line or line == "":
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out += rest
    assert proc.returncode == 0, out[-3000:]
    assert "stop signal" in out and not (run_dir / "eval.json").exists()
    assert runtime.load_checkpoint(runtime.list_checkpoints(str(run_dir))[-1])["eval_pending"]
    r = _train(demo_root, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (run_dir / "eval.json").is_file()
    assert "shapecolor: top-1" in r.stdout


def test_log_and_checkpoint_periods_of_zero(demo_root):
    run_dir = demo_root / "runs" / "zero_periods"
    r = _train(demo_root, f"train.output_dir={run_dir}", "train.log_every=0", "train.ckpt_every=0",
               *FAST, *NO_VAL)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ckpts = [runtime.checkpoint_step(p) for p in runtime.list_checkpoints(str(run_dir))]
    assert len(steps) == 2 and steps == ckpts  # both at the two epoch ends


# ------------------------------------------------------------------- checkpoints and disk ---

def test_unreadable_newer_checkpoint_is_set_aside_and_new_ones_survive(demo_root):
    run_dir = demo_root / "runs" / "unreadable"
    args = [f"train.output_dir={run_dir}", "train.keep_ckpts=1", "train.ckpt_every=2",
            *FAST, *NO_VAL]
    assert _train(demo_root, *args, "train.max_steps=4").returncode == 0
    (run_dir / "ckpt_00000900.pt").write_bytes(b"not a checkpoint")  # e.g. copied from a full disk
    r = _train(demo_root, *args, "train.max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert [p.name for p in map(Path, runtime.list_checkpoints(str(run_dir)))] == ["ckpt_00000006.pt"]
    assert (run_dir / "ckpt_00000900.pt.unreadable").is_file()


def test_resume_none_moves_an_earlier_run_aside(demo_root):
    run_dir = demo_root / "runs" / "fresh"
    args = [f"train.output_dir={run_dir}", *FAST, *NO_VAL]
    assert _train(demo_root, *args, "train.max_steps=4", "train.ckpt_every=2").returncode == 0
    r = _train(demo_root, *args, "train.max_steps=2", "--resume", "none")
    assert r.returncode == 0 and "the earlier run in" in r.stdout
    aside = [p for p in run_dir.parent.iterdir() if p.name.startswith("fresh.")]
    assert len(aside) == 1 and (aside[0] / "ckpt_00000004.pt").is_file()
    assert [runtime.checkpoint_step(p) for p in runtime.list_checkpoints(str(run_dir))] == [2]


def test_resume_from_an_older_checkpoint_sets_later_ones_aside(tmp_path):
    for step in (2, 4, 6):
        runtime.atomic_save({"step": step}, str(tmp_path / f"ckpt_{step:08d}.pt"))
    moved = runtime.set_aside_later(str(tmp_path), 2)
    assert [Path(p).name for p in moved] == ["ckpt_00000004.pt", "ckpt_00000006.pt"]
    assert [runtime.checkpoint_step(p) for p in runtime.list_checkpoints(str(tmp_path))] == [2]
    assert (tmp_path / "ckpt_00000006.pt.superseded").is_file()


def test_full_disk_keeps_the_last_checkpoint_and_says_how_much_was_needed(tmp_path, monkeypatch):
    runtime.atomic_save({"step": 2}, str(tmp_path / "ckpt_00000002.pt"))

    def disk_full(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(runtime.RunError, match=r"disk full writing .*ckpt_00000004.pt: about "
                                               r"0.\d+ GiB needed.*last complete checkpoint is .*ckpt_00000002.pt"):
        runtime.atomic_save({"step": 4, "w": torch.zeros(1000)}, str(tmp_path / "ckpt_00000004.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000002.pt"]  # no partial file


def test_stale_partial_files_are_removed_at_start(tmp_path):
    (tmp_path / ".ckpt_00000010.pt.4242.tmp").write_bytes(b"half")
    runtime.atomic_save({"step": 8}, str(tmp_path / "ckpt_00000008.pt"))
    notes = runtime.prepare_run_dir(str(tmp_path), fresh=False)
    assert notes and not list(tmp_path.glob(".ckpt_*.tmp"))
    assert runtime.list_checkpoints(str(tmp_path))


def test_metrics_rows_after_the_resumed_step_are_dropped_and_nan_is_null(tmp_path):
    from train import Logger
    env = runtime.Env(0, 1, 0, torch.device("cpu"))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss/total": 1.0}) + "\n"
                                                    for s in (2, 4, 6)) + '{"step": 8, "lo')
    logger = Logger(env, str(tmp_path), resumed_step=4)
    logger.step(6, {"loss/total": float("nan"), "lr": 1e-3})
    logger.close()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[-1]["loss/total"] is None and rows[-1]["nonfinite"] == ["loss/total"]
