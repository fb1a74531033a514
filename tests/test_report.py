"""The data report: `python -m dali_pipes.manifest report DIR ... --out OUT` (dali_pipes/report.py).

Counts in report.md are checked against what the project's own functions say record by record
(`routing.route`, `sampling.clip_indices`, `loader.frame_bounds`, the rows written to
quarantine.jsonl), on manifests of the shared real clips, of the synthetic demo and of a
generated 700,000-row manifest.
"""
import json
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dali_pipes import report, routing
from dali_pipes.manifest import append_quarantine, build_manifest, load_manifest, main, reason_kind
from dali_pipes.sampling import clip_indices
from helpers import break_file

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_REASONS = [("DecodeError: short decode: the stream ends after 3 frames", "train"),
               ("DecodeError: short decode: the stream ends after 9 frames", "train"),
               ("RuntimeError: cannot read file (EIO)", "eval")]


# ---------------------------------------------------------------- helpers

def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND", f"{path} is truncated"
    return width, height


def section(md: str, name: str) -> str:
    head = f"\n## {name}\n"
    assert head in md, f"no section {name!r} in the report"
    return md.split(head, 1)[1].split("\n## ", 1)[0]


def overview(md: str) -> str:
    return md.split("\n## ", 1)[0]


def table(text: str, first_header: str) -> dict[str, list[str]]:
    """{first cell: other cells} of the Markdown table whose header starts with first_header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def header(text: str, first_header: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {first_header} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def num(cell: str) -> int:
    return int(cell.replace(",", ""))


def routes_by_record(directory, device: str, formats) -> tuple[Counter, Counter]:
    """(route counts, PyAV reason counts) from routing.route on every record."""
    records, _ = load_manifest(directory)
    routed = [routing.route(r["probe"], device, formats) for r in records]
    return Counter(r for r, _ in routed), Counter(why for r, why in routed if r == routing.PYAV)


def name_of(directory) -> str:
    """A lone manifest folder is named by its last two path parts."""
    return "/".join(Path(directory).parts[-2:])


def run_report(dirs, out, *extra) -> str:
    assert main(["report", *map(str, dirs), "--out", str(out), *extra]) == 0
    return (Path(out) / report.REPORT_MD).read_text(encoding="utf-8")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def real_manifest(tmp_path_factory, request):
    """A "list" manifest of every shared clip, plus an empty, a truncated and a missing file
    (three builder quarantine rows), then three rows written as by training/eval runs."""
    shared = (REPO / ".." / "shared" / "videos").resolve()
    if not shared.is_dir():
        pytest.skip(f"real test videos not found at {shared}")
    root = tmp_path_factory.mktemp("real")
    break_file(root / "empty.mp4", "empty")
    break_file(root / "trunc.mp4", "truncated", src=shared / "k400_arm_wrestling_340x256.mp4",
               fraction=0.15)
    clips = sorted(p for p in shared.iterdir() if p.suffix in (".mp4", ".webm", ".avi"))
    lines = [f"{p},{k % 3}" for k, p in enumerate(clips)]
    lines += ["trunc.mp4,1", "empty.mp4,0", "missing.mp4,2"]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    out = root / "manifest"
    build_manifest("list", root / "list.txt", root, out, workers=2, progress=False)
    records, _ = load_manifest(out)
    # Two run rows name files still in the manifest, one a file that is not.
    paths = [records[0]["path"], records[1]["path"], str(root / "gone.mp4")]
    for path, (reason, source) in zip(paths, RUN_REASONS):
        append_quarantine(out, path, reason, source)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dali_pipes.synthetic import prepare_demo

    result = prepare_demo(tmp_path_factory.mktemp("demo"), workers=2, videos_per_class=1,
                          val_per_class=1, progress=False)
    return result["manifests"]


# Options of the shared report: not the defaults, so that the page must follow them.
ARCH, CLIP, STRIDE = "ampere", 16, 4


@pytest.fixture(scope="module")
def page(real_manifest, demo, tmp_path_factory):
    """One report over the real manifest and two demo manifests: (report.md text, out dir)."""
    out = tmp_path_factory.mktemp("report")
    dirs = [real_manifest, demo["shape"]["train"], demo["direction"]["train"]]
    return run_report(dirs, out, "--gpu-arch", ARCH, "--clip-frames", str(CLIP), "--stride",
                      str(STRIDE)), out


# ---------------------------------------------------------------- the report

def test_writes_a_png_per_manifest_and_a_page_listing_all(page, real_manifest, demo):
    md, out = page
    dirs = [real_manifest, demo["shape"]["train"], demo["direction"]["train"]]
    names = [name_of(real_manifest), "shape/train", "direction/train"]
    rows = table(overview(md), "manifest")
    assert list(rows) == names
    for d, name in zip(dirs, names):
        body = section(md, name)
        png = next(line for line in body.splitlines() if line.startswith("!["))
        png = out / png.split("(")[1].rstrip(")")
        assert png_size(png) == (1530, 1035)
        assert png.stat().st_size > 20_000  # panels drawn, not a blank canvas
        assert str(d) in body
        samples = sum(1 for line in (Path(d) / "manifest.jsonl").open() if line.strip())
        assert num(rows[name][0]) == samples
        classes = json.loads((Path(d) / "classes.json").read_text())
        assert table(body, "samples")[str(samples)][0] == str(len(classes))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", f"{name_of(real_manifest).replace('/', '-')}.png", "shape-train.png",
         "direction-train.png"])


def test_routes_equal_routing_route_per_record(page, real_manifest):
    body = section(page[0], name_of(real_manifest))
    routes = table(body, "route")
    assert header(body, "route")[1:] == ["CPU machine", f"{ARCH} GPU"]
    reasons = table(body, "PyAV fallback reason")
    for col, (device, formats) in enumerate([("cpu", None),
                                             ("mixed", routing.NVDEC_BY_ARCH[ARCH])]):
        want, why = routes_by_record(real_manifest, device, formats)
        for r in routing.ROUTES:
            assert num(routes[report.ROUTE_NAMES[r]][col]) == want[r], (device, r)
        assert {k: num(v[col]) for k, v in reasons.items() if num(v[col])} == dict(why)
    # The shared clips need all three decoders: the check above is not vacuous.
    assert num(routes["DALI CPU"][0]) and num(routes["PyAV"][0]) and num(routes["NVDEC"][1])
    assert num(routes["PyAV"][1])  # MJPEG and the rotated clip, even on a GPU


def test_rows_differing_in_one_routing_field_route_apart(tmp_path):
    """Routes are computed once per distinct probe layout; rows that differ only in rotation,
    stream choice or pixel format must still get their own route, as routing.route says."""
    base = {"codec": "vp9", "pix_fmt": "yuv420p", "width": 64, "height": 48, "num_frames": 50,
            "stream_index": 0, "video_streams": [{"index": 0}]}
    variants = [{}, {"rotation": 90}, {"rotation": 360}, {"pix_fmt": "yuv420p10le"},
                {"stream_index": 1, "video_streams": [{"index": 0}, {"index": 1}]},
                {"stream_index": 1, "video_streams": [{"index": 1}]}, {"codec": "av1"}]
    probes = [{**base, **v} for v in variants for _ in range(2)]
    (tmp_path / "manifest.jsonl").write_text("".join(
        json.dumps({"path": f"/v/{i}.webm", "probe": p}) + "\n" for i, p in enumerate(probes)))
    for arch in ("hopper", "ada"):
        machines = report.summarize(tmp_path, "m", arch, 32, 3)[0].machines
        for m, (device, formats) in zip(machines, [("cpu", None),
                                                   ("mixed", routing.NVDEC_BY_ARCH[arch])]):
            routed = [routing.route(p, device, formats) for p in probes]
            assert m.routes == Counter(r for r, _ in routed)
            assert m.fallback == Counter(why for r, why in routed if r == routing.PYAV)
        assert machines[1].label == f"{arch} GPU"
    # AV1 decodes on Ada's NVDEC, not on Hopper's: --gpu-arch changes the GPU column.
    gpu = {arch: report.summarize(tmp_path, "m", arch, 32, 3)[0].machines[1]
           for arch in ("hopper", "ada")}
    assert gpu["ada"].routes[routing.NVDEC] == gpu["hopper"].routes[routing.NVDEC] + 2


def test_quarantine_counts_by_reason_and_source(page, real_manifest):
    md = page[0]
    body = section(md, name_of(real_manifest))
    rows = [json.loads(line) for line in (real_manifest / "quarantine.jsonl").open()]
    want: dict = {}
    for r in rows:
        source = "builder" if r["source"] == "manifest" else r["source"]
        want.setdefault(source, Counter())[reason_kind(r["reason"])] += 1
    assert sorted(want) == ["builder", "eval", "train"] and want["train"]["short decode"] == 2
    cols = header(body, "quarantine reason")[1:]
    got = {src: Counter() for src in cols}
    for kind, cells in table(body, "quarantine reason").items():
        for src, cell in zip(cols, cells):
            if num(cell):
                got[src][kind] = num(cell)
    assert got == want
    assert num(table(body, "samples")["14"][-1]) == 2  # two run rows name manifest files
    over = table(overview(md), "manifest")[name_of(real_manifest)]
    assert [num(c) for c in over[1:3]] == [3, 3]  # builder rows, run rows


def test_frames_out_in_the_page_equal_the_clips(page, real_manifest):
    md = page[0]
    records, _ = load_manifest(real_manifest)
    want = sum(len(np.unique(clip_indices(r["probe"]["num_frames"], CLIP, STRIDE, None)))
               for r in records)
    rows = table(section(md, name_of(real_manifest)), "route")
    assert num(rows["frames out / epoch"][0]) == num(rows["frames out / epoch"][1]) == want
    assert f"{CLIP} frames {STRIDE} apart (span {(CLIP - 1) * STRIDE + 1})" in md
    # PyAV decodes from frame 0 and DALI from an unknown keyframe: on the GPU, where most
    # files go to NVDEC, the page gives a range; it never undercuts the frames handed out.
    lo, hi = (num(x) for x in rows["decoded / epoch (est.)"][1].split(" – "))
    assert want <= lo < hi


def test_clip_work_equals_clip_indices_over_every_start():
    """Distinct frames, span and frames up to the last one, against sampling.clip_indices
    enumerated over every possible random start."""
    cases = [(n, s0, s1) for n in (1, 2, 5, 31, 32, 33, 40, 94, 95, 96, 200)
             for s0, s1 in ((0, None), (3, 20), (10, 200), (90, 95), (150, 400))]
    for clip_frames, stride in ((32, 3), (8, 1), (4, 5), (1, 2), (16, 4)):
        n = np.array([c[0] for c in cases])
        start, end = report.frame_bounds(
            n, np.ones(len(cases)), np.array([c[1] for c in cases], float),
            np.array([np.nan if c[2] is None else c[2] for c in cases], float))
        work = report.clip_work(start, end, clip_frames, stride)
        for k, (frames, s0, s1) in enumerate(cases):
            starts = _Fixed(0)
            clip_indices(frames, clip_frames, stride, starts, s0, s1)
            clips = [clip_indices(frames, clip_frames, stride, _Fixed(o), s0, s1)
                     for o in range(starts.high or 1)]
            assert work["out"][k] == len(np.unique(clips[0])), (frames, s0, s1, clip_frames)
            assert {len(np.unique(c)) for c in clips} == {work["out"][k]}
            assert work["span"][k] == clips[0].max() - clips[0].min() + 1
            assert work["to_last"][k] == pytest.approx(np.mean([c.max() + 1 for c in clips]))


class _Fixed:
    """An rng whose integers() returns one chosen offset and records how many there were:
    enumerates clip_indices' possible starts."""

    def __init__(self, offset):
        self.offset, self.high = offset, None

    def integers(self, lo, hi):
        assert lo == 0 and self.offset < hi
        self.high = hi
        return self.offset


