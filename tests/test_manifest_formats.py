"""build_manifest on each official annotation format, broken files and the probe cache."""
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dali_pipes.manifest import (ManifestError, append_quarantine, build_manifest,
                                 load_manifest, main, read_class_file, ssv2_class_name)
from helpers import break_file

# Small, quick-to-probe real clips (each decodes in a few ms).
CLIP = "carphone_qcif_176x144.mp4"
CLIP2 = "k400_pool_cleaning_1s_32f.mp4"
WEBM = "derived_juggle_vp9.webm"


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst


def _read(out: Path):
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    quarantine = [json.loads(line) for line in
                  (out / "quarantine.jsonl").read_text().splitlines()]
    return manifest, quarantine


def _build(*args, **kwargs):
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return build_manifest(*args, **kwargs)


def _assert_balanced(summary, out):
    manifest, quarantine = _read(out)
    assert summary["num_rows"] == len(manifest) + len(quarantine)
    assert (summary["num_samples"], summary["num_quarantined"]) == (len(manifest),
                                                                    len(quarantine))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == len(manifest)
    assert meta["num_quarantined"] == len(quarantine)
    return manifest, quarantine


# ---------------------------------------------------------------- kinetics

def test_kinetics(shared_videos, tmp_path):
    root = tmp_path / "videos"
    nested = _link(shared_videos / CLIP, root / "arm wrestling" / "abc_000010_000020.mp4")
    flat = _link(shared_videos / WEBM, root / "xyz-_12_000003_000013.webm")
    _link(shared_videos / CLIP2, root / "zumba" / "val1_000000_000010.mp4")
    csv = tmp_path / "k.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\n"
                   "arm wrestling,abc,10,20,train\n"
                   "zumba,xyz-_12,3.0,13.0,train\n"        # float times, flat layout
                   "abseiling,gone,0,10,train\n"           # file missing
                   "zumba,val1,0,10,val\n")                # other split: not counted
    out = tmp_path / "m"
    summary = _build("kinetics", csv, root, out, split="train")
    manifest, quarantine = _assert_balanced(summary, out)
    assert summary["num_rows"] == 3
    classes = json.loads((out / "classes.json").read_text())
    assert classes == ["abseiling", "arm wrestling", "zumba"]  # sorted, all splits
    assert [(m["path"], m["label"], m["class_name"]) for m in manifest] == [
        (str(nested), 1, "arm wrestling"), (str(flat), 2, "zumba")]
    assert manifest[0]["start"] is None and manifest[0]["probe"]["num_frames"] == 120
    assert len(quarantine) == 1 and "not found" in quarantine[0]["reason"]
    assert "gone_000000_000010" in quarantine[0]["reason"]
    assert quarantine[0]["source"] == "manifest"


def test_kinetics_labels_file_and_unknown_label(shared_videos, tmp_path):
    root = tmp_path / "videos"
    _link(shared_videos / CLIP, root / "b" / "v1_000000_000010.mp4")
    _link(shared_videos / CLIP, root / "c" / "v2_000000_000010.mp4")
    csv = tmp_path / "k.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\n"
                   "b,v1,0,10,train\nc,v2,0,10,train\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    out = tmp_path / "m"
    summary = _build("kinetics", csv, root, out, labels=labels)
    manifest, quarantine = _assert_balanced(summary, out)
    assert [m["label"] for m in manifest] == [1]
    assert "'c' is not in the class list" in quarantine[0]["reason"]


def test_kinetics_bad_header(tmp_path):
    csv = tmp_path / "k.csv"
    csv.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ManifestError, match="youtube_id"):
        _build("kinetics", csv, tmp_path, tmp_path / "m")


