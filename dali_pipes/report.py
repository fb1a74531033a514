"""A data report a user can read: what the files of each manifest are, which decoder reads them,
what was quarantined and why, and how much decoding one epoch asks for.

    python -m dali_pipes.manifest report DIR [DIR ...] --out report/ [--gpu-arch hopper]
                                          [--clip-frames 32 --stride 3]

writes ``report/<name>.png`` per manifest folder and ``report/report.md``, one page listing every
manifest with its picture and key numbers. Only the probes in ``manifest.jsonl`` and the rows of
``quarantine.jsonl`` are read, never a video: the command on a 700,000-row manifest (280-byte
rows, 200 MB; tests/test_report.py writes one) used 7.1 s of CPU, 6.9 to 14 s of wall time on a
2-core machine shared with other jobs, 155 MB of memory. About 3 s of it is ``json.loads`` per
line, 2 s the per-row columns, 2.5 s the figure.

Decode work per epoch: one epoch draws every manifest sample once (dataset weights 0). A sample
is a clip of ``clip_frames`` frames ``stride`` apart from a uniformly random start, inside its
ActivityNet segment when it has one (``sampling.clip_indices``, ``loader.frame_bounds``).

- *frames out*: the clip's distinct frames. A file shorter than the clip span repeats its last
  frame; a repeat is decoded once (``pipeline._expand``).
- *decoded, PyAV*: ``decode_av`` decodes from the file's first frame to the clip's last one, so
  the expected number is exact up to the random start.
- *decoded, DALI* (CPU decoder or NVDEC): DALI seeks to the keyframe at or before the clip's first
  frame, then decodes to its last. The probe records no keyframe positions, so this is a range:
  from a keyframe at the clip start (the clip span) to a single keyframe at frame 0 (as PyAV).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import textwrap
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import routing
from .manifest import (CLASSES, FORMATS, MANIFEST, META, RUN_SOURCES, ManifestError,
                       read_quarantine, reason_kind)

DEFAULT_ARCH = "hopper"
DEFAULT_CLIP_FRAMES, DEFAULT_STRIDE = 32, 3  # the paper's MViTv2-B 32x3
REPORT_MD = "report.md"
ROUTE_NAMES = {routing.NVDEC: "NVDEC", routing.DALI_CPU: "DALI CPU", routing.PYAV: "PyAV"}
BUILDER = "builder"  # quarantine rows the manifest builder wrote (source "manifest")
TOP = 8  # bars per categorical panel; the rest are summed into "other"
# Counts spanning more than this factor get a log axis, or the small bars vanish.
LOG_SPREAD = 50
COLOURS = {"cpu": "#4c72b0", "gpu": "#55a868", "out": "#8c8c8c", "q": "#c44e52"}
SOURCE_COLOURS = ("#c44e52", "#dd8452", "#8172b3", "#937860")


# ---------------------------------------------------------------- reading

@dataclass
class Columns:
    """The probe fields the report needs, one numpy entry per manifest row.

    Records with the same format, size and stream layout share a *group*; routes are computed
    once per group (``routing.route`` reads only those fields), which keeps 700k rows cheap.
    """
    groups: list[dict]  # a representative probe per group
    gid: np.ndarray  # (N,) int64 group of each row
    fps: np.ndarray  # (N,) float64, 0 when unknown
    duration: np.ndarray  # (N,) float64 seconds
    num_frames: np.ndarray  # (N,) int64
    seg_start: np.ndarray  # (N,) float64 seconds, NaN without a segment
    seg_end: np.ndarray  # (N,) float64 seconds, NaN without a segment end
    vfr: int = 0
    decode_errors: int = 0  # rows kept with --keep-decode-errors
    run_quarantined: int = 0  # rows whose file a training/eval run quarantined since the build

    @property
    def n(self) -> int:
        return len(self.gid)


def _seconds(value) -> float:
    return float("nan") if value is None else float(value)


def read_columns(directory: Path, run_paths: set[str] = frozenset()) -> Columns:
    """Columns of DIR/manifest.jsonl; ``run_paths`` are files quarantined by runs."""
    path = directory / MANIFEST
    gid, nf = array("q"), array("q")
    fps, dur, s0, s1 = array("d"), array("d"), array("d"), array("d")
    index: dict[tuple, int] = {}
    groups: list[dict] = []
    vfr = errors = run_hits = 0
    loads = json.loads
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = loads(line)
                probe = rec["probe"]
                get = probe.get
                streams = get("video_streams")
                # Every probe field routing.route reads, plus the size for the resolution panel
                # (inlined: this loop runs once per row).
                key = (get("codec"), get("pix_fmt"), get("rotation"), get("stream_index"),
                       tuple([s.get("index") for s in streams]) if streams else (),
                       get("width"), get("height"))
                g = index.get(key)
                if g is None:
                    g = index[key] = len(groups)
                    groups.append(probe)
                gid.append(g)
                nf.append(int(get("num_frames") or 0))
                fps.append(float(get("fps") or 0.0))
                dur.append(float(get("duration") or 0.0))
                s0.append(_seconds(rec.get("start")))
                s1.append(_seconds(rec.get("end")))
                vfr += bool(get("vfr"))
                errors += bool(get("decode_errors"))
                if run_paths and rec.get("path") in run_paths:
                    run_hits += 1
            except json.JSONDecodeError as exc:
                if not line.strip():
                    continue
                raise ManifestError(f"{path} line {n} is not JSON ({exc}); rebuild the manifest "
                                    "or remove the line") from None
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ManifestError(
                    f"{path} line {n} is not a manifest row with a probe ({type(exc).__name__}: "
                    f"{exc}); rebuild the manifest with `python -m dali_pipes.manifest`") from None
    return Columns(groups, np.frombuffer(gid, np.int64), np.frombuffer(fps, np.float64),
                   np.frombuffer(dur, np.float64), np.frombuffer(nf, np.int64),
                   np.frombuffer(s0, np.float64), np.frombuffer(s1, np.float64),
                   vfr, errors, run_hits)


def quarantine_counts(directory: Path) -> dict[str, Counter]:
    """{source: Counter(reason kind)}; the builder's rows under "builder"."""
    out: dict[str, Counter] = {}
    for row in read_quarantine(directory):
        if not isinstance(row, dict):
            continue
        source = row.get("source") or "unknown"
        source = BUILDER if source == "manifest" else str(source)
        out.setdefault(source, Counter())[reason_kind(row.get("reason", ""))] += 1
    return out