def test_frame_bounds_equal_the_loaders(demo):
    from dali_pipes.loader import frame_bounds

    records = [r for split in demo["shape"].values() for r in load_manifest(split)[0]]
    records += [{"start": 2.0, "end": None, "probe": {"fps": 24.0, "num_frames": 96}},
                {"start": 9.0, "end": 12.0, "probe": {"fps": 24.0, "num_frames": 96}},
                {"start": 1.0, "end": 2.0, "probe": {"fps": 0.0, "num_frames": 96}},
                {"start": None, "end": 3.0, "probe": {"fps": 30.0, "num_frames": 96}}]
    assert any(r["start"] for r in records[:-4])  # the demo's ActivityNet segments
    n = np.array([r["probe"]["num_frames"] for r in records])
    start, end = report.frame_bounds(
        n, np.array([r["probe"]["fps"] for r in records], float),
        np.array([np.nan if r["start"] is None else r["start"] for r in records], float),
        np.array([np.nan if r["end"] is None else r["end"] for r in records], float))
    for r, s, e, frames in zip(records, start, end, n):
        lo, hi = frame_bounds(r)
        hi = frames if hi is None else min(hi, frames)  # clip_indices' clamping
        lo = max(0, min(lo, hi - 1))
        assert (s, e) == (lo, max(hi, lo + 1)), r