def test_kinetics_unterminated_quote_loses_no_row(shared_videos, tmp_path):
    root = tmp_path / "videos"
    for n in (1, 2, 3, 4):
        _link(shared_videos / CLIP, root / "b" / f"v{n}_000000_000010.mp4")
    csv = tmp_path / "k.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\n"
                   "b,v1,0,10,train\n"
                   '"b,v2,0,10,train\n'                    # the quote never closes
                   "b,v3,0,10,train\n"
                   "\n"
                   "b,v4,0,10,train,extra\n")               # one field too many
    out = tmp_path / "m"
    summary = _build("kinetics", csv, root, out)
    manifest, quarantine = _assert_balanced(summary, out)
    assert summary["num_rows"] == 4
    assert [Path(m["path"]).name for m in manifest] == ["v1_000000_000010.mp4",
                                                        "v3_000000_000010.mp4"]
    assert [q["entry"] for q in quarantine] == ["line 3", "line 6"]
    assert "unterminated quote" in quarantine[0]["reason"]
    assert "6 fields" in quarantine[1]["reason"] and "header has 5" in quarantine[1]["reason"]


def test_kinetics_split_column_needs_split(shared_videos, tmp_path):
    csv = tmp_path / "k.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\n"
                   "a,v1,0,10,train\nb,v2,0,10,val\nb,v3,0,10,train\n")
    with pytest.raises(ManifestError) as err:
        _build("kinetics", csv, tmp_path, tmp_path / "m")
    msg = str(err.value)
    assert str(csv) in msg and "--split" in msg
    assert "train: 2 rows" in msg and "val: 1 row" in msg
    summary = _build("kinetics", csv, tmp_path, tmp_path / "m", split="val")
    assert summary["num_rows"] == 1
    # Label indices stay those of all splits.
    assert json.loads((tmp_path / "m" / "classes.json").read_text()) == ["a", "b"]


# ---------------------------------------------------------------- ssv2

def test_ssv2(shared_videos, tmp_path):
    root = tmp_path / "videos"
    _link(shared_videos / WEBM, root / "1.webm")
    _link(shared_videos / WEBM, root / "2.webm")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"Pushing something from left to right": "1",
                                  "Holding something": 0}))
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([
        {"id": "1", "label": "pushing a cup from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
        {"id": "2", "label": "holding a pen", "template": "Holding [something]",
         "placeholders": ["a pen"]},
        {"id": "3", "label": "holding x", "template": "Holding [something]",
         "placeholders": ["x"]},                                  # no file
        {"id": "1", "template": "Juggling [something]"},          # unknown template
        {"id": "2"},                                              # test-set row, no label
    ]))
    out = tmp_path / "m"
    summary = _build("ssv2", ann, root, out, labels=labels)
    manifest, quarantine = _assert_balanced(summary, out)
    assert json.loads((out / "classes.json").read_text()) == [
        "Holding something", "Pushing something from left to right"]
    assert [(Path(m["path"]).name, m["label"]) for m in manifest] == [("1.webm", 1),
                                                                      ("2.webm", 0)]
    reasons = [q["reason"] for q in quarantine]
    assert len(reasons) == 3
    assert any("not found" in r for r in reasons)
    assert any("Juggling something" in r for r in reasons)
    assert any("no label" in r for r in reasons)
    # ssv2 shares one file between rows; it is probed once.
    assert summary["probed"] == 2


def test_ssv2_template_normalisation():
    assert ssv2_class_name("Putting [something] on top of [something]") == \
        "Putting something on top of something"
    assert ssv2_class_name("Moving [part] of [something]") == "Moving part of something"


