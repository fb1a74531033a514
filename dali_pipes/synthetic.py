"""A small synthetic multi-dataset whose label spaces are related in known ways.

One generative world — a coloured shape moving over a noisy, tinted background — is
labelled four ways, each dataset written in the OFFICIAL annotation format of a real
one so that the demo goes through the same manifest code as real data:

=============  ======================  =====================================
dataset        format (as)             classes
=============  ======================  =====================================
shapecolor     Kinetics CSV            9: "<colour> <shape>"
shape          ActivityNet JSON        3: shape, labelled on a segment only
color          SSv2 JSON + labels      3: "Showing something that is <colour>"
direction      Moments in Time CSV     4: "moving <dir>" (no horizontal flip!)
=============  ======================  =====================================

``relations.json`` holds the ground truth the projection heads should learn
(shapecolor ↔ shape, shapecolor ↔ color; direction relates to nothing).

    python -m dali_pipes.synthetic --out demo_data [--videos-per-class 24] [--seed 0]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# Three shapes that stay distinct at the tiny model's 64 px / 4 px-patch resolution: a ring (dark
# centre), a filled square (bright everywhere) and a plus-shaped cross (bright centre, dark
# corners). A filled circle, square and triangle of ~10 px radius are near-identical blobs to it.
SHAPES = ("ring", "square", "cross")
# Light colours: every channel of every shape is far brighter than the dark background, so the
# luminance contrast (what shape is learned from) is the same for all colours and the hue still
# tells the colour apart. Saturated primaries stand out in one channel only, which makes the
# shape features colour-dependent and shape far slower to learn.
COLOURS = {"red": (255, 120, 110), "green": (120, 245, 120), "blue": (120, 150, 255)}
DIRECTIONS = ("left", "right", "up", "down")
WIDTH, HEIGHT, FPS = 112, 84, 24
CLIP_FRAMES = 40
ACTIVITYNET_FRAMES = 96
# Videos per class relative to --videos-per-class. "direction" stands in for Moments in Time, the
# largest of the four real datasets; it also needs the most distinct clips: with 24 a class its
# head seems to fit the look of its 96 training clips, not their motion, and stays at chance on
# validation, while three times as many clips teach it motion (README: "What the demo shows").
SIZE_FACTOR = {"shapecolor": 1, "shape": 1, "color": 1, "direction": 3}
GENERATOR_VERSION = 5  # bump when the rendering changes, so cached demo data is rebuilt
COLOR_TEMPLATE = "Showing [something] that is {}"
SPLITS = ("train", "val")


# ---------------------------------------------------------------- rendering

def _shape_mask(shape: str, cx: float, cy: float, r: float, xx, yy) -> np.ndarray:
    if shape == "ring":
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    if shape == "cross":
        # Plus sign: two bars of half-width 0.32 r crossing at the centre.
        dx, dy = np.abs(xx - cx), np.abs(yy - cy)
        arm = 0.32 * r
        return ((dx <= r) & (dy <= arm)) | ((dy <= r) & (dx <= arm))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_clip(rng: np.random.Generator, shape: str, colour: str, direction: str,
                frames: int, visible: tuple[int, int] | None = None) -> np.ndarray:
    """(frames, HEIGHT, WIDTH, 3) uint8; the shape is drawn only on frames in ``visible``."""
    first, last = visible if visible else (0, frames)
    span = last - first
    r = rng.uniform(12, 17)
    # Dark grey-ish backgrounds with a weak tint, so colour is carried only by the shape, and
    # every shape is brighter than its background: with a contrast whose sign flips with the
    # colour, the tiny from-scratch transformer needs far more steps than a demo has to learn shape.
    base = rng.uniform(25, 65) + rng.uniform(-8, 8, size=3)
    texture = rng.normal(0, 14, size=(HEIGHT, WIDTH, 3))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    start, velocity = _trajectory(rng, direction, r, span)
    fill = np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-15, 15, size=3)
    out = np.empty((frames, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(frames):
        img = base + texture + rng.normal(0, 5, size=(HEIGHT, WIDTH, 3))
        if first <= t < last:
            cx, cy = start + velocity * (t - first)
            img[_shape_mask(shape, cx, cy, r, xx, yy)] = fill
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _trajectory(rng, direction: str, r: float, span: int):
    """Start point and per-frame velocity that keep the shape inside the frame."""
    along = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    extent = np.array([WIDTH, HEIGHT], dtype=np.float64)
    axis = 0 if along[0] else 1
    travel = rng.uniform(0.55, 0.8) * (extent[axis] - 2 * r)
    lo = r + 1
    start = np.array([rng.uniform(lo, WIDTH - lo), rng.uniform(lo, HEIGHT - lo)])
    # On the moving axis start far enough back that the whole path stays visible.
    begin = rng.uniform(lo, extent[axis] - lo - travel)
    start[axis] = begin if along[axis] > 0 else extent[axis] - begin
    velocity = np.array(along, dtype=np.float64) * travel / max(span - 1, 1)
    return start, velocity


# Container and encoder by file extension: VP9 webm (DALI's CPU decoder reads it) for the
# demo, H.264 mp4 (NVDEC, or the PyAV fallback on a CPU machine) for Kinetics-like clips.
_ENCODERS = {".webm": ("webm", "libvpx-vp9", {"deadline": "realtime", "cpu-used": "8"}),
             ".mp4": ("mp4", "libx264", {"preset": "veryfast", "g": "60"})}


def encode_video(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    """(T, H, W, 3) uint8 frames -> a video file whose codec follows the extension."""
    import av

    fmt, codec, options = _ENCODERS[Path(path).suffix]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        # threads=1: parallelism comes from one process per video instead.
        stream = container.add_stream(codec, rate=fps, options={**options, "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # never leave a half-written video behind an interrupted run


def textured_scene(rng: np.random.Generator, frames: int, width: int, height: int) -> np.ndarray:
    """(frames, H, W, 3) uint8: a smooth textured scene under a slow pan with two moving
    squares and mild sensor noise, a bitrate like a Kinetics clip's (~100 kB/s), so a codec
    has real work (benchmark clips)."""
    yy, xx = np.mgrid[0:height + frames * 2, 0:width + frames * 3].astype(np.float32)
    scene = np.zeros(yy.shape + (3,), np.float32)
    for c in range(3):
        for _ in range(4):
            fy, fx, ph = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
            scene[..., c] += 30 * np.sin(fy * yy + fx * xx + ph)
    scene += 128
    out = np.empty((frames, height, width, 3), np.uint8)
    boxes = rng.integers(10, 60, (2, 4))
    for t in range(frames):
        img = scene[2 * t: 2 * t + height, 3 * t: 3 * t + width].copy()
        for k, (y, x, vy, vx) in enumerate(boxes):
            y0, x0 = (y + vy * t // 8) % (height - 40), (x + vx * t // 8) % (width - 40)
            img[y0:y0 + 40, x0:x0 + 40] = (220, 60, 40) if k else (40, 200, 90)
        img += rng.normal(0, 2, img.shape)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _render_job(job: dict) -> str:
    rng = np.random.default_rng(job["seed"])
    clip = render_clip(rng, job["shape"], job["colour"], job["direction"], job["frames"],
                       tuple(job["visible"]) if job.get("visible") else None)
    encode_video(clip, Path(job["path"]))
    return job["path"]


# ---------------------------------------------------------------- datasets

def shapecolor_classes() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def color_classes() -> list[str]:
    return [COLOR_TEMPLATE.format(c).replace("[", "").replace("]", "") for c in COLOURS]


def direction_classes() -> list[str]:
    return [f"moving {d}" for d in DIRECTIONS]


def _sample_world(rng, **fixed) -> dict:
    return {
        "shape": fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))],
        "colour": fixed.get("colour") or list(COLOURS)[rng.integers(len(COLOURS))],
        "direction": fixed.get("direction") or DIRECTIONS[rng.integers(len(DIRECTIONS))],
    }


def _plan(out: Path, counts: dict[str, int], seed: int) -> tuple[list[dict], dict]:
    """All render jobs plus the annotation content, derived only from ``seed``."""
    planners = {"shapecolor": _plan_shapecolor, "shape": _plan_shape, "color": _plan_color,
                "direction": _plan_direction}
    jobs, ann = [], {name: {} for name in planners}
    for split_no, split in enumerate(SPLITS):
        for name, plan in planners.items():
            n = counts[split] * SIZE_FACTOR[name]
            ann[name][split] = plan(out, split, split_no, n, seed, jobs)
    return jobs, ann


def _job(jobs, path: Path, seed_key: list[int], world: dict, frames: int, visible=None):
    jobs.append({"path": str(path), "seed": seed_key, "frames": frames, "visible": visible,
                 **world})


def _plan_shapecolor(out, split, split_no, n, seed, jobs):
    rows, k = [], 0
    for ci, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        label = f"{colour} {shape}"
        for i in range(n):
            rng = np.random.default_rng([seed, 0, split_no, ci, i])
            yid = f"sc{split}{k:05d}"
            k += 1
            world = _sample_world(rng, shape=shape, colour=colour)
            path = out / "shapecolor" / "videos" / label / f"{yid}_000000_000002.webm"
            _job(jobs, path, [seed, 0, split_no, ci, i, 1], world, CLIP_FRAMES)
            rows.append({"label": label, "youtube_id": yid, "time_start": 0, "time_end": 2,
                         "split": split})
    return rows


def _plan_shape(out, split, split_no, n, seed, jobs):
    database = {}
    subset = {"train": "training", "val": "validation"}[split]
    for ci, shape in enumerate(SHAPES):
        for i in range(n):
            rng = np.random.default_rng([seed, 1, split_no, ci, i])
            vid = f"shp{split}{ci}{i:04d}"
            length = int(rng.integers(40, 57))
            first = int(rng.integers(4, ACTIVITYNET_FRAMES - length - 4))
            world = _sample_world(rng, shape=shape)
            path = out / "shape" / "videos" / f"v_{vid}.webm"
            _job(jobs, path, [seed, 1, split_no, ci, i, 1], world, ACTIVITYNET_FRAMES,
                 [first, first + length])
            database[vid] = {
                "subset": subset, "duration": ACTIVITYNET_FRAMES / FPS,
                "url": f"https://example.invalid/synthetic/{vid}",
                "resolution": f"{WIDTH}x{HEIGHT}",
                "annotations": [{"segment": [round(first / FPS, 4),
                                             round((first + length) / FPS, 4)],
                                 "label": shape}],
            }
    return database


def _plan_color(out, split, split_no, n, seed, jobs):
    items = []
    for ci, colour in enumerate(COLOURS):
        for i in range(n):
            rng = np.random.default_rng([seed, 2, split_no, ci, i])
            vid = str(100000 * (split_no + 1) + 1000 * ci + i)
            world = _sample_world(rng, colour=colour)
            _job(jobs, out / "color" / "videos" / f"{vid}.webm", [seed, 2, split_no, ci, i, 1],
                 world, CLIP_FRAMES)
            template = COLOR_TEMPLATE.format(colour)
            items.append({"id": vid, "label": template.replace("[something]", world["shape"]),
                          "template": template, "placeholders": [world["shape"]]})
    return items


def _plan_direction(out, split, split_no, n, seed, jobs):
    rows = []
    for ci, direction in enumerate(DIRECTIONS):
        name = f"moving {direction}"
        for i in range(n):
            rng = np.random.default_rng([seed, 3, split_no, ci, i])
            rel = f"moving_{direction}/dir_{split}_{ci}{i:04d}.webm"
            _job(jobs, out / "direction" / "videos" / rel, [seed, 3, split_no, ci, i, 1],
                 _sample_world(rng, direction=direction), CLIP_FRAMES)
            rows.append([rel, name, 3, 0])  # MiT columns: path, label, agree, disagree
    return rows


# ---------------------------------------------------------------- annotation files

def _write_annotations(out: Path, ann: dict) -> list[dict]:
    sc, sh, co, di = (out / d / "annotations" for d in ("shapecolor", "shape", "color",
                                                         "direction"))
    for d in (sc, sh, co, di):
        d.mkdir(parents=True, exist_ok=True)
    kin_files = {"train": sc / "train.csv", "val": sc / "validate.csv"}
    for split, path in kin_files.items():
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["label", "youtube_id", "time_start", "time_end", "split"],
                           lineterminator="\n")
        w.writeheader()
        w.writerows(ann["shapecolor"][split])
        path.write_text(buf.getvalue())
    anet = sh / "activity_net.v1-3.min.json"
    anet.write_text(json.dumps({"version": "VERSION 1.3 (synthetic)", "taxonomy": [],
                                "database": {**ann["shape"]["train"], **ann["shape"]["val"]}},
                               indent=1))
    ssv2_files = {"train": co / "something-something-v2-train.json",
                  "val": co / "something-something-v2-validation.json"}
    for split, path in ssv2_files.items():
        path.write_text(json.dumps(ann["color"][split], indent=1))
    ssv2_labels = co / "something-something-v2-labels.json"
    ssv2_labels.write_text(json.dumps({c: str(i) for i, c in enumerate(color_classes())},
                                      indent=1))
    mit_files = {"train": di / "trainingSet.csv", "val": di / "validationSet.csv"}
    for split, path in mit_files.items():
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(ann["direction"][split])
        path.write_text(buf.getvalue())
    categories = di / "moments_categories.txt"
    categories.write_text("".join(f"{c},{i}\n" for i, c in enumerate(direction_classes())))
    return [
        _describe("shapecolor", "kinetics", kin_files, None, out, {"train": "train",
                                                                   "val": "val"}, True),
        _describe("shape", "activitynet", {"train": anet, "val": anet}, None, out,
                  {"train": "training", "val": "validation"}, True),
        _describe("color", "ssv2", ssv2_files, ssv2_labels, out, {}, True),
        _describe("direction", "mit", mit_files, categories, out, {}, False),
    ]


def _describe(name, fmt, files, labels, out: Path, splits: dict, flip: bool) -> dict:
    root = out / name / "videos"
    commands = {}
    for split, ann in files.items():
        cmd = (f"python -m dali_pipes.manifest {fmt} --annotations {ann} --root {root} "
               f"--out {out / 'manifests' / name / split}")
        if labels:
            cmd += f" --labels {labels}"
        if split in splits:
            cmd += f" --split {splits[split]}"
        commands[split] = cmd
    return {"name": name, "format": fmt, "annotations": {k: str(v) for k, v in files.items()},
            "labels": str(labels) if labels else None, "root": str(root),
            "split_arg": {s: splits.get(s) for s in files}, "flip": flip,
            "manifest_commands": commands}


def relations() -> list[dict]:
    """Ground-truth class relations between datasets, by class name."""
    rel = []
    colour_name = dict(zip(COLOURS, color_classes()))
    for colour in COLOURS:
        for shape in SHAPES:
            src = f"{colour} {shape}"
            rel.append({"source": "shapecolor", "source_class": src, "target": "shape",
                        "target_classes": [shape]})
            rel.append({"source": "shapecolor", "source_class": src, "target": "color",
                        "target_classes": [colour_name[colour]]})
    for shape in SHAPES:
        rel.append({"source": "shape", "source_class": shape, "target": "shapecolor",
                    "target_classes": [f"{c} {shape}" for c in COLOURS]})
    for colour in COLOURS:
        rel.append({"source": "color", "source_class": colour_name[colour],
                    "target": "shapecolor", "target_classes": [f"{colour} {s}" for s in SHAPES]})
    return rel


# ---------------------------------------------------------------- entry points

def generate(out, videos_per_class: int = 24, val_per_class: int | None = None,
             seed: int = 0, workers: int | None = None, progress: bool = True) -> dict:
    """Write videos, annotation files, relations.json and datasets.json under ``out``.

    ``datasets.json`` is written last and records the parameters, so a finished run with
    the same parameters is detected and skipped (see ``prepare_demo``).
    """
    from .manifest import Progress, default_workers

    if videos_per_class < 1:
        raise ValueError(f"videos_per_class must be >= 1, got {videos_per_class}")
    val_per_class = val_per_class if val_per_class else max(1, round(videos_per_class / 3))
    out = Path(out).resolve()
    started = time.monotonic()
    jobs, ann = _plan(out, {"train": videos_per_class, "val": val_per_class}, seed)
    bar = Progress(len(jobs), "rendering") if progress else None
    workers = workers or default_workers()
    if workers <= 1:
        for job in jobs:
            _render_job(job)
            bar and bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_render_job, jobs, chunksize=4):
                bar and bar.update()
    if bar:
        bar.close()
    datasets = _write_annotations(out, ann)
    (out / "relations.json").write_text(json.dumps(relations(), indent=1))
    params = _params(videos_per_class, val_per_class, seed)
    info = {**params, "num_videos": len(jobs), "width": WIDTH, "height": HEIGHT, "fps": FPS,
            "datasets": datasets,
            "seconds": round(time.monotonic() - started, 2)}
    (out / "datasets.json").write_text(json.dumps(info, indent=1))
    return info


def _params(videos_per_class, val_per_class, seed) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": seed,
            "videos_per_class": videos_per_class, "val_per_class": val_per_class}


def _existing(out: Path, params: dict) -> dict | None:
    try:
        info = json.loads((out / "datasets.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return info if all(info.get(k) == v for k, v in params.items()) else None


def prepare_demo(out_dir, workers: int | None = None, videos_per_class: int = 24,
                 val_per_class: int | None = None, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Generate the demo data (unless already there) and build its 8 manifests.

    Returns {"data": dir, "generated": bool, "datasets": [...], "relations": path,
    "manifests": {name: {"train": dir, "val": dir}}, "summaries": {...}}.
    """
    from .manifest import build_manifest

    out = Path(out_dir).resolve()
    data = out / "data"
    val_n = val_per_class if val_per_class else max(1, round(videos_per_class / 3))
    info = _existing(data, _params(videos_per_class, val_n, seed))
    generated = info is None
    if generated:
        info = generate(data, videos_per_class, val_n, seed, workers, progress)
    manifests, summaries = {}, {}
    for ds in info["datasets"]:
        for split, ann in ds["annotations"].items():
            target = out / "manifests" / ds["name"] / split
            summaries[f"{ds['name']}/{split}"] = build_manifest(
                ds["format"], ann, ds["root"], target, labels=ds["labels"],
                split=ds["split_arg"].get(split), workers=workers, progress=progress)
            manifests.setdefault(ds["name"], {})[split] = str(target)
    return {"data": str(data), "generated": generated, "datasets": info["datasets"],
            "relations": str(data / "relations.json"), "manifests": manifests,
            "summaries": summaries}