def run_quarantined_paths(directory: Path) -> set[str]:
    return {str(r.get("path")) for r in read_quarantine(directory)
            if isinstance(r, dict) and r.get("source") in RUN_SOURCES}


# ---------------------------------------------------------------- decode work

def frame_bounds(num_frames: np.ndarray, fps: np.ndarray, seg_start: np.ndarray,
                 seg_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) frames each clip is drawn from: ``loader.frame_bounds`` followed by the
    clamping of ``sampling.clip_indices``, for all rows at once."""
    has_seg = ~np.isnan(seg_start) & (fps > 0)
    with np.errstate(invalid="ignore"):
        first = np.where(has_seg, np.floor(np.nan_to_num(seg_start) * fps), 0).astype(np.int64)
        last = np.ceil(np.nan_to_num(seg_end) * fps).astype(np.int64)
    n = np.maximum(num_frames, 1)
    end = np.where(has_seg & ~np.isnan(seg_end), np.minimum(last, n), n)
    start = np.maximum(0, np.minimum(first, end - 1))
    return start, np.maximum(end, start + 1)


def clip_work(start: np.ndarray, end: np.ndarray, clip_frames: int,
              stride: int) -> dict[str, np.ndarray]:
    """Per row: distinct frames of a clip ("out"), frames from its first to its last frame
    ("span"), and the expected number of frames before and including its last one ("to_last",
    a float: the start is uniform over the possible ones)."""
    length = end - start
    span = (clip_frames - 1) * stride + 1
    room = length - span  # clip_indices: a random start in [start, start + room] when room > 0
    fits = room > 0
    # A short file: frames start, start + stride, ... up to end - 1, plus end - 1 itself when the
    # clamped indices land between two of those.
    within = (length - 1) // stride + 1
    short = np.minimum(within + ((length - 1) % stride != 0), clip_frames)
    out = np.where(fits, clip_frames, short)
    span_frames = np.where(fits, span, length)
    to_last = np.where(fits, start + room / 2.0 + span, end.astype(np.float64))
    return {"out": out, "span": span_frames, "to_last": to_last}


# ---------------------------------------------------------------- summary

@dataclass
class Machine:
    """Routes and decode work of one manifest on one kind of machine."""
    label: str  # "CPU machine", "hopper GPU"
    key: str  # "cpu" or "gpu": colour and table column
    routes: Counter = field(default_factory=Counter)  # route -> rows
    fallback: Counter = field(default_factory=Counter)  # PyAV reason -> rows
    out: dict = field(default_factory=dict)  # route -> distinct frames per epoch
    decoded_min: dict = field(default_factory=dict)  # route -> frames decoded per epoch, least
    decoded_max: dict = field(default_factory=dict)  # route -> ..., most

    def total(self, which: dict) -> float:
        return float(sum(which.values()))


@dataclass
class Summary:
    name: str
    directory: Path
    meta: dict
    num_classes: int | None
    n: int
    codec: Counter
    pix_fmt: Counter
    size: Counter  # "WxH" as displayed (rotation applied)
    vfr: int
    decode_errors: int
    run_quarantined: int
    machines: list[Machine]
    quarantine: dict[str, Counter]
    medians: dict[str, float]
    png: str = ""


def _machines(cols: Columns, arch: str, work: dict) -> list[Machine]:
    counts = np.bincount(cols.gid, minlength=len(cols.groups))
    setups = [("CPU machine", "cpu", "cpu", None),
              (f"{arch} GPU", "gpu", "mixed", routing.NVDEC_BY_ARCH[arch])]
    out = []
    for label, key, device, formats in setups:
        routed = [routing.route(p, device, formats) for p in cols.groups]
        m = Machine(label, key)
        for (r, why), c in zip(routed, counts):
            m.routes[r] += int(c)
            if r == routing.PYAV and c:
                m.fallback[why] += int(c)
        code = np.array([routing.ROUTES.index(r) for r, _ in routed] or [0], np.int64)[cols.gid]
        sums = {k: np.bincount(code, weights=v, minlength=len(routing.ROUTES))
                for k, v in work.items()}
        for i, r in enumerate(routing.ROUTES):
            m.out[r] = float(sums["out"][i])
            # PyAV decodes from frame 0; DALI from the keyframe before the clip (see the top).
            m.decoded_max[r] = float(sums["to_last"][i])
            m.decoded_min[r] = float(sums["to_last" if r == routing.PYAV else "span"][i])
        out.append(m)
    return out


def _display_size(probe: dict) -> tuple[int, int]:
    w, h = int(probe.get("width") or 0), int(probe.get("height") or 0)
    if int(probe.get("rotation") or 0) % 180 == 90:
        w, h = h, w
    return w, h


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # meta and classes only label the report


def summarize(directory: Path, name: str, arch: str, clip_frames: int,
              stride: int) -> tuple[Summary, Columns, np.ndarray]:
    """The summary of one manifest folder, its columns and each row's short side."""
    cols = read_columns(directory, run_quarantined_paths(directory))
    counts = np.bincount(cols.gid, minlength=len(cols.groups))
    codec, pix, size = Counter(), Counter(), Counter()
    sides = np.zeros(len(cols.groups), np.int64)
    for g, (probe, c) in enumerate(zip(cols.groups, counts)):
        w, h = _display_size(probe)
        codec[str(probe.get("codec") or "unknown")] += int(c)
        pix[str(probe.get("pix_fmt") or "unknown")] += int(c)
        size[f"{w}x{h}"] += int(c)
        sides[g] = min(w, h)
    start, end = frame_bounds(cols.num_frames, cols.fps, cols.seg_start, cols.seg_end)
    work = clip_work(start, end, clip_frames, stride)
    classes = _read_json(directory / CLASSES)
    summary = Summary(
        name=name, directory=directory, meta=_read_json(directory / META) or {},
        num_classes=len(classes) if isinstance(classes, (list, dict)) else None,
        n=cols.n, codec=codec, pix_fmt=pix, size=size, vfr=cols.vfr,
        decode_errors=cols.decode_errors, run_quarantined=cols.run_quarantined,
        machines=_machines(cols, arch, work), quarantine=quarantine_counts(directory),
        medians={k: float(np.median(v)) if len(v) else 0.0 for k, v in
                 (("fps", cols.fps), ("duration", cols.duration),
                  ("frames", cols.num_frames))})
    return summary, cols, sides[cols.gid]