def test_ssv2_needs_labels(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(ManifestError, match="--labels"):
        _build("ssv2", tmp_path / "a.json", tmp_path, tmp_path / "m")


# ---------------------------------------------------------------- moments in time

@pytest.mark.parametrize("header", [False, True])
@pytest.mark.parametrize("category_style", ["name,index", "name"])
def test_mit(shared_videos, tmp_path, header, category_style):
    root = tmp_path / "videos"
    _link(shared_videos / CLIP, root / "clapping" / "a.mp4")
    _link(shared_videos / CLIP2, root / "running" / "b.mp4")
    cats = tmp_path / "moments_categories.txt"
    if category_style == "name,index":
        cats.write_text("running,1\nclapping,0\n")  # out of order on purpose
    else:
        cats.write_text("clapping\nrunning\n")
    csv = tmp_path / "trainingSet.csv"
    csv.write_text(("video,label,agree,disagree\n" if header else "")
                   + "clapping/a.mp4,clapping,3,0\nrunning/b.mp4,running,2,1\n"
                   + "running/c.mp4,running,3,0\n"              # missing file
                   + "clapping/a.mp4,dancing,3,0\n")            # unknown label
    out = tmp_path / "m"
    summary = _build("mit", csv, root, out, labels=cats)
    manifest, quarantine = _assert_balanced(summary, out)
    assert summary["num_rows"] == 4
    assert json.loads((out / "classes.json").read_text()) == ["clapping", "running"]
    assert [(Path(m["path"]).name, m["label"], m["class_name"]) for m in manifest] == [
        ("a.mp4", 0, "clapping"), ("b.mp4", 1, "running")]
    reasons = sorted(q["reason"] for q in quarantine)
    assert len(reasons) == 2 and "'dancing'" in reasons[0] and "not found" in reasons[1], reasons
    assert "running/c.mp4" in reasons[1]


def test_mit_first_row_with_another_extension_is_data(shared_videos, tmp_path):
    root = tmp_path / "videos"
    _link(shared_videos / CLIP, root / "clapping" / "a.mpeg")
    _link(shared_videos / CLIP2, root / "running" / "b.mp4")
    csv = tmp_path / "trainingSet.csv"
    csv.write_text("clapping/a.mpeg,clapping,3,0\nrunning/b.mp4,running,2,1\n"
                   '"running/c.mp4,running,3,0\nrunning/b.mp4,running,1,0\n')
    out = tmp_path / "m"
    summary = _build("mit", csv, root, out)
    manifest, quarantine = _assert_balanced(summary, out)
    assert summary["num_rows"] == 4
    assert [(Path(m["path"]).name, m["class_name"]) for m in manifest] == [
        ("a.mpeg", "clapping"), ("b.mp4", "running"), ("b.mp4", "running")]
    assert [(q["entry"], "unterminated quote" in q["reason"]) for q in quarantine] == [
        ("line 3", True)]


# ---------------------------------------------------------------- activitynet

def test_activitynet(shared_videos, tmp_path):
    root = tmp_path / "videos"
    _link(shared_videos / "sam2_juggle_720p24.mp4", root / "v_vidA.mp4")   # 10.29 s
    _link(shared_videos / CLIP, root / "vidB.mp4")                         # 4.0 s, no v_
    ann = tmp_path / "activity_net.json"
    ann.write_text(json.dumps({"version": "1.3", "database": {
        "vidA": {"subset": "training", "duration": 10.3, "url": "u", "annotations": [
            {"segment": [1.0, 3.5], "label": "Juggling balls"},
            {"segment": [5.0, 11.0], "label": "Juggling balls"}]},      # end clamped
        "vidB": {"subset": "training", "duration": 4.0, "url": "u", "annotations": [
            {"segment": [0.5, 2.0], "label": "Clapping"},
            {"segment": [6.0, 8.0], "label": "Clapping"}]},             # after the end
        "vidC": {"subset": "training", "duration": 3.0, "url": "u", "annotations": [
            {"segment": [0.0, 1.0], "label": "Clapping"}]},             # no file
        "vidD": {"subset": "validation", "duration": 3.0, "url": "u", "annotations": [
            {"segment": [0.0, 1.0], "label": "Zorbing"}]},              # other subset
    }}))
    out = tmp_path / "m"
    summary = _build("activitynet", ann, root, out, split="train")  # alias of training
    manifest, quarantine = _assert_balanced(summary, out)
    assert summary["num_rows"] == 5
    assert json.loads((out / "classes.json").read_text()) == ["Clapping", "Juggling balls",
                                                              "Zorbing"]
    got = [(Path(m["path"]).name, m["label"], m["start"], round(m["end"], 2))
           for m in manifest]
    assert got == [("v_vidA.mp4", 1, 1.0, 3.5), ("v_vidA.mp4", 1, 5.0, 10.29),
                   ("vidB.mp4", 0, 0.5, 2.0)]
    reasons = sorted(q["reason"] for q in quarantine)
    assert reasons[0] == "segment starts at 6.0 s, after the video's end (4.00 s)"
    assert reasons[1].startswith("video file not found") and "vidC.*" in reasons[1]
    assert summary["probed"] == 2


# ---------------------------------------------------------------- list + broken files

def test_list_with_real_and_broken_files(shared_videos, tmp_path):
    real = sorted(p for p in shared_videos.iterdir() if p.suffix in (".mp4", ".webm", ".avi"))
    bad = tmp_path / "bad"
    break_file(bad / "zero.mp4", "empty")
    break_file(bad / "text.mp4", "text")
    for name in ("sam2_juggle_720p24.mp4", "k400_arm_wrestling_340x256.mp4"):
        break_file(bad / f"trunc_{name}", "truncated", src=shared_videos / name, fraction=0.3)
    break_file(bad / "garbage.mp4", "garbage", src=shared_videos / CLIP)
    # each broken file and the words its quarantine row must give
    broken = {"zero.mp4": "file is empty (0 bytes)",
              "text.mp4": "not a readable media file",
              # index up front: the header's 247 frames are promised, 34 decode
              "trunc_sam2_juggle_720p24.mp4": "header claims 247 frames but only 34 decode",
              # index at the end: gone with the tail
              "trunc_k400_arm_wrestling_340x256.mp4": "moov atom not found",
              "missing.mp4": "does not exist"}
    lines = [f"{p} {i % 3}" for i, p in enumerate(real)]
    lines += [f"bad/{name},1" for name in broken] + ["bad/garbage.mp4 2"]
    ann = tmp_path / "list.txt"
    ann.write_text("\n".join(lines) + "\n")
    out = tmp_path / "m"
    summary = _build("list", ann, tmp_path, out, workers=2)
    manifest, quarantine = _assert_balanced(summary, out)
    assert summary["num_rows"] == len(real) + len(broken) + 1
    in_manifest = {m["path"] for m in manifest}
    in_quarantine = {q["path"]: q["reason"] for q in quarantine}
    assert {str(p) for p in real} <= in_manifest
    for name, words in broken.items():
        assert words in in_quarantine[str(bad / name)], (name, in_quarantine[str(bad / name)])
    assert all(q["source"] == "manifest" for q in quarantine)
    # Garbage in the middle may or may not still decode; it must land in exactly one file.
    garbage = str(bad / "garbage.mp4")
    assert (garbage in in_manifest) != (garbage in in_quarantine)
    if garbage in in_manifest:
        rec = next(m for m in manifest if m["path"] == garbage)
        assert rec["probe"]["num_frames"] > 0 and rec["label"] == 2
    assert json.loads((out / "classes.json").read_text()) == ["0", "1", "2"]


def test_list_label_errors(shared_videos, tmp_path, capsys):
    ann = tmp_path / "list.txt"
    ann.write_text(f"{shared_videos / CLIP} 0\n{shared_videos / CLIP2} -1\n"
                   f"{shared_videos / CLIP} dog\n{shared_videos / WEBM} -2\n")
    out = tmp_path / "m"
    summary = _build("list", ann, tmp_path, out)
    manifest, quarantine = _assert_balanced(summary, out)
    assert [(m["label"], m["class_name"]) for m in manifest] == [(0, "0")]
    assert [q["entry"] for q in quarantine] == ["line 2", "line 3", "line 4"]
    assert "outside 0..0" in quarantine[0]["reason"]
    assert "not an integer" in quarantine[1]["reason"]
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "outside" in line] == [
        f"warning: {ann}: 2 rows have a label index outside 0..0 (e.g. line 2: -1); they are "
        "quarantined"]


