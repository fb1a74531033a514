"""DALI training pipeline vs PyAV + torch DataLoader on the same files, side by side.

Both paths decode the same frames of the same VP9 files and apply the same augmentation from
the same per-sample parameters (short-side resize of the crop window, crop, flip,
RandAugment, normalise); only the engine differs.

    python tools/data_throughput.py --threads 2 --workers 2 --clips 96 --rounds 5

Files: VP9 320x240 clips generated once into --data (default /tmp/mt_throughput_scene), or
any manifest directory via --manifest. Both engines are timed in steady state, between batch
arrivals (`peer.Window`): start-up, warm-up batches and tear-down are outside the window.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_clips(out: Path, videos: int, frames: int, width: int, height: int) -> Path:
    """VP9 webm clips with moving texture (so the codec has real work) + their manifest."""
    from dali_pipes.probe import probe_video
    from dali_pipes.synthetic import encode_video, textured_scene

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(videos):
        path = out / f"clip{k:03d}_{width}x{height}.webm"
        if not path.is_file():
            encode_video(textured_scene(np.random.default_rng(k), frames, width, height), path, fps=25)
        rows.append({"path": str(path), "label": k % 4, "class_name": f"c{k % 4}",
                     "start": None, "end": None, "probe": probe_video(path, timeout=None)})
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "classes.json").write_text(json.dumps([f"c{i}" for i in range(4)]))
    return out


def build_cfg(manifest: Path, args):
    from config import config_from_dict
    return config_from_dict({
        "data": {"datasets": [{"name": "bench", "manifest": str(manifest), "stride": args.stride}],
                 "batch_size": args.batch, "num_threads": args.threads, "prefetch": 2,
                 "decode_device": "cpu", "crop_size": args.crop, "fallback_workers": args.workers,
                 "rand_aug_n": args.rand_aug_n, "num_sample": args.num_sample},
        "train": {"seed": 0}})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", help="manifest dir to read (default: generated VP9 clips)")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "mt_throughput_scene"))
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--video-frames", type=int, default=64)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--frames", type=int, default=16, help="clip length T")
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the peer")
    ap.add_argument("--rand-aug-n", type=int, default=4)
    ap.add_argument("--num-sample", type=int, default=2,
                    help="augmented clips per decoded video (data.num_sample, the recipe's 2: "
                         "both engines decode once for both clips; 1: a clip per video)")
    ap.add_argument("--clips", type=int, default=96, help="clips timed per engine and round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import torch
    from dali_pipes.loader import build_train_loader
    from dali_pipes.peer import measure_loader, measure_peer, peer_dataset, warmup_rounds

    torch.set_num_threads(1)
    manifest = Path(args.manifest) if args.manifest else make_clips(
        Path(args.data), args.videos, args.video_frames, args.width, args.height)
    cfg = build_cfg(manifest, args)
    loader = build_train_loader(cfg, args.frames, args.crop)
    warmup = warmup_rounds(2, args.workers)
    # The peer's dataset counts videos: each gives num_sample clips.
    videos = -(-args.clips // args.num_sample) + warmup * args.batch
    peer_set = peer_dataset(loader, videos, args.crop, cfg.data.mean,
                            cfg.data.std)
    # Alternating rounds and medians: other processes on a shared machine shift single runs.
    rounds, cpu = [], []
    for r in range(args.rounds):
        d = measure_loader(loader, args.clips)
        p = measure_peer(peer_set, args.batch, args.workers, warmup)
        dali, peer = d["clips_per_s"], p["clips_per_s"]
        rounds.append((dali, peer))
        cpu.append((d["cpu_ms_per_clip"], p["cpu_ms_per_clip"]))
        print(f"round {r}: DALI {dali:6.1f} clips/s | peer {peer:6.1f} clips/s | {dali / peer:.2f}x"
              f" | CPU ms/clip DALI {cpu[-1][0]:.1f}, peer {cpu[-1][1]:.1f}", flush=True)
    loader.close()
    dali, peer = (float(np.median([x[k] for x in rounds])) for k in (0, 1))
    ratio = float(np.median([d / p for d, p in rounds]))
    cpu_dali, cpu_peer = (float(np.median([x[k] for x in cpu])) for k in (0, 1))
    print(f"files: {manifest} | clip {args.frames}x{args.stride}, crop {args.crop}, batch "
          f"{args.batch} videos x {args.num_sample} clips, RandAugment n={args.rand_aug_n} "
          f"(geometry: {loader.geom_interp}), "
          f"DALI threads {args.threads}, peer workers {args.workers}, {args.clips} clips/round")
    print(f"DALI  : {dali:7.1f} clips/s (median of {args.rounds} rounds)")
    print(f"peer  : {peer:7.1f} clips/s [PyAV + torch DataLoader, same files and parameters]")
    print(f"ratio : {ratio:.2f}x (median of per-round ratios; target >= 1.5x)")
    print(f"CPU   : DALI {cpu_dali:.1f} ms/clip, peer {cpu_peer:.1f} ms/clip, peer/DALI "
          f"{cpu_peer / cpu_dali:.2f}x (medians; other jobs move this much less than clips/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