# ---------------------------------------------------------------- figure

def _short(x: float) -> str:
    """700000 -> '700k', 1234 -> '1,234': bar labels must stay narrow."""
    x = float(x)
    if abs(x) >= 1e9:
        return f"{x / 1e9:.3g}G"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.3g}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.3g}k"
    return f"{x:,.0f}"


def _num(x: float) -> str:
    x = float(x)
    return f"{int(x):,}" if x.is_integer() and abs(x) < 1e9 else f"{x:.4g}"


def _wrap(label: str, width: int = 30) -> str:
    return "\n".join(textwrap.wrap(label, width, max_lines=2, placeholder="…")) or label


def _kinds(k: int) -> str:
    return f"{k} kind" + ("" if k == 1 else "s")


def _slots(ax, k: int, horizontal: bool, least: int = 3) -> None:
    """Room for at least ``least`` bars, so one bar is not a slab across the whole panel."""
    pad = max(least - k, 0) / 2
    (ax.set_ylim if horizontal else ax.set_xlim)(-0.5 - pad, k - 0.5 + pad)


def _legend_on_top(ax, ncol: int) -> None:
    # One row in the band the value axis leaves free above the bars (see _headroom).
    ax.legend(fontsize=8, loc="upper center", ncol=ncol, frameon=False, handlelength=1.2,
              columnspacing=1.0)


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))  # no "2.5 files"
    axis.set_major_formatter(FuncFormatter(lambda v, _: _short(v)))  # 400k, not 400000