def test_list_label_outside_labels_file_is_refused(shared_videos, tmp_path):
    ann = tmp_path / "list.txt"
    ann.write_text(f"{shared_videos / CLIP} 0\n{shared_videos / CLIP} 5\n"
                   f"{shared_videos / CLIP} 1\n{shared_videos / CLIP} 2\n")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(ManifestError) as err:
        _build("list", ann, tmp_path, tmp_path / "m", labels=names)
    msg = str(err.value)
    assert msg.startswith(f"{ann}: line 2: label index 5 is outside 0..1")
    assert str(names) in msg and "2 such rows" in msg
    assert not (tmp_path / "m" / "manifest.jsonl").exists()


def test_duplicate_rows_are_counted(shared_videos, tmp_path, capsys):
    ann = tmp_path / "list.txt"
    ann.write_text(f"{CLIP} 0\n{CLIP2} 1\n{CLIP} 0\n{CLIP} 1\n{CLIP} 0\n")
    out = tmp_path / "m"
    manifest, _ = _assert_balanced(_build("list", ann, shared_videos, out), out)
    assert len(manifest) == 5  # kept: the warning says they weigh more, nothing is lost
    err = [line for line in capsys.readouterr().err.splitlines() if "duplicate" in line]
    assert len(err) == 1
    assert err[0].startswith(f"warning: {ann}: 2 duplicate annotation rows ")
    assert "line 3 repeats line 1" in err[0]