def check_dali_decode(path) -> tuple[int, int, int]:
    """(frames, height, width) as DALI's CPU video decoder sees the file."""
    from nvidia.dali import fn, pipeline_def, types

    data = np.fromfile(path, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        encoded = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
        return fn.decoders.video(encoded, device="cpu")

    p = pipe()
    p.build()
    (frames,) = p.run()
    shape = frames.as_array().shape  # (batch, F, H, W, C)
    return int(shape[1]), int(shape[2]), int(shape[3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dali_pipes.synthetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--videos-per-class", type=int, default=24,
                        help="training videos per class (default 24; three times as many for direction)")
    parser.add_argument("--val-per-class", type=int, default=None,
                        help="validation videos per class (default a third of the above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--manifests", action="store_true",
                        help="also build the 8 manifests under OUT/manifests "
                             "(data then goes to OUT/data)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip decoding one video per dataset with DALI's CPU decoder")
    args = parser.parse_args(argv)
    if args.manifests:
        result = prepare_demo(args.out, args.workers, args.videos_per_class,
                              args.val_per_class, args.seed)
        datasets = result["datasets"]
    else:
        result = generate(args.out, args.videos_per_class, args.val_per_class, args.seed,
                          args.workers)
        datasets = result["datasets"]
    if not args.no_verify:
        for ds in datasets:
            first = next(p for p in sorted(Path(ds["root"]).rglob("*.webm")))
            frames, h, w = check_dali_decode(first)
            print(f"DALI CPU decode check {ds['name']}: {first.name} -> {frames}x{h}x{w}",
                  file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "datasets"}, indent=1))
    else:
        from .manifest import summary_line
        for name, summary in result.get("summaries", {}).items():
            print(summary_line(summary, name))
        data = result.get("data", args.out)  # without --manifests the data goes to --out
        print(f"demo data: {data} (true relations: {Path(data) / 'relations.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