def _headroom(ax, values) -> None:
    """Top of a vertical value axis: the tallest bar and its label end at ~75% of the height,
    leaving a band for a one-row legend (log axes need a factor, not a margin)."""
    hi = max(max(values, default=0), 1)  # an all-zero panel still gets a valid axis
    if ax.get_yscale() == "log":
        lo = ax.get_ylim()[0]
        ax.set_ylim(lo, lo * (hi / lo) ** (1 / 0.75))
    else:
        ax.set_ylim(0, hi / 0.75)


def _needs_log(counts) -> bool:
    nz = [c for c in counts if c > 0]
    return bool(nz) and max(nz) / min(nz) >= LOG_SPREAD


def _empty(ax, title: str, message: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=9, color="#555555",
            transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _top(counter: Counter, top: int = TOP) -> list[tuple[str, int]]:
    if len(counter) == top + 1:
        top += 1  # an "other" bar standing for one kind would hide its name for nothing
    items = counter.most_common(top)
    rest = counter.total() - sum(c for _, c in items)
    if rest:
        items.append((f"other ({_kinds(len(counter) - top)})", rest))
    return items


def _value_axis(ax, counts, horizontal: bool) -> None:
    """Log axis when counts span orders of magnitude; room at the end for the labels."""
    hi = max(max(counts, default=0), 1)
    if _needs_log(counts):
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
        (ax.set_xlim if horizontal else ax.set_ylim)(0.7, hi * 6)
    else:
        (ax.set_xlim if horizontal else ax.set_ylim)(0, hi * 1.25)
        _integer_ticks(ax.xaxis if horizontal else ax.yaxis)
    (ax.set_xlabel if horizontal else ax.set_ylabel)("files" + (" (log)" if _needs_log(counts)
                                                                else ""), fontsize=8)


def _barh(ax, items: list[tuple[str, int]], title: str, colour: str, wrap: int = 30) -> None:
    labels = [_wrap(k, wrap) for k, _ in items][::-1]
    counts = [c for _, c in items][::-1]
    bars = ax.barh(range(len(items)), counts, color=colour, height=0.7)
    ax.bar_label(bars, labels=[_short(c) for c in counts], padding=2, fontsize=8)
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    _slots(ax, len(items), horizontal=True)
    _value_axis(ax, counts, horizontal=True)
    ax.set_title(title, fontsize=10)


def _categorical(ax, counter: Counter, title: str, colour: str = COLOURS["cpu"]) -> None:
    if not counter:
        _empty(ax, title, "no samples")
        return
    _barh(ax, _top(counter), f"{title} ({_kinds(len(counter))})", colour)


def _numeric(ax, values: np.ndarray, title: str, unit: str) -> None:
    """Bars per value when there are few (fps, sizes), else a histogram, log-binned when the
    values span more than two decades (durations, frame counts)."""
    v = np.asarray(values, np.float64)
    missing = int((~(v > 0)).sum())
    v = v[v > 0]
    if not len(v):
        _empty(ax, title, "no values")
        return
    note = f", {_short(missing)} unknown" if missing else ""
    spread = (f"all {_num(v.min())}{unit}" if v.min() == v.max() else
              f"median {_num(np.median(v))}{unit}, {_num(v.min())}–{_num(v.max())}")
    ax.set_title(f"{title}: {spread}{note}", fontsize=10)
    values_, counts = np.unique(v, return_counts=True)
    if len(values_) <= TOP:
        bars = ax.bar(range(len(values_)), counts, color=COLOURS["cpu"], width=0.7)
        ax.bar_label(bars, labels=[_short(c) for c in counts], padding=2, fontsize=8)
        ax.set_xticks(range(len(values_)), [_num(x) for x in values_], fontsize=8)
        _slots(ax, len(values_), horizontal=False)
        _value_axis(ax, list(counts), horizontal=False)
        return
    lo, hi = v.min(), v.max()
    log_x = hi / lo > 100
    edges = np.geomspace(lo, hi * 1.0001, 31) if log_x else np.linspace(lo, hi * 1.0001, 31)
    hist, _ = np.histogram(v, edges)
    ax.stairs(hist, edges, fill=True, color=COLOURS["cpu"])
    if log_x:
        ax.set_xscale("log")
    if _needs_log(hist):
        ax.set_yscale("log")
        ax.set_ylim(0.7, hist.max() * 3)
    else:
        _integer_ticks(ax.yaxis)
    ax.set_ylabel("files" + (" (log)" if _needs_log(hist) else ""), fontsize=8)
    ax.tick_params(labelsize=8)


def _routes_panel(ax, machines: list[Machine]) -> None:
    x = np.arange(len(routing.ROUTES))
    width = 0.38
    all_counts = []
    for k, m in enumerate(machines):
        counts = [m.routes[r] for r in routing.ROUTES]
        all_counts += counts
        bars = ax.bar(x + (k - 0.5) * width, counts, width, label=m.label,
                      color=COLOURS[m.key])
        ax.bar_label(bars, labels=[_short(c) if c else "" for c in counts], padding=2,
                     fontsize=8)
    ax.set_xticks(x, [ROUTE_NAMES[r] for r in routing.ROUTES], fontsize=8)
    _value_axis(ax, all_counts, horizontal=False)
    _headroom(ax, all_counts)
    _legend_on_top(ax, len(machines))
    ax.set_title("decoder per file", fontsize=10)


def _work_panel(ax, machines: list[Machine], clip_frames: int, stride: int) -> None:
    """Per (machine, route): distinct frames out, and the decoded range (solid: least,
    hatched: most; PyAV's is one number)."""
    span = (clip_frames - 1) * stride + 1
    title = f"frames per epoch, clips {clip_frames}x{stride} (span {span})"
    cells = [(m, r) for m in machines for r in routing.ROUTES if m.routes[r]]
    if not cells:
        _empty(ax, title, "no samples")
        return
    x = np.arange(len(cells))
    out = [m.out[r] for m, r in cells]
    lo = [m.decoded_min[r] for m, r in cells]
    hi = [m.decoded_max[r] for m, r in cells]
    b_out = ax.bar(x - 0.2, out, 0.38, color=COLOURS["out"], label="frames out")
    ax.bar_label(b_out, labels=[_short(v) for v in out], padding=2, fontsize=7)
    ax.bar(x + 0.2, lo, 0.38, color=COLOURS["q"], label="frames decoded")
    b_hi = ax.bar(x + 0.2, [h - low for h, low in zip(hi, lo)], 0.38, bottom=lo,
                  color="white", edgecolor=COLOURS["q"], hatch="///")
    ax.bar_label(b_hi, labels=[_short(h) for h in hi], padding=2, fontsize=7)
    ax.set_xticks(x, [f"{m.label.split()[0]}\n{ROUTE_NAMES[r]}" for m, r in cells], fontsize=8)
    values = out + hi
    if _needs_log(values):
        ax.set_yscale("log")
        ax.set_ylim(max(min(v for v in values if v > 0) / 3, 0.7))
    _headroom(ax, values)
    ax.set_ylabel("frames" + (" (log)" if _needs_log(values) else ""), fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    _slots(ax, len(cells), horizontal=False, least=2)
    _legend_on_top(ax, 2)
    ax.set_title(title + "\nhatched: more if frame 0 is the only keyframe", fontsize=10)


def _fallback_panel(ax, m: Machine) -> None:
    title = f"PyAV fallback reasons, {m.label}"
    if not m.fallback:
        _empty(ax, title, "none: every file goes to a DALI decoder" if m.routes.total()
               else "no samples")
        return
    _barh(ax, _top(m.fallback, 6), f"{title} ({_short(m.fallback.total())} files)",
          COLOURS[m.key], wrap=34)


def _quarantine_panel(ax, quarantine: dict[str, Counter]) -> None:
    """One bar per (reason kind, source), coloured by source: grouped slots would leave most
    of them empty, since each kind usually comes from one source."""
    sources = sorted(quarantine, key=lambda x: (x != BUILDER, x))
    if not sources:
        _empty(ax, "quarantined rows by reason", "nothing quarantined")
        return
    colour = {src: SOURCE_COLOURS[k % len(SOURCE_COLOURS)] for k, src in enumerate(sources)}
    pairs = Counter({(kind, src): c for src in sources for kind, c in quarantine[src].items()})
    items = pairs.most_common(TOP)
    labels = [_wrap(f"{kind} ({src})", 34) for (kind, src), _ in items][::-1]
    counts = [c for _, c in items][::-1]
    bars = ax.barh(range(len(items)), counts, height=0.7,
                   color=[colour[src] for (_, src), _ in items][::-1])
    ax.bar_label(bars, labels=[_short(c) for c in counts], padding=2, fontsize=8)
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    _slots(ax, len(items), horizontal=True)
    _value_axis(ax, counts, horizontal=True)
    ax.set_xlabel("rows" + (" (log)" if _needs_log(counts) else ""), fontsize=8)
    totals = " · ".join(f"{src} {_short(quarantine[src].total())}" for src in sources)
    left = len(pairs) - len(items)
    ax.set_title(f"quarantined rows by reason (source)\n{totals}"
                 + (f" · {left} rarer reasons not shown" if left else ""), fontsize=10)


# Panel rows. Each row is its own subfigure: the bottom row's long labels would otherwise claim
# margins in the middle of the panels above and collapse constrained layout.
ROWS = (("codec", "pix", "side", "fps"), ("dur", "frames", "routes", "work"),
        ("fb0", "fb1", "quar"))


def _panels(fig) -> dict:
    rows = fig.subfigures(len(ROWS), 1, height_ratios=(1, 1, 1.1))
    axes = {}
    for sub, names in zip(rows, ROWS):
        axes.update(zip(names, sub.subplots(1, len(names))))
    return axes


def plot_summary(s: Summary, cols: Columns, short_side: np.ndarray, path: Path,
                 clip_frames: int, stride: int) -> None:
    """The manifest's panels as one PNG (matplotlib's Agg canvas: no display, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 11.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = _panels(fig)
    _categorical(ax["codec"], s.codec, "codec")
    _categorical(ax["pix"], s.pix_fmt, "pixel format")
    _numeric(ax["side"], short_side, "short side", " px")
    if s.size:
        most, share = s.size.most_common(1)[0]
        ax["side"].set_title(ax["side"].get_title() + f"\nmost common {most} "
                             f"({100 * share / s.n:.0f}%)", fontsize=10)
    _numeric(ax["fps"], cols.fps, "fps", "")
    _numeric(ax["dur"], cols.duration, "duration", " s")
    _numeric(ax["frames"], cols.num_frames, "frames", "")
    _routes_panel(ax["routes"], s.machines)
    _work_panel(ax["work"], s.machines, clip_frames, stride)
    for k, m in enumerate(s.machines):
        _fallback_panel(ax[f"fb{k}"], m)
    _quarantine_panel(ax["quar"], s.quarantine)
    fig.suptitle(f"{s.name}: {s.n:,} samples{_meta_line(s)}\n{s.directory}", fontsize=12)
    fig.savefig(path, dpi=90)


def _meta_line(s: Summary) -> str:
    bits = [str(s.meta.get(k)) for k in ("format", "split") if s.meta.get(k)]
    if s.num_classes is not None:
        bits.append(f"{s.num_classes} classes")
    return (" · " + ", ".join(bits)) if bits else ""


# ---------------------------------------------------------------- markdown

def _int(x: float) -> str:
    return f"{round(x):,}"


def _range(lo: float, hi: float) -> str:
    return _int(lo) if round(lo) == round(hi) else f"{_int(lo)} – {_int(hi)}"


def _decoded(m: Machine) -> str:
    return _range(m.total(m.decoded_min), m.total(m.decoded_max))


def _table(header: list[str], rows: list[list[str]], align: str = "r") -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["--:" if align == "r" else "---"] * (len(header) - 1))
             + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _overview(summaries: list[Summary]) -> list[str]:
    cpu_gpu = summaries[0].machines if summaries else []
    header = ["manifest", "samples", "quarantined (builder)", "quarantined (runs)"]
    for m in cpu_gpu:
        header += [f"{m.label}: {ROUTE_NAMES[r]}" for r in routing.ROUTES
                   if not (m.key == "cpu" and r == routing.NVDEC)
                   and not (m.key == "gpu" and r == routing.DALI_CPU)]
    header += ["frames out / epoch"] + [f"decoded / epoch, {m.label}" for m in cpu_gpu]
    rows = []
    for s in summaries:
        runs = sum(c.total() for src, c in s.quarantine.items() if src != BUILDER)
        row = [s.name, _int(s.n), _int(s.quarantine.get(BUILDER, Counter()).total()), _int(runs)]
        for m in s.machines:
            row += [_int(m.routes[r]) for r in routing.ROUTES
                    if not (m.key == "cpu" and r == routing.NVDEC)
                    and not (m.key == "gpu" and r == routing.DALI_CPU)]
        row += [_int(s.machines[0].total(s.machines[0].out))]
        row += [_decoded(m) for m in s.machines]
        rows.append(row)
    return _table(header, rows)


def _section(s: Summary) -> list[str]:
    lines = [f"## {s.name}", "", f"`{s.directory}`{_meta_line(s)}"
             + (f" · built {s.meta['created']}" if s.meta.get("created") else ""), "",
             f"![{s.name}]({s.png})", ""]
    most, share = (s.size.most_common(1) or [("-", 0)])[0]
    codecs = ", ".join(f"{k} {_int(c)}" for k, c in s.codec.most_common(3))
    lines += _table(["samples", "classes", "codecs", "most common size", "median fps",
                     "median duration (s)", "median frames", "VFR files",
                     "kept with decode errors", "quarantined by runs since the build"],
                    [[_int(s.n), s.num_classes if s.num_classes is not None else "?", codecs,
                      f"{most} ({_int(share)})", _num(s.medians["fps"]),
                      _num(s.medians["duration"]), _num(s.medians["frames"]), _int(s.vfr),
                      _int(s.decode_errors), _int(s.run_quarantined)]])
    lines += [""] + _routing_table(s) + [""] + _fallback_table(s) + [""] + _quarantine_table(s)
    return lines + [""]


def _routing_table(s: Summary) -> list[str]:
    rows = [[ROUTE_NAMES[r]] + [_int(m.routes[r]) for m in s.machines] for r in routing.ROUTES]
    rows.append(["frames out / epoch"] + [_int(m.total(m.out)) for m in s.machines])
    rows.append(["decoded / epoch (est.)"] + [_decoded(m) for m in s.machines])
    return _table(["route"] + [m.label for m in s.machines], rows)


def _fallback_table(s: Summary) -> list[str]:
    reasons = sum((m.fallback for m in s.machines), Counter())
    if not reasons:
        return ["No file needs the PyAV fallback."]
    rows = [[why] + [_int(m.fallback[why]) for m in s.machines]
            for why, _ in reasons.most_common(10)]
    left = len(reasons) - len(rows)
    return (_table(["PyAV fallback reason"] + [m.label for m in s.machines], rows)
            + (["", f"{left} rarer reasons not listed."] if left > 0 else []))


def _quarantine_table(s: Summary) -> list[str]:
    if not s.quarantine:
        return ["Nothing quarantined."]
    sources = sorted(s.quarantine, key=lambda x: (x != BUILDER, x))
    overall = sum(s.quarantine.values(), Counter())
    rows = [[kind] + [_int(s.quarantine[src][kind]) for src in sources]
            for kind, _ in overall.most_common()]
    return _table(["quarantine reason"] + sources, rows)


def write_markdown(summaries: list[Summary], out: Path, command: str, arch: str,
                   clip_frames: int, stride: int) -> Path:
    span = (clip_frames - 1) * stride + 1
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = ["# Data report", "",
             f"{len(summaries)} manifest(s), written {created} by `{command}`. Read from the "
             "probes in each manifest.jsonl; no video was opened.", "",
             f"- **Routes**: `routing.route` per file, on a CPU machine (DALI's CPU decoder or "
             f"PyAV) and on a {arch} GPU (NVDEC per `routing.NVDEC_BY_ARCH[\"{arch}\"]`, or "
             "PyAV; a real GPU asks its driver, which may differ).",
             f"- **Epoch**: every sample drawn once; a clip is {clip_frames} frames {stride} "
             f"apart (span {span}) from a random start, inside the ActivityNet segment if any "
             "(stride sampling; SSv2's uniform sampling spreads a clip over the whole video). "
             "*Frames out* counts each clip's distinct frames (a file shorter than the span "
             "repeats its last frame, decoded once).",
             "- **Decoded (est.)**: PyAV decodes from the first frame of the file to the clip's "
             "last (expected value). DALI seeks to the keyframe before the clip; keyframe "
             "positions are not probed, so its range runs from a keyframe at the clip start to "
             "a single keyframe at frame 0.", "",
             *_overview(summaries), ""]
    for s in summaries:
        lines += _section(s)
    path = out / REPORT_MD
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- entry points

def _names(dirs: list[Path]) -> list[str]:
    """Shortest path tails (at least two parts) that tell the folders apart: shape/train."""
    parts = [d.parts[1:] if d.is_absolute() else d.parts for d in dirs]
    longest = max((len(p) for p in parts), default=1)
    for k in range(min(2, longest), longest + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]


def _file_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "-")).strip("._") or "manifest"
    stem, k = base, 2
    while stem in taken:
        stem, k = f"{base}-{k}", k + 1
    taken.add(stem)
    return stem + ".png"


def check_dirs(dirs) -> list[Path]:
    """Manifest folders as given (the report shows the user's paths), without repeats; an
    unusable one stops the report before any work."""
    out: list[Path] = []
    seen: set[Path] = set()
    for d in dirs:
        p = Path(os.path.normpath(d))
        if not p.is_dir():
            raise ManifestError(f"{d} is not a folder; pass manifest folders (each holding "
                                f"{MANIFEST}, as written by `python -m dali_pipes.manifest`)")
        if not (p / MANIFEST).is_file():
            raise ManifestError(
                f"no {MANIFEST} in {d}; build the manifest first (`python -m dali_pipes.manifest "
                f"{{{','.join(FORMATS)}}} --annotations FILE --root VIDEO_DIR --out {d}`) or "
                "pass the folder that holds it")
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def build_report(dirs, out, gpu_arch: str = DEFAULT_ARCH, clip_frames: int = DEFAULT_CLIP_FRAMES,
                 stride: int = DEFAULT_STRIDE, command: str = "python -m dali_pipes.manifest "
                 "report", progress: bool = True) -> dict:
    """Write one PNG per manifest folder and report.md into ``out``.

    Returns {"markdown": path, "summaries": [Summary]}. Raises ManifestError for a folder
    without a manifest, an unreadable row or a bad option value.
    """
    if gpu_arch not in routing.NVDEC_BY_ARCH:
        raise ManifestError(f"unknown GPU architecture {gpu_arch!r}; choose one of "
                            f"{', '.join(routing.NVDEC_BY_ARCH)}")
    if clip_frames < 1 or stride < 1:
        raise ManifestError(f"--clip-frames {clip_frames} and --stride {stride} must be >= 1")
    dirs = check_dirs(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    summaries = []
    for d, name in zip(dirs, _names(dirs)):
        started = time.monotonic()
        s, cols, sides = summarize(d, name, gpu_arch, clip_frames, stride)
        s.png = _file_name(name, taken)
        plot_summary(s, cols, sides, out / s.png, clip_frames, stride)
        summaries.append(s)
        if progress:
            print(f"report: {name}: {s.n:,} samples, {time.monotonic() - started:.1f} s -> "
                  f"{out / s.png}", file=sys.stderr)
    md = write_markdown(summaries, out, command, gpu_arch, clip_frames, stride)
    return {"markdown": md, "summaries": summaries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dali_pipes.manifest report",
        description="Write a PNG per manifest folder and report.md: codecs, sizes, fps, "
                    "durations, decoder routes on a CPU machine and a GPU, quarantine reasons, "
                    "decode work per epoch. Reads the probes only.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="manifest folders")
    parser.add_argument("--out", required=True, help="folder for the PNGs and report.md")
    parser.add_argument("--gpu-arch", default=DEFAULT_ARCH, choices=list(routing.NVDEC_BY_ARCH),
                        help=f"GPU generation whose NVDEC table routes files (default "
                             f"{DEFAULT_ARCH})")
    parser.add_argument("--clip-frames", type=int, default=DEFAULT_CLIP_FRAMES,
                        help=f"frames per training clip (default {DEFAULT_CLIP_FRAMES})")
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                        help=f"frames between a clip's frames (default {DEFAULT_STRIDE})")
    argv = list(sys.argv[2:] if argv is None else argv)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "dali_pipes.manifest", "report", *argv])
    try:
        result = build_report(args.dirs, args.out, args.gpu_arch, args.clip_frames, args.stride,
                              command)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    return 0