@pytest.mark.parametrize("fmt,text", [
    ("kinetics", "label,youtube_id,time_start,time_end,split\n"),
    ("mit", "video,label,agree,disagree\n"),
    ("list", "\n# nothing yet\n"),
])
def test_header_only_annotations_warn(tmp_path, capsys, fmt, text):
    ann = tmp_path / "ann.csv"
    ann.write_text(text)
    summary = _build(fmt, ann, tmp_path, tmp_path / "m")
    assert summary["num_rows"] == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert err == [f"warning: {ann}: no annotation rows (only a header or comments?); the "
                   "manifest is empty"]


def test_decode_errors_quarantined_unless_kept(shared_videos, garbage_vp9, tmp_path):
    root = garbage_vp9.parent
    shutil.copy(shared_videos / WEBM, root / "clean.webm")
    ann = tmp_path / "list.txt"
    ann.write_text(f"clean.webm 0\n{garbage_vp9.name} 1\n")
    out = tmp_path / "m"
    manifest, quarantine = _assert_balanced(_build("list", ann, root, out), out)
    assert [(Path(m["path"]).name, m["probe"]["decode_errors"]) for m in manifest] == [
        ("clean.webm", [])]
    assert [(q["path"], q["entry"]) for q in quarantine] == [(str(garbage_vp9), "line 2")]
    assert quarantine[0]["reason"].startswith("decode errors: matroska,webm: ")
    # The flag only changes the decision, so the cached probes are reused.
    assert main(["list", "--annotations", str(ann), "--root", str(root), "--out", str(out),
                 "--workers", "1", "--keep-decode-errors"]) == 0
    manifest, quarantine = _read(out)
    assert quarantine == []
    kept = {Path(m["path"]).name: m["probe"]["decode_errors"] for m in manifest}
    assert kept["clean.webm"] == [] and kept[garbage_vp9.name][0].startswith("matroska")
    assert json.loads((out / "meta.json").read_text())["keep_decode_errors"] is True


# ---------------------------------------------------------------- wrongly typed JSON

def _anet(entry) -> dict:
    return {"version": "1.3", "database": {"ok": {"subset": "training", "annotations": []},
                                           "v1": entry}}


