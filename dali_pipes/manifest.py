"""Turn an official annotation file plus a video folder into a probed manifest.

Every annotation row of the chosen split ends in exactly one of two files:
``manifest.jsonl`` (usable samples with their probe) or ``quarantine.jsonl`` (with the
reason), so that nothing is dropped silently. The training pipeline reads only the
manifest and never meets a file DALI cannot handle (SPEC §6: DALI fails whole batches on
bad files and has no skip option).

    python -m dali_pipes.manifest kinetics --annotations train.csv --root videos/ --out m/
    python -m dali_pipes.manifest report m/ [more manifest folders] --out report/

``report`` (dali_pipes/report.py) draws what the built manifests hold, from the probes alone.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from .probe import DEFAULT_TIMEOUT_S, ProbeError, die_with_parent, probe_video

FORMATS = ("kinetics", "ssv2", "mit", "activitynet", "list")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
MANIFEST = "manifest.jsonl"
QUARANTINE = "quarantine.jsonl"
CLASSES = "classes.json"
META = "meta.json"
PROBE_CACHE = "probe_cache.json"
# Quarantine sources written by training/evaluation runs (see append_quarantine).
RUN_SOURCES = ("train", "eval")
# Bump when probe fields or rules change, so old cached probes are not reused.
# 2: probes carry "decode_errors".
PROBE_CACHE_VERSION = 2
# ActivityNet and Kinetics name their splits differently; accept the short forms too.
SPLIT_ALIASES = {
    "train": {"train", "training"},
    "val": {"val", "validation", "validate", "valid"},
    "test": {"test", "testing"},
}


class ManifestError(ValueError):
    """An annotation/labels file or manifest directory that cannot be used as given."""


@dataclass
class Row:
    """One annotation entry; ``reason`` set means it goes to quarantine."""
    entry: str
    path: str | None
    label: int | None = None
    class_name: str | None = None
    start: float | None = None
    end: float | None = None
    reason: str | None = None


# ---------------------------------------------------------------- labels files

def read_class_file(path: str | os.PathLike) -> list[str]:
    """Class names in index order from a JSON list/dict or a text file.

    Text lines are ``name`` or ``name,index`` (Moments in Time's category file); a JSON
    dict maps name → index (SSv2's labels.json, whose indices are strings).
    """
    text = _read_text(path, "labels file")
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"labels file {path} is not valid JSON: {exc}") from None
        if isinstance(data, list):
            return [str(x) for x in data]
        return _names_by_index(((str(k), v) for k, v in data.items()), path)
    pairs, plain = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        name, sep, idx = line.rpartition(",")
        if sep and idx.strip().lstrip("-").isdigit():
            pairs.append((name.strip(), idx.strip()))
        else:
            plain.append(line)
    if pairs and plain:
        raise ManifestError(f"labels file {path} mixes 'name,index' lines with plain names "
                            f"(e.g. {plain[0]!r}); use one style")
    return _names_by_index(pairs, path) if pairs else plain


def _names_by_index(pairs: Iterable[tuple[str, Any]], path) -> list[str]:
    by_index: dict[int, str] = {}
    for name, idx in pairs:
        try:
            i = int(idx)
        except (TypeError, ValueError):
            raise ManifestError(f"labels file {path}: index {idx!r} of class {name!r} is "
                                "not an integer") from None
        if i in by_index:
            raise ManifestError(f"labels file {path}: index {i} used by both "
                                f"{by_index[i]!r} and {name!r}")
        by_index[i] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise ManifestError(f"labels file {path}: indices must be 0..{len(by_index) - 1} "
                            "without gaps")
    return [by_index[i] for i in range(len(by_index))]


def _read_text(path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{what} {path} does not exist; check the path") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{what} {path} is not UTF-8 text ({exc})") from None


def _read_json(path, what: str):
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{what} {path} is not valid JSON: {exc}") from None


def _split_matches(value: str, wanted: str | None) -> bool:
    if wanted is None:
        return True
    value, wanted = value.strip().lower(), wanted.strip().lower()
    aliases = next((a for a in SPLIT_ALIASES.values() if wanted in a), {wanted})
    return value in aliases


def _label_row(row: Row, name: str | None, index: dict[str, int]) -> Row:
    if name is None or name == "":
        row.reason = "annotation has no label (test split row?)"
    elif name not in index:
        row.reason = f"label {name!r} is not in the class list"
    else:
        row.class_name, row.label = name, index[name]
    return row


# ---------------------------------------------------------------- file lookup

class VideoIndex:
    """File-name stems under a root, walked once, because datasets store the same
    video as .mp4, .webm or .mkv depending on the downloader."""

    def __init__(self, root: Path):
        self.root = root
        self._stems: dict[str, list[Path]] | None = None

    def find(self, stems: list[str], prefer_dirs: tuple[str, ...] = ()) -> Path | None:
        if self._stems is None:
            self._stems = self._walk()
        for stem in stems:
            hits = self._stems.get(stem, [])
            for d in prefer_dirs:
                for h in hits:
                    if h.parent.name == d:
                        return h
            if hits:
                return sorted(hits)[0]
        return None

    def _walk(self) -> dict[str, list[Path]]:
        """Video files by stem. Directory links are followed (dataset trees are often
        links to other disks), but each real directory is entered once: a link back up
        the tree would otherwise index every file below it again, level after level."""
        stems: dict[str, list[Path]] = {}
        seen: set[str] = set()
        for dirpath, dirnames, files in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames.clear()
                continue
            seen.add(real)
            dirnames.sort()  # of two links to one directory, the first name wins
            for f in files:
                p = Path(dirpath, f)
                if p.suffix.lower() in VIDEO_EXTS:
                    stems.setdefault(p.stem, []).append(p)
        return stems

def _abs(p: Path) -> str:
    # Not resolve(): symlinked dataset trees keep their own paths (label folders etc.).
    return os.path.abspath(p)


def _missing(row: Row, tried: str) -> Row:
    row.reason = f"video file not found ({tried})"
    return row


# ---------------------------------------------------------------- formats

def _csv_lines(text: str) -> list[tuple[int, list[str] | None, str | None]]:
    """(line number, fields, error) of each non-blank line, each line parsed on its own.

    No field of these formats holds a newline, and parsing the file as one stream lets an
    unterminated quote swallow every following line into one field, silently.
    """
    out = []
    for n, line in enumerate(io.StringIO(text, newline=None), start=1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            fields = next(csv.reader([line], strict=True))
        except csv.Error as exc:
            out.append((n, None, _csv_error(line, exc)))
            continue
        out.append((n, fields, None))
    return out


def _csv_error(line: str, exc: csv.Error) -> str:
    what = ("unterminated quote (a field opens with \" and the line ends first)"
            if "end of data" in str(exc) else f"malformed CSV ({exc})")
    return f"{what} in {line[:80]!r}; fix the quoting or remove the line"


def parse_kinetics(annotations, root: Path, labels=None, split=None):
    text = _read_text(annotations, "Kinetics annotation CSV")
    lines = _csv_lines(text)
    header = lines[0][1] if lines else None
    need = {"youtube_id", "time_start", "time_end"}
    if not header or not need <= set(header):
        raise ManifestError(f"Kinetics CSV {annotations} needs a header with "
                            f"label,youtube_id,time_start,time_end[,split]; got {header}")
    parsed, broken = [], []
    for n, fields, error in lines[1:]:
        if error is None and len(fields) != len(header):
            error = (f"{len(fields)} fields, the header has {len(header)}; fix the line "
                     "(a stray comma?)")
        if error:
            broken.append((n, Row(entry=f"line {n}", path=None, reason=error)))
        else:
            parsed.append((n, dict(zip(header, fields))))
    # Classes from every split, so that train and val manifests agree on label indices.
    classes = (read_class_file(labels) if labels
               else sorted({rec["label"] for _, rec in parsed if rec.get("label")}))
    if "split" in header:
        if split is None:
            _require_split(annotations, [rec["split"] for _, rec in parsed])
        parsed = [(n, rec) for n, rec in parsed if _split_matches(rec["split"], split)]
    index = {c: i for i, c in enumerate(classes)}
    videos = VideoIndex(root)
    # A broken line's split is unknown; it is reported whichever split is built.
    rows = broken + [(n, _kinetics_row(n, rec, root, videos, index)) for n, rec in parsed]
    return [row for _, row in sorted(rows, key=lambda nr: nr[0])], classes


def _require_split(annotations, values: list[str]) -> None:
    counts = Counter(v.strip() or "(empty)" for v in values)
    if len(counts) <= 1:
        return  # one split only: nothing can be mixed
    listed = ", ".join(f"{k}: {c} row{'s' if c > 1 else ''}" for k, c in sorted(counts.items()))
    raise ManifestError(f"Kinetics CSV {annotations} holds several splits ({listed}); pass "
                        f"--split {'|'.join(sorted(counts))} to build one of them")


def _kinetics_row(n: int, rec: dict, root: Path, videos: VideoIndex, index) -> Row:
    label = (rec.get("label") or "").strip()
    row = _label_row(Row(entry=f"line {n}", path=None), label, index)
    try:
        start, end = int(float(rec["time_start"])), int(float(rec["time_end"]))
    except (TypeError, ValueError):
        row.reason = (f"time_start/time_end {rec.get('time_start')!r}/"
                      f"{rec.get('time_end')!r} are not numbers")
        return row
    yid = rec["youtube_id"].strip()
    stem = f"{yid}_{start:06d}_{end:06d}"
    dirs = (label, label.replace(" ", "_"), label.replace(" ", "_").lower())
    for d in dirs + ("",):
        for ext in VIDEO_EXTS[:4]:
            candidate = root / d / f"{stem}{ext}"
            if candidate.is_file():
                row.path = _abs(candidate)
                return row
    # Some downloaders drop the time range from the name or use other containers.
    found = videos.find([stem, yid], prefer_dirs=dirs)
    if found is None:
        return _missing(row, f"{root}/<label>/{stem}.*")
    row.path = _abs(found)
    return row


def ssv2_class_name(template: str) -> str:
    """Class of an SSv2 row, as the official tools normalise the template."""
    return template.replace("[", "").replace("]", "")


def parse_ssv2(annotations, root: Path, labels=None, split=None):
    if not labels:
        raise ManifestError("ssv2 needs --labels labels.json (template -> index)")
    classes = read_class_file(labels)
    index = {c: i for i, c in enumerate(classes)}
    data = _read_json(annotations, "SSv2 annotation JSON")
    if not isinstance(data, list):
        raise ManifestError(f"SSv2 annotation {annotations} must be a JSON list of "
                            "{id, label, template, placeholders}")
    for n, rec in enumerate(data):
        _check_ssv2_entry(annotations, n, rec)
    videos = VideoIndex(root)
    rows = []
    for n, rec in enumerate(data):
        vid = str(rec.get("id", "")).strip()
        template = rec.get("template")
        name = ssv2_class_name(template) if template else None
        row = _label_row(Row(entry=f"item {n} (id {vid})", path=None), name, index)
        direct = root / f"{vid}.webm"
        found = direct if vid and direct.is_file() else (videos.find([vid]) if vid else None)
        if found is None:
            rows.append(_missing(row, str(direct)) if not row.reason else row)
            continue
        row.path = _abs(found)
        rows.append(row)
    return rows, classes


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {str: "a string", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _entry_error(annotations, where: str, what: str) -> ManifestError:
    return ManifestError(f"{annotations}: {where}: {what}; fix or remove that entry")


def _check_field(annotations, where: str, rec: dict, key: str, types: tuple,
                 expected: str) -> None:
    value = rec.get(key)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
        raise _entry_error(annotations, where, f"{key!r} must be {expected}, got "
                                               f"{_json_type(value)} ({value!r:.60})")


def _check_ssv2_entry(annotations, n: int, rec) -> None:
    where = f"entry {n}"
    if not isinstance(rec, dict):
        raise _entry_error(annotations, where, f"expected an object {{id, label, template, "
                                               f"placeholders}}, got {_json_type(rec)} "
                                               f"({rec!r:.60})")
    _check_field(annotations, where, rec, "id", (str, int), "a string or a number")
    _check_field(annotations, where, rec, "template", (str,), "a string")


def parse_mit(annotations, root: Path, labels=None, split=None):
    text = _read_text(annotations, "Moments in Time CSV")
    lines = _csv_lines(text)
    if lines and lines[0][1] is not None and _is_mit_header(lines[0][1]):
        lines = lines[1:]
    classes = read_class_file(labels) if labels else sorted(
        {f[1].strip() for _, f, _ in lines if f is not None and len(f) > 1})
    index = {c: i for i, c in enumerate(classes)}
    return [_mit_row(n, fields, error, root, classes, index)
            for n, fields, error in lines], classes


def _mit_row(n, fields, error, root: Path, classes, index) -> Row:
    row = Row(entry=f"line {n}", path=None)
    if error or len(fields) < 2:
        row.reason = error or (f"{len(fields)} column(s); expected 'relative/path,label'")
        return row
    name = fields[1].strip()
    if name.isdigit() and name not in index and int(name) < len(classes):
        name = classes[int(name)]  # some releases store the category index
    _label_row(row, name, index)
    candidate = root / fields[0].strip()
    if candidate.is_file():
        row.path = _abs(candidate)
    elif not row.reason:
        _missing(row, str(candidate))
    return row


# Column names seen in Moments in Time style CSVs; a header is known by these, never by
# "the first cell is not a video path", which ate first rows of .mpeg/.gif datasets.
MIT_PATH_COLUMNS = {"video", "videos", "video_path", "video_name", "path", "file", "filename",
                    "file_name", "clip"}
MIT_LABEL_COLUMNS = {"label", "labels", "category", "class", "class_name", "label_name",
                     "action"}


def _is_mit_header(first: list[str]) -> bool:
    cells = [c.strip().lower() for c in first]
    return (cells[0] in MIT_PATH_COLUMNS
            or (len(cells) > 1 and cells[1] in MIT_LABEL_COLUMNS
                and Path(cells[0]).suffix not in VIDEO_EXTS))


def parse_activitynet(annotations, root: Path, labels=None, split=None):
    data = _read_json(annotations, "ActivityNet annotation JSON")
    database = data.get("database") if isinstance(data, dict) else None
    if not isinstance(database, dict):
        raise ManifestError(f"ActivityNet annotation {annotations} has no 'database' object")
    for n, (vid, info) in enumerate(database.items()):
        _check_activitynet_entry(annotations, f"entry {n} (video {vid!r})", info)
    classes = read_class_file(labels) if labels else sorted(
        {a.get("label") for v in database.values() for a in v.get("annotations", [])
         if a.get("label")})
    index = {c: i for i, c in enumerate(classes)}
    videos = VideoIndex(root)
    rows = []
    for vid, info in database.items():
        if not _split_matches(str(info.get("subset", "")), split):
            continue
        found = videos.find([f"v_{vid}", vid])
        segments = info.get("annotations") or []
        if not segments:
            rows.append(Row(entry=f"video {vid}", path=_abs(found) if found else None,
                            reason="video has no annotated segment"))
            continue
        for k, seg in enumerate(segments):
            rows.append(_activitynet_row(vid, k, seg, found, root, index))
    return rows, classes


def _check_activitynet_entry(annotations, where: str, info) -> None:
    if not isinstance(info, dict):
        raise _entry_error(annotations, where, f"expected an object {{subset, annotations, "
                                               f"...}}, got {_json_type(info)} ({info!r:.60})")
    _check_field(annotations, where, info, "subset", (str,), "a string")
    _check_field(annotations, where, info, "annotations", (list,), "a list")
    for k, seg in enumerate(info.get("annotations") or []):
        seg_where = f"{where} annotation {k}"
        if not isinstance(seg, dict):
            raise _entry_error(annotations, seg_where, f"expected an object {{segment, "
                                                       f"label}}, got {_json_type(seg)}")
        _check_field(annotations, seg_where, seg, "label", (str,), "a string")


def _activitynet_row(vid, k, seg, found, root, index) -> Row:
    row = _label_row(Row(entry=f"video {vid} segment {k}", path=None), seg.get("label"), index)
    try:
        start, end = (float(x) for x in seg["segment"])
    except (KeyError, TypeError, ValueError):
        row.reason = f"segment {seg.get('segment')!r} is not [start, end] in seconds"
        return row
    row.start, row.end = start, end
    if end <= start and not row.reason:
        row.reason = f"segment [{start}, {end}] is empty"
    if found is None:
        return _missing(row, f"{root}/v_{vid}.* or {root}/{vid}.*") if not row.reason else row
    row.path = _abs(found)
    return row


def parse_list(annotations, root: Path, labels=None, split=None):
    text = _read_text(annotations, "file list")
    entries = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sep = "," if "," in line else None
        parts = line.rsplit(sep, 1)
        entries.append((n, parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""))
    if labels:
        classes = read_class_file(labels)
    else:
        ints = [int(lab) for _, _, lab in entries if lab.lstrip("-").isdigit()]
        classes = [str(i) for i in range(max(ints) + 1)] if ints else []
    outside = [(n, lab) for n, _, lab in entries
               if lab.lstrip("-").isdigit() and not 0 <= int(lab) < len(classes)]
    _check_label_range(annotations, labels, outside, len(classes))
    rows = []
    for n, rel, lab in entries:
        row = Row(entry=f"line {n}", path=None)
        if not lab.lstrip("-").isdigit():
            row.reason = f"label {lab!r} is not an integer class index"
        elif not 0 <= int(lab) < len(classes):
            row.reason = f"label index {lab} is outside 0..{len(classes) - 1}"
        else:
            row.label, row.class_name = int(lab), classes[int(lab)]
        p = Path(rel) if os.path.isabs(rel) else root / rel
        # The probe reports missing/empty files; keep the path for the quarantine row.
        row.path = _abs(p)
        rows.append(row)
    return rows, classes


def _check_label_range(annotations, labels, outside: list[tuple[int, str]], num: int) -> None:
    """A label beyond a given class list is a wrong list or a wrong file, not a bad row."""
    if not outside:
        return
    n, lab = outside[0]
    if labels:
        raise ManifestError(f"{annotations}: line {n}: label index {lab} is outside 0..{num - 1}"
                            f" of the class list {labels} ({len(outside)} such rows); fix the "
                            "indices or pass the class list they were written for")
    _warn(f"{annotations}: {len(outside)} rows have a label index outside 0..{num - 1} "
          f"(e.g. line {n}: {lab}); they are quarantined")


PARSERS: dict[str, Callable] = {
    "kinetics": parse_kinetics, "ssv2": parse_ssv2, "mit": parse_mit,
    "activitynet": parse_activitynet, "list": parse_list,
}


# ---------------------------------------------------------------- warnings

def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _warn_about_rows(annotations, rows: list[Row], split: str | None) -> None:
    """Legal but suspicious annotation files, one line each: they are kept as given."""
    if not rows:
        what = f"of split {split!r}" if split else "(only a header or comments?)"
        _warn(f"{annotations}: no annotation rows {what}; the manifest is empty")
        return
    first: dict[tuple, str] = {}
    dups = []
    for row in rows:
        if row.path is None:
            continue
        key = (row.path, row.label, row.class_name, row.start, row.end)
        if key in first:
            dups.append((row.entry, first[key]))
        else:
            first[key] = row.entry
    if dups:
        _warn(f"{annotations}: {len(dups)} duplicate annotation rows (same video, label and "
              f"segment as an earlier row; e.g. {dups[0][0]} repeats {dups[0][1]}); each copy "
              "is kept and weighs its video more, remove them if that is not intended")


# ---------------------------------------------------------------- probing

class Progress:
    """count, rate and ETA on stderr, redrawn at most a few times a second."""

    def __init__(self, total: int, label: str = "probing", stream=None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        # Logs (not a terminal) get a line every few seconds instead of \r redraws.
        if now - self.last >= (0.2 if self.tty else 5.0) or self.done == self.total:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.label} {self.done}/{self.total} ({rate:.1f}/s, "
                f"ETA {eta:.0f} s)")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.total:
            self.stream.write("\n")
            self.stream.flush()


def _probe_one(path: str, timeout: float | None) -> tuple[str, dict | None, str | None]:
    try:
        return path, probe_video(path, timeout=timeout), None
    except ProbeError as exc:
        return path, None, exc.reason


def _file_key(path: str) -> tuple[int, float] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime


def probe_all(paths: list[str], cache: dict[str, Any], workers: int,
              timeout: float | None = DEFAULT_TIMEOUT_S, progress: bool = True):
    """Probe paths not already in ``cache`` with the same size and mtime.

    Returns (results path → (probe, error), number probed, number reused); ``cache`` is
    updated in place, failures included, so broken files are not re-probed either.
    """
    results, todo, reused = {}, [], 0
    for p in paths:
        key, hit = _file_key(p), cache.get(p)
        if key is None:
            # Not worth a worker: the probe would only say the same.
            results[p] = (None, "file does not exist or cannot be read")
            cache.pop(p, None)
        elif hit and (hit.get("size"), hit.get("mtime")) == key:
            results[p] = (hit.get("probe"), hit.get("error"))
            reused += 1
        else:
            todo.append(p)
    bar = Progress(len(todo)) if progress and todo else None
    for path, probe, error in _run_probes(todo, workers, timeout, bar):
        results[path] = (probe, error)
        key = _file_key(path)
        if key is not None:
            cache[path] = {"size": key[0], "mtime": key[1], "probe": probe, "error": error}
        else:
            cache.pop(path, None)
    if bar:
        bar.close()
    return results, len(todo), reused


def _run_probes(todo: list[str], workers: int, timeout, bar):
    if workers <= 1 or len(todo) <= 1:
        for p in todo:
            yield _probe_one(p, timeout)
            if bar:
                bar.update()
        return
    # Fork, so that each worker's parent is this process (die_with_parent checks it).
    ctx = multiprocessing.get_context("fork") if _can_fork() else None
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                               initializer=_init_worker, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(_probe_one, p, timeout) for p in todo]
        for fut in as_completed(futures):
            yield fut.result()
            if bar:
                bar.update()
    except BaseException:
        # SIGTERM, Ctrl-C or an error: a clean shutdown would wait for every running probe.
        _kill_pool(pool)
        raise
    pool.shutdown()


def _init_worker(parent_pid: int) -> None:
    # Forked workers inherit the builder's SIGTERM handler; they should just stop.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)


def _can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    """Kill the workers now; their probe children die with them (die_with_parent)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for proc in processes:
        proc.join(5)


# ---------------------------------------------------------------- output

def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _write_atomic(path: Path, text: str) -> None:
    # A crash mid-write must not leave a half manifest that looks valid.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _load_cache(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / PROBE_CACHE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}  # a missing or damaged cache only costs a re-probe
    if not isinstance(data, dict) or data.get("version") != PROBE_CACHE_VERSION:
        return {}
    return data.get("probes", {})


def _foreign_quarantine(out: Path) -> list[dict]:
    """Quarantine rows added later by training (source != manifest); the builder's own
    rows are rewritten on every build."""
    keep = []
    try:
        lines = (out / QUARANTINE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return keep
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("source") != "manifest":
            keep.append(rec)
    return keep


def _run_quarantined(foreign: list[dict], to_probe: list[str]) -> set[str]:
    """Annotated files that a training or eval run quarantined.

    Such a row records what one run met (a DALI error, a bad disk, a file since replaced),
    not what the file is, so a rebuild probes these files again without their cache entry.
    """
    paths = {r.get("path") for r in foreign if r.get("source") in RUN_SOURCES}
    return paths & set(to_probe)


def _report_reprobed(reprobed: set[str], samples: list[dict]) -> int:
    back = len(reprobed & {s["path"] for s in samples})
    if reprobed:
        print(f"re-probed {len(reprobed)} files quarantined by training/eval runs: {back} back "
              f"in the manifest, {len(reprobed) - back} still quarantined", file=sys.stderr)
    return back


def _resolve_sample(row: Row, probe: dict | None, error: str | None,
                    keep_decode_errors: bool = False) -> tuple[dict | None, dict | None]:
    base = {"path": row.path, "entry": row.entry}
    if row.reason:
        return None, {**base, "reason": row.reason, "source": "manifest"}
    if error or probe is None:
        return None, {**base, "reason": error or "probe failed", "source": "manifest"}
    decode_errors = probe.get("decode_errors") or []
    if decode_errors and not keep_decode_errors:
        # Frames came out, but FFmpeg logged damage: DALI may fail or show garbage.
        return None, {**base, "reason": f"decode errors: {decode_errors[0]}",
                      "source": "manifest"}
    end = row.end
    if row.start is not None:
        duration = probe.get("duration") or 0.0
        if duration and row.start >= duration:
            return None, {**base, "reason": f"segment starts at {row.start} s, after the "
                                            f"video's end ({duration:.2f} s)",
                          "source": "manifest"}
        if duration and end is not None and end > duration:
            end = duration  # annotators round segment ends past the last frame
    return {"path": row.path, "label": row.label, "class_name": row.class_name,
            "start": row.start, "end": end, "probe": probe}, None


def build_manifest(fmt: str, annotations, root, out, labels=None, split=None,
                   workers: int | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
                   progress: bool = True,
                   keep_decode_errors: bool = False) -> dict[str, Any]:
    """Parse, probe and write OUT/{manifest,quarantine}.jsonl, classes.json, meta.json.

    Files whose probe logged FFmpeg errors are quarantined unless ``keep_decode_errors``;
    kept ones list the errors in ``probe["decode_errors"]`` for the training config.

    Returns a summary: num_rows == num_samples + num_quarantined, plus how many files
    were probed now and how many probes were reused from the cache.
    """
    if fmt not in PARSERS:
        raise ManifestError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    started = time.monotonic()
    root, out = Path(os.path.abspath(root)), Path(os.path.abspath(out))
    if not root.is_dir():
        raise ManifestError(f"video root {root} is not a directory; pass --root DIR")
    rows, classes = PARSERS[fmt](Path(annotations), root, labels, split)
    _warn_about_rows(annotations, rows, split)
    out.mkdir(parents=True, exist_ok=True)

    cache = _load_cache(out)
    to_probe = sorted({r.path for r in rows if r.path and not r.reason})
    foreign = _foreign_quarantine(out)
    reprobed = _run_quarantined(foreign, to_probe)
    for path in reprobed:
        cache.pop(path, None)
    results, probed, reused = probe_all(to_probe, cache, workers or default_workers(),
                                        timeout, progress)
    samples, quarantined = [], []
    for row in rows:
        probe, error = results.get(row.path, (None, None)) if row.path else (None, None)
        sample, bad = _resolve_sample(row, probe, error, keep_decode_errors)
        (samples.append(sample) if sample else quarantined.append(bad))
    restored = _report_reprobed(reprobed, samples)
    # The new probe decides for re-probed files: their run rows go, a failure is
    # quarantined again above with today's reason.
    foreign = [r for r in foreign
               if not (r.get("source") in RUN_SOURCES and r.get("path") in reprobed)]

    _write_atomic(out / MANIFEST, _jsonl(samples))
    _write_atomic(out / QUARANTINE, _jsonl(quarantined + foreign))
    _write_atomic(out / CLASSES, json.dumps(classes, ensure_ascii=False, indent=1) + "\n")
    _write_atomic(out / PROBE_CACHE,
                  json.dumps({"version": PROBE_CACHE_VERSION, "probes": cache}) + "\n")
    meta = {"format": fmt, "annotations": _abs(Path(annotations)), "root": str(root),
            "labels": _abs(Path(labels)) if labels else None, "split": split,
            "keep_decode_errors": keep_decode_errors,
            "num_samples": len(samples), "num_quarantined": len(quarantined),
            "num_classes": len(classes),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_atomic(out / META, json.dumps(meta, indent=1) + "\n")
    return {**meta, "out": str(out), "num_rows": len(rows), "probed": probed,
            "reused": reused, "reprobed_run_quarantine": len(reprobed), "restored": restored,
            "seconds": round(time.monotonic() - started, 3)}


def load_manifest(directory) -> tuple[list[dict], list[str]]:
    """(records, classes) of a manifest directory written by build_manifest."""
    d = Path(directory)
    if not (d / MANIFEST).is_file() or not (d / CLASSES).is_file():
        raise ManifestError(
            f"no manifest in {d} ({MANIFEST} and {CLASSES} needed); create it with "
            f"`python -m dali_pipes.manifest {{{','.join(FORMATS)}}} --annotations FILE "
            f"--root VIDEO_DIR --out {d}`")
    records = []
    for n, line in enumerate((d / MANIFEST).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{d / MANIFEST} line {n} is not JSON ({exc}); rebuild the "
                                "manifest") from None
    classes = json.loads((d / CLASSES).read_text(encoding="utf-8"))
    return records, classes


def reason_kind(reason: str) -> str:
    """A short class of a quarantine reason for summaries ("short decode", "cannot read ...")."""
    text = str(reason)
    for prefix in ("DecodeError: ", "RuntimeError: ", "ProbeError: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text.split(":")[0].split(" (")[0][:60]


def read_quarantine(directory) -> list[dict]:
    """Rows of a manifest folder's quarantine.jsonl; a torn line (a kill mid-write) is skipped."""
    path = Path(directory) / QUARANTINE
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_quarantine(directory, path, reason: str, source: str) -> None:
    """Append one quarantine row; safe from several processes at once.

    One os.write on an O_APPEND descriptor puts the whole line at the current end of
    file, so concurrent writers never interleave within a line.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"path": str(path), "reason": str(reason), "source": str(source),
                       "time": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                      ensure_ascii=False) + "\n"
    fd = os.open(d / QUARANTINE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        # A subcommand in front of the format positional, so every existing command line of
        # the builder keeps its meaning; the report lives in its own module.
        from .report import main as report_main
        return report_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m dali_pipes.manifest", description=__doc__.split("\n\n")[0],
        epilog="python -m dali_pipes.manifest report DIR [DIR ...] --out REPORT_DIR writes a "
               "data report of built manifests (PNG per folder plus report.md); see "
               "`python -m dali_pipes.manifest report -h`.")
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("--annotations", required=True, help="official annotation file")
    parser.add_argument("--labels", help="class list (text, 'name,index' lines or JSON)")
    parser.add_argument("--root", required=True, help="folder holding the videos")
    parser.add_argument("--out", required=True, help="output folder of the manifest")
    parser.add_argument("--split", help="train|val|test (Kinetics split column, "
                                        "ActivityNet subset)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"probe processes (default min(8, cpus) = {default_workers()})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds per file before the probe is killed")
    parser.add_argument("--json", action="store_true",
                        help="print the whole build summary as JSON (it is also meta.json)")
    parser.add_argument("--keep-decode-errors", action="store_true",
                        help="keep files whose probe logged FFmpeg decode errors (listed in "
                             "probe.decode_errors) instead of quarantining them")
    args = parser.parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        summary = build_manifest(args.format, args.annotations, args.root, args.out,
                                 args.labels, args.split, args.workers, args.timeout,
                                 keep_decode_errors=args.keep_decode_errors)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"error: stopped by SIGTERM; probe workers killed, manifest in {args.out} not "
              "written or incomplete: run the same command again", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    print(json.dumps(summary, indent=1) if args.json else summary_line(summary))
    return 0


def summary_line(summary: dict, name: str = "") -> str:
    """One console line of a build summary (the full one is meta.json in the manifest)."""
    reused = f", {summary['reused']} probes reused" if summary.get("reused") else ""
    back = f", {summary['restored']} restored" if summary.get("restored") else ""
    return (f"{name or summary['out']}: {summary['num_samples']:,} samples, "
            f"{summary['num_quarantined']:,} quarantined, {summary['num_classes']} classes "
            f"({summary['format']}{reused}{back}, {summary['seconds']:.1f} s) -> "
            f"{summary['out']}/manifest.jsonl")


class Terminated(Exception):
    """SIGTERM reached the builder; raised in the main thread to unwind the probe pool."""


def _raise_terminated(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