# ---------------------------------------------------------------- errors

def test_folder_without_manifest_is_one_clear_line(real_manifest, tmp_path, capsys):
    empty = tmp_path / "not_built"
    empty.mkdir()
    out = tmp_path / "rep"
    assert main(["report", str(real_manifest), str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    assert f"no manifest.jsonl in {empty}" in err and "python -m dali_pipes.manifest" in err
    assert not out.exists()  # checked before any work: no half report
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_broken_row_names_file_and_line(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    good = {"path": "/v/a.mp4", "probe": {"codec": "vp9", "num_frames": 10}}
    (d / "manifest.jsonl").write_text(json.dumps(good) + "\n{\"path\": \"/v/b.mp\n")
    assert main(["report", str(d), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'manifest.jsonl'} line 2 is not JSON" in err
    (d / "manifest.jsonl").write_text(json.dumps({"path": "/v/a.mp4"}) + "\n")
    assert main(["report", str(d), "--out", str(tmp_path / "rep")]) == 2
    assert "line 1 is not a manifest row with a probe" in capsys.readouterr().err


def test_manifest_with_no_rows_still_reports(tmp_path):
    """Every row quarantined: the page says 0 samples and shows the builder's reasons."""
    d = tmp_path / "all_bad"
    d.mkdir()
    (d / "manifest.jsonl").write_text("")
    for k in range(3):
        append_quarantine(d, f"/v/{k}.mp4", "file does not exist or cannot be read", "manifest")
    md = run_report([d], tmp_path / "rep")
    body = section(md, name_of(d))
    assert table(overview(md), "manifest")[name_of(d)][:2] == ["0", "3"]
    assert table(body, "quarantine reason")["file does not exist or cannot be read"] == ["3"]
    assert png_size(tmp_path / "rep" / f"{name_of(d).replace('/', '-')}.png") == (1530, 1035)


def test_builder_and_report_command_lines(tmp_path):
    """The builder's format positional still works next to the new subcommand."""
    clip = REPO / ".." / "shared" / "videos" / "derived_juggle_vp9.webm"
    if not clip.is_file():
        pytest.skip("shared videos not found")
    (tmp_path / "videos" / "juggling").mkdir(parents=True)
    shutil.copy(clip, tmp_path / "videos" / "juggling" / "abc_000000_000003.webm")
    (tmp_path / "train.csv").write_text("label,youtube_id,time_start,time_end\n"
                                        "juggling,abc,0,3\njuggling,gone,0,3\n")
    env_run = dict(capture_output=True, text=True, cwd=REPO, timeout=120)
    built = subprocess.run([sys.executable, "-m", "dali_pipes.manifest", "kinetics",
                            "--annotations", str(tmp_path / "train.csv"), "--root",
                            str(tmp_path / "videos"), "--out", str(tmp_path / "m"), "--json"],
                           **env_run)
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["num_samples"] == 1
    rep = subprocess.run([sys.executable, "-m", "dali_pipes.manifest", "report",
                          str(tmp_path / "m"), "--out", str(tmp_path / "rep")], **env_run)
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    row = table(overview(md), "manifest")[report._names([tmp_path / "m"])[0]]
    assert row[:3] == ["1", "1", "0"]  # one sample, one builder row (gone), no run rows
    assert "python -m dali_pipes.manifest report" in md


# ---------------------------------------------------------------- 700k rows

# (probe fields, rows): counts spanning orders of magnitude, as in a real Kinetics-size set.
BIG = [
    ({"codec": "h264", "pix_fmt": "yuv420p", "width": 340, "height": 256}, 500_000),
    ({"codec": "vp9", "pix_fmt": "yuv420p", "width": 640, "height": 360}, 120_000),
    ({"codec": "hevc", "pix_fmt": "yuv420p10le", "width": 1280, "height": 720}, 40_000),
    ({"codec": "av1", "pix_fmt": "yuv420p", "width": 1920, "height": 1080}, 20_000),
    ({"codec": "mpeg4", "pix_fmt": "yuv420p", "width": 320, "height": 240}, 10_000),
    ({"codec": "mjpeg", "pix_fmt": "yuvj422p", "width": 480, "height": 270}, 5_000),
    ({"codec": "h264", "pix_fmt": "yuv420p", "width": 640, "height": 360, "rotation": 90},
     3_000),
    ({"codec": "h264", "pix_fmt": "yuv420p", "width": 320, "height": 180, "stream_index": 1,
      "video_streams": [{"index": 0}, {"index": 1}]}, 1_500),
    ({"codec": "h264", "pix_fmt": "yuv444p", "width": 340, "height": 256}, 400),
    ({"codec": "prores", "pix_fmt": "yuv422p10le", "width": 1920, "height": 1080}, 100),
]
# (num_frames, fps, segment): cycled over the rows; every 4th row is an ActivityNet segment.
LENGTHS = [(5, 5.0), (32, 30.0), (75, 25.0), (150, 29.97), (300, 30.0), (900, 30.0),
           (3000, 24.0), (18000, 30.0)]
SEGMENT = (1.0, 4.0)


def write_big_manifest(d: Path) -> int:
    """A 700,000-row manifest of small rows (BIG x LENGTHS), fast: one format string per row."""
    d.mkdir(parents=True, exist_ok=True)
    lines, i = [], 0
    for fields, count in BIG:
        probe = {"rotation": 0, "stream_index": 0, "video_streams": [{"index": 0}], **fields}
        head = json.dumps(probe)[:-1]
        for k in range(count):
            n, fps = LENGTHS[i % len(LENGTHS)]
            seg = '"start": %s, "end": %s' % SEGMENT if i % 4 == 0 else '"start": null, "end": null'
            lines.append('{"path": "/data/v/%07d.mp4", "label": %d, %s, "probe": %s, '
                         '"num_frames": %d, "fps": %s, "duration": %s, "vfr": false}}\n'
                         % (i, k % 400, seg, head, n, fps, round(n / fps, 3)))
            i += 1
    (d / "manifest.jsonl").write_text("".join(lines))
    (d / "classes.json").write_text(json.dumps([f"c{k}" for k in range(400)]))
    return i


def test_700k_rows_from_probes_only(tmp_path):
    """700,000 rows: the report reads probes only, so it runs in seconds. Measured by hand on
    this manifest (200 MB) with `python -m dali_pipes.manifest report DIR --out OUT`: 7.1 s of
    CPU, 6.9-14 s wall on a shared 2-core machine. The test asserts on the output, not on time."""
    d = tmp_path / "k700" / "train"
    assert write_big_manifest(d) == 700_000
    for k in range(3):
        append_quarantine(d, f"/data/gone/{k}.mp4", f"video file not found (/data/gone/{k})",
                          "manifest")
    # Bulk rows, written directly (append_quarantine opens the file once per row).
    with open(d / "quarantine.jsonl", "a") as f:
        f.writelines(json.dumps({"path": f"/data/gone/{k}.mp4", "reason": "file is empty (0 "
                                 "bytes)", "source": "manifest"}) + "\n" for k in range(30_000))
        f.writelines(json.dumps({"path": f"/data/v/{k:07d}.mp4", "reason": "DecodeError: short "
                                 "decode: x", "source": "train"}) + "\n" for k in range(200))
    md = run_report([d], tmp_path / "rep")
    body = section(md, "k700/train")
    assert png_size(tmp_path / "rep" / "k700-train.png") == (1530, 1035)
    assert num(table(overview(md), "manifest")["k700/train"][0]) == 700_000
    routes = table(body, "route")
    for col, (device, formats) in enumerate([("cpu", None),
                                             ("mixed", routing.NVDEC_BY_ARCH["hopper"])]):
        want = Counter()
        for fields, count in BIG:
            probe = {"rotation": 0, "stream_index": 0, "video_streams": [{"index": 0}], **fields}
            want[routing.route(probe, device, formats)[0]] += count
        assert {r: num(routes[report.ROUTE_NAMES[r]][col]) for r in routing.ROUTES} == \
            {r: want[r] for r in routing.ROUTES}
    # Frames out, from clip_indices once per distinct (length, segment) and the row counts.
    per_kind = Counter((i % len(LENGTHS), i % 4 == 0) for i in range(700_000))
    want_out = 0
    for (k, seg), count in per_kind.items():
        n, fps = LENGTHS[k]
        s0, s1 = (int(np.floor(SEGMENT[0] * fps)), int(np.ceil(SEGMENT[1] * fps))) if seg \
            else (0, None)
        want_out += count * len(np.unique(clip_indices(n, 32, 3, None, s0, s1)))
    assert num(routes["frames out / epoch"][0]) == want_out
    quarantine = table(body, "quarantine reason")
    assert num(quarantine["file is empty"][0]) == 30_000
    assert num(quarantine["video file not found"][0]) == 3
    assert num(quarantine["short decode"][1]) == 200
    assert num(table(body, "samples")["700,000"][-1]) == 200