@pytest.mark.parametrize("fmt,data,where,what", [
    ("ssv2", [{"id": "1"}, "12345"], "entry 1", "got a string"),
    ("ssv2", [None], "entry 0", "got null"),
    ("ssv2", [{"id": "1", "template": ["Holding [something]"]}], "entry 0",
     "'template' must be a string, got a list"),
    ("ssv2", [{"id": {"n": 1}, "template": "Holding [something]"}], "entry 0",
     "'id' must be a string or a number, got an object"),
    ("activitynet", _anet("training"), "entry 1 (video 'v1')", "got a string"),
    ("activitynet", _anet(None), "entry 1 (video 'v1')", "got null"),
    ("activitynet", _anet({"subset": "training", "annotations": {"segment": [0, 1]}}),
     "entry 1 (video 'v1')", "'annotations' must be a list, got an object"),
    ("activitynet", _anet({"subset": "training", "annotations": [None]}),
     "entry 1 (video 'v1') annotation 0", "got null"),
    ("activitynet", _anet({"subset": "training", "annotations": [{"segment": [0, 1],
                                                                  "label": 3}]}),
     "entry 1 (video 'v1') annotation 0", "'label' must be a string, got a number"),
    ("activitynet", {"database": {"v1": {"subset": ["training"], "annotations": []}}},
     "entry 0 (video 'v1')", "'subset' must be a string, got a list"),
])
def test_wrongly_typed_json_is_one_error_line(tmp_path, capsys, fmt, data, where, what):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"Holding something": "0"}))
    argv = [fmt, "--annotations", str(ann), "--root", str(tmp_path), "--out",
            str(tmp_path / "m"), "--labels", str(labels), "--split", "training"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {ann}: {where}: ") and what in err, err
    assert not (tmp_path / "m" / "manifest.jsonl").exists()


# ---------------------------------------------------------------- processes and links

def _stat(pid: int):
    """(ppid, state, start time) of a process from /proc, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _family(pid: int) -> dict[int, tuple[int, int]]:
    """Descendants of pid: {pid: (start time, depth)}; children have depth 1."""
    stats = {int(d): _stat(int(d)) for d in os.listdir("/proc") if d.isdigit()}
    found, frontier, depth = {}, {pid}, 0
    while frontier:
        depth += 1
        kids = {p for p, st in stats.items() if st and st[0] in frontier and p not in found}
        found.update({p: (stats[p][2], depth) for p in kids})
        frontier = kids
    return found


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    # A zombie has finished; nobody may reap orphans in a container.
    return st is not None and st[1] != "Z" and st[2] == start


def _has_video_open(pid: int) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").endswith(".mp4")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _wait_for_probe_children(proc, depth: int) -> dict[int, int]:
    """{pid: start time} of the builder's descendants once a probe child reads a video
    (so past its start-up, where it arranges to die with its parent)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        family = _family(proc.pid)
        if any(d == depth and _has_video_open(p) for p, (_, d) in family.items()):
            return {p: start for p, (start, _) in family.items()}
        time.sleep(0.01)
    raise AssertionError("the builder never started a probe child")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
@pytest.mark.parametrize("workers", [1, 2], ids=["in-builder", "pool"])
def test_stopped_builder_leaves_no_probe_process(shared_videos, tmp_path, sig, workers):
    ann = tmp_path / "list.txt"
    ann.write_text("".join(f"{i}.mp4 0\n" for i in range(12)))
    for i in range(12):
        _link(shared_videos / "sam2_juggle_720p24.mp4", tmp_path / f"{i}.mp4")
    repo = Path(__file__).resolve().parent.parent
    # Files, not pipes: orphans would hold a pipe open and hang the test instead.
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dali_pipes.manifest", "list", "--annotations", str(ann),
             "--root", str(tmp_path), "--out", str(tmp_path / "m"), "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "PYTHONPATH": str(repo)})
    family = {}
    try:
        # Probe children are forked by the builder itself (1 worker) or by pool workers.
        family = _wait_for_probe_children(proc, depth=1 if workers == 1 else 2)
        # Frozen, a probe cannot finish on its own while we watch; only a kill ends it.
        for p in family:
            _signal_quietly(p, signal.SIGSTOP)
        proc.send_signal(sig)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(*ps) for ps in family.items()):
            time.sleep(0.05)
        assert [p for p, start in family.items() if _alive(p, start)] == []
    finally:
        proc.kill()
        for p, start in family.items():
            if _alive(p, start):
                _signal_quietly(p, signal.SIGKILL)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert "SIGTERM" in (tmp_path / "stderr.txt").read_text()
    assert not (tmp_path / "m" / "manifest.jsonl").exists()


def _signal_quietly(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it finished meanwhile


def test_symlink_loop_indexes_each_file_once(shared_videos, tmp_path):
    root = tmp_path / "videos"
    _link(shared_videos / WEBM, root / "sub" / "vid.webm")
    os.symlink(root, root / "sub" / "loop")
    elsewhere = tmp_path / "elsewhere"
    _link(shared_videos / WEBM, elsewhere / "other.webm")
    os.symlink(elsewhere, root / "ext")    # a link out of the root is still followed...
    os.symlink(elsewhere, root / "ext2")   # ...once
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"Holding something": 0}))
    ann = tmp_path / "ssv2.json"
    ann.write_text(json.dumps([{"id": i, "template": "Holding [something]"}
                               for i in ("vid", "other")]))
    out = tmp_path / "m"
    manifest, _ = _assert_balanced(_build("ssv2", ann, root, out, labels=labels), out)
    assert [m["path"] for m in manifest] == [str(root / "sub" / "vid.webm"),
                                             str(root / "ext" / "other.webm")]


# ---------------------------------------------------------------- cache

def test_probe_cache_reuse_and_invalidation(shared_videos, tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    for i, name in enumerate((CLIP, CLIP2, WEBM)):
        shutil.copy(shared_videos / name, root / f"v{i}{Path(name).suffix}")
    ann = tmp_path / "list.txt"
    ann.write_text("v0.mp4 0\nv1.mp4 1\nv2.webm 0\nv0.mp4 1\n")  # v0 twice: probed once
    out = tmp_path / "m"
    first = _build("list", ann, root, out)
    assert (first["probed"], first["reused"]) == (3, 0)
    before = _read(out)
    second = _build("list", ann, root, out)
    assert (second["probed"], second["reused"]) == (0, 3)
    assert _read(out) == before  # cached probes give the same records
    # Replace one file with different content: only that file is probed again.
    shutil.copy(shared_videos / "mmpose_street_5fps_5f.mp4", root / "v1.mp4")
    third = _build("list", ann, root, out)
    assert (third["probed"], third["reused"]) == (1, 2)
    manifest, _ = _read(out)
    assert [m["probe"]["num_frames"] for m in manifest] == [120, 5, 72, 120]


# ---------------------------------------------------------------- helpers and CLI

def test_read_class_file_styles(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("b,1\na,0\n")
    assert read_class_file(f) == ["a", "b"]
    f.write_text("arm wrestling\nzumba\n")
    assert read_class_file(f) == ["arm wrestling", "zumba"]
    f.write_text('["x", "y"]')
    assert read_class_file(f) == ["x", "y"]
    f.write_text('{"y": "1", "x": "0"}')
    assert read_class_file(f) == ["x", "y"]
    f.write_text("a,0\nb,2\n")
    with pytest.raises(ManifestError, match="without gaps"):
        read_class_file(f)


def test_load_manifest(shared_videos, tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "python -m dali_pipes.manifest" in str(err.value)
    ann = tmp_path / "l.txt"
    ann.write_text(f"{shared_videos / CLIP} 0\n")
    _build("list", ann, tmp_path, tmp_path / "m")
    records, classes = load_manifest(tmp_path / "m")
    assert classes == ["0"] and records[0]["path"] == str(shared_videos / CLIP)


def _append_many(args):
    directory, worker = args
    for i in range(50):
        append_quarantine(directory, f"/v/{worker}_{i}.mp4", "x" * 300, "train")


def test_append_quarantine_from_processes(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(str(tmp_path), w) for w in range(4)])
    rows = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 200
    assert {r["path"] for r in rows} == {f"/v/{w}_{i}.mp4" for w in range(4) for i in range(50)}
    assert all(r["source"] == "train" and r["reason"] == "x" * 300 for r in rows)


def test_rebuild_keeps_training_quarantine_rows(shared_videos, tmp_path):
    ann = tmp_path / "l.txt"
    ann.write_text(f"{shared_videos / CLIP} 0\n{tmp_path / 'missing.mp4'} 0\n")
    out = tmp_path / "m"
    _build("list", ann, tmp_path, out)
    append_quarantine(out, "/some/clip.mp4", "decoder failed", "dali")
    _build("list", ann, tmp_path, out)
    _, quarantine = _read(out)
    assert sorted(q["source"] for q in quarantine) == ["dali", "manifest"]


def test_rebuild_reprobes_files_quarantined_by_training(shared_videos, tmp_path, capsys):
    root = tmp_path / "videos"
    root.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        shutil.copy(shared_videos / CLIP, root / name)
    ann = tmp_path / "list.txt"
    ann.write_text("a.mp4 0\nb.mp4 0\nc.mp4 0\n")
    out = tmp_path / "m"
    _build("list", ann, root, out)
    for name, source in (("a.mp4", "train"), ("b.mp4", "eval")):
        append_quarantine(out, root / name, "decoder failed", source)
    append_quarantine(out, "/elsewhere/x.mp4", "decoder failed", "train")  # not annotated
    # b breaks without a new size or mtime, so only ignoring its cache entry finds it out.
    st = (root / "b.mp4").stat()
    (root / "b.mp4").write_bytes(b"\0" * st.st_size)
    os.utime(root / "b.mp4", ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    summary = _build("list", ann, root, out)
    manifest, quarantine = _read(out)
    assert summary["probed"] == 2 and summary["reused"] == 1
    assert [Path(m["path"]).name for m in manifest] == ["a.mp4", "c.mp4"]
    rows = sorted((q["path"], q["source"]) for q in quarantine)
    assert rows == [("/elsewhere/x.mp4", "train"), (str(root / "b.mp4"), "manifest")]
    assert "not a readable media file" in next(q["reason"] for q in quarantine
                                               if q["source"] == "manifest")
    assert (summary["reprobed_run_quarantine"], summary["restored"]) == (2, 1)
    err = capsys.readouterr().err
    assert "re-probed 2 files quarantined by training/eval runs: 1 back in the manifest, " \
           "1 still quarantined" in err
    # Nothing left to re-probe: the next rebuild reuses every probe and says nothing.
    again = _build("list", ann, root, out)
    assert (again["probed"], again["reprobed_run_quarantine"]) == (0, 0)
    assert "re-probed" not in capsys.readouterr().err


def test_cli(shared_videos, tmp_path):
    ann = tmp_path / "l.txt"
    ann.write_text(f"{shared_videos / CLIP},0\n")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    ok = subprocess.run([sys.executable, "-m", "dali_pipes.manifest", "list", "--annotations",
                         str(ann), "--root", str(tmp_path), "--out", str(tmp_path / "m"),
                         "--workers", "1"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    (line,) = ok.stdout.strip().splitlines()  # one line, not a JSON dump
    assert line.startswith(f"{tmp_path / 'm'}: 1 samples, 0 quarantined, 1 classes (list")
    assert line.endswith(f"-> {tmp_path / 'm'}/manifest.jsonl")
    assert "probing 1/1" in ok.stderr
    again = subprocess.run([sys.executable, "-m", "dali_pipes.manifest", "list", "--annotations",
                            str(ann), "--root", str(tmp_path), "--out", str(tmp_path / "m"),
                            "--workers", "1", "--json"], capture_output=True, text=True, env=env)
    assert json.loads(again.stdout)["num_samples"] == 1 and json.loads(again.stdout)["reused"] == 1
    bad = subprocess.run([sys.executable, "-m", "dali_pipes.manifest", "kinetics",
                          "--annotations", str(tmp_path / "nope.csv"), "--root",
                          str(tmp_path), "--out", str(tmp_path / "m2")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "nope.csv" in bad.stderr
