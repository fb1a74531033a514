"""Multi-view evaluation of a MultiTrain checkpoint, each dataset scored with its own head.

    python eval.py --ckpt runs/multi/ckpt_00012345.pt [--cfg FILE] [key=value ...]

Softmax scores are averaged over each video's temporal x spatial views (3x3 by default, set per
dataset with data.datasets.N.test_views). Results go to eval.json beside the checkpoint and to
TensorBoard; with a ground-truth relations file (the synthetic demo) it also reports how many
true cross-dataset relations the learned projection heads rank first.
"""
from __future__ import annotations

import argparse
import os

from config import ConfigError, exit_on_config_error, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="training checkpoint (ckpt_*.pt), model_inference.pt, or a run directory (its latest checkpoint)")
    p.add_argument("--cfg", default=None, help="YAML config; default: the config stored in the checkpoint")
    p.add_argument("--out", default=None, help="eval.json path; default: beside the checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.datasets.0.test_views=[5,1]")
    return p.parse_args(argv)


def _check_cli(args) -> None:
    if not os.path.exists(args.ckpt):
        raise ConfigError(f"--ckpt {args.ckpt}: no such checkpoint or run directory")
    if args.cfg:
        load_config(args.cfg, args.overrides)


if __name__ == "__main__":  # a config mistake shows in a second, before torch and DALI load
    exit_on_config_error(_check_cli, parse_args())

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import runtime  # noqa: E402
from config import Config, config_from_dict  # noqa: E402
from dali_pipes import build_eval_loader  # noqa: E402
from models import projection_argmax, projection_pairs  # noqa: E402


class EvaluationStopped(RuntimeError):
    """A stop signal arrived during evaluation; it ended at the next batch."""


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """(len(ks),) videos whose label is among the k best classes, on scores' device.
    scores (N, C), labels (N,)."""
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1).indices  # (N, k_max)
    hit = top == labels[:, None]  # (N, k_max)
    return torch.stack([hit[:, :min(k, k_max)].any(dim=1).sum() for k in ks])


def view_averaged_scores(logits: torch.Tensor, views: int) -> torch.Tensor:
    """(N·V, C) logits of V views per video → (N, C) softmax averaged over the views."""
    probs = logits.float().softmax(dim=1)
    return probs.view(-1, views, probs.shape[1]).mean(dim=1)


def score_batches(model, batches, name: str, num_classes: int, precision: str, device,
                  should_stop=None, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 and top-5 hits (2,), confusion counts (C, C) rows true, columns predicted),
    summed over `batches` on the device with no host read per batch."""
    hits = torch.zeros(2, dtype=torch.long, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    for batch in batches:
        video, labels = batch.video, batch.labels  # (N, V, 3, T, H, W), (N,)
        with runtime.autocast(precision, device):
            logits = model(video.flatten(0, 1))["logits"][name]  # (N·V, C)
        scores = view_averaged_scores(logits, video.shape[1])  # (N, C)
        hits += topk_hits(scores, labels)
        # index_add_, not bincount: CUDA's bincount reads its input's min and max back to the
        # host to size its output, a sync every batch
        cells = labels * num_classes + scores.argmax(1)  # (N,) row-major cell of each video
        confusion.index_add_(0, cells, torch.ones_like(cells))
        if progress is not None:
            progress(video.shape[0])
        if should_stop is not None and should_stop():
            raise EvaluationStopped(f"evaluation of {name} stopped by a signal")
    return hits, confusion.view(num_classes, num_classes)


@torch.no_grad()
def evaluate_dataset(model, cfg: Config, env: runtime.Env, name: str, num_frames: int, crop: int,
                     should_stop=None) -> dict:
    loader = build_eval_loader(cfg, name, num_frames=num_frames, crop_size=crop, rank=env.rank,
                               world_size=env.world_size, device=env.device)
    precision = runtime.resolve_precision(cfg, env.device)
    seen, t0 = [0], time.perf_counter()
    views = loader.temporal * loader.spatial
    num_classes = len(loader.classes)
    runtime.log(env, f"evaluating {name}: {len(loader.records)} videos x {views} views")

    def progress(n: int) -> None:
        seen[0] += n
        if env.is_main and seen[0] % 50 < n:
            print(f"  eval {name}: {seen[0]}/{len(loader)} videos "
                  f"({seen[0] / (time.perf_counter() - t0):.1f} videos/s)", flush=True)

    try:
        hits, confusion = score_batches(model, loader, name, num_classes, precision, env.device,
                                        should_stop, progress)
    finally:
        loader.close()
    # videos scored, top-1, top-5, videos that failed, confusion: one host read (SYNC POINT)
    counts = torch.cat([torch.tensor([seen[0]], device=env.device), hits,
                        torch.tensor([len(loader.failed)], device=env.device), confusion.flatten()])
    if env.distributed:
        dist.all_reduce(counts)
    values = counts.tolist()
    videos, top1, top5, failed = values[:4]
    result = {"top1": top1 / max(videos, 1),
              # top-5 of 5 classes or fewer is always 100%: not reported
              "top5": top5 / max(videos, 1) if num_classes > 5 else None,
              "videos": videos, "failed": failed,
              "confusion": np.array(values[4:], dtype=np.int64).reshape(num_classes, num_classes)}
    if failed:  # quarantined (source "eval") and left out of the denominator: said, not hidden
        where = os.path.join(loader.ds.val_manifest, "quarantine.jsonl")
        result["failed_note"] = f"{failed} video(s) could not be decoded and are not scored; see {where}"
    return result


def relation_report(model, classes: dict, relations_path: str) -> dict:
    """The top-5 pairs of every projection W_{s→d} and, given true relations, how many are found.

    A true relation "source class i of s relates to target classes T of d" counts as recovered when
    the largest weight in column i of W_{s→d} belongs to a class in T.
    """
    if not model.pairs:  # an inference export, or a single dataset
        return {}
    pairs = projection_pairs(model, classes, k=5)
    report = {"pairs": {k: [[s, t, round(float(w), 6)] for s, t, w in rows] for k, rows in pairs.items()}}
    if relations_path:
        with open(relations_path) as f:
            truth = json.load(f)
        # Relations naming a dataset this run did not train (a subset of the data) do not count.
        truth = [r for r in truth if r["source"] in classes and r["target"] in classes]
        best = projection_argmax(model)
        found, missed = 0, []
        for rel in truth:
            s, d = rel["source"], rel["target"]
            i = classes[s].index(rel["source_class"])
            predicted = classes[d][int(best[(s, d)][i])]
            if predicted in rel["target_classes"]:
                found += 1
            else:
                missed.append(f"{s}:{rel['source_class']} -> {d}:{predicted}")
        report.update({"recovered": found, "total": len(truth), "missed": missed})
    return report


def evaluate(model, cfg: Config, env: runtime.Env, num_frames: int, crop: int, classes: dict,
             should_stop=None, stop_between=None) -> dict:
    """Scores every dataset that has a val_manifest: what eval.json holds, plus each dataset's
    confusion matrix (numpy, written apart by save_results). `should_stop()` is asked after
    every batch and `stop_between()` before every dataset (a collective vote under DDP):
    True raises EvaluationStopped."""
    model.eval()
    results = {"datasets": {}}
    for ds in cfg.data.datasets:
        if ds.val_manifest and stop_between is not None and stop_between():
            raise EvaluationStopped(f"evaluation stopped by a signal before {ds.name}")
        if ds.val_manifest:
            r = results["datasets"][ds.name] = evaluate_dataset(model, cfg, env, ds.name,
                                                                num_frames, crop, should_stop)
            top5 = f"  top-5 {100 * r['top5']:.2f}%" if r["top5"] is not None else ""
            runtime.log(env, f"{ds.name}: top-1 {100 * r['top1']:.2f}%{top5}  ({r['videos']} "
                             f"videos, {ds.test_views[0]}x{ds.test_views[1]} views)")
    results["relations"] = relation_report(model, classes, cfg.data.relations)
    rel = results["relations"]
    if "total" in rel:
        runtime.log(env, f"relations recovered by the projection heads: {rel['recovered']}/{rel['total']}")
    return results


def true_relations(relations_path: str, classes: dict) -> dict:
    """{(source, target): {source class: [target classes]}} of a relations file."""
    truth: dict = {}
    if relations_path:
        with open(relations_path) as f:
            for r in json.load(f):
                if r["source"] in classes and r["target"] in classes:
                    truth.setdefault((r["source"], r["target"]), {})[r["source_class"]] = r["target_classes"]
    return truth


def save_results(results: dict, out: str, tb, step: int, model, classes: dict,
                 relations_path: str = "") -> None:
    """eval.json, the confusion matrices (eval_confusion.npz and a PNG per dataset beside it),
    and TensorBoard: top-1/top-5 curves, confusion images, the projection heads as heatmaps
    with the true relations marked, and the relations found and missed as text."""
    import viz
    from models.heads import pair_key

    folder = os.path.dirname(os.path.abspath(out))
    confusions = {name: r.pop("confusion") for name, r in results["datasets"].items()}
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    np.savez_compressed(os.path.join(folder, "eval_confusion.npz"), **confusions)
    for name, r in results["datasets"].items():
        tb.add_scalar(f"val/{name}/top1", r["top1"], step)
        if r["top5"] is not None:
            tb.add_scalar(f"val/{name}/top5", r["top5"], step)
        image = viz.confusion_image(confusions[name], classes[name], name)
        viz.save_png(image, os.path.join(folder, f"confusion_{name}.png"))
        tb.add_image(f"confusion/{name}", image, step, dataformats="HWC")
    rel = results.get("relations", {})
    truth = true_relations(relations_path, classes)
    for s, d in getattr(model, "pairs", []):
        weight = model.proj[pair_key(s, d)].weight.detach().float().cpu().numpy()  # (C_d, C_s)
        tb.add_image(f"relations/{s}->{d}", viz.relation_heatmap(
            weight, s, d, classes[s], classes[d], truth.get((s, d))), step, dataformats="HWC")
    for key, rows in rel.get("pairs", {}).items():
        tb.add_text(f"projection_pairs/{key}", "| source | target | weight |\n|---|---|---|\n" +
                    "\n".join(f"| {a} | {b} | {w:.4f} |" for a, b, w in rows), step)
    if "total" in rel:
        tb.add_scalar("val/relations_recovered", rel["recovered"], step)
        tb.add_text("relations/missed", "\n".join(f"- {m}" for m in rel["missed"]) or "none", step)
    tb.flush()


def model_from_checkpoint(state: dict, cfg: Config) -> torch.nn.Module:
    """Rebuilds the trained model; an inference export has no projection heads or expander."""
    classes = state["meta"]["classes"]
    model = runtime.build_model(cfg, {k: len(v) for k, v in classes.items()},
                                projections=not state.get("inference", False))
    model.load_state_dict(state["model"])
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.path.isdir(args.ckpt):
        run_dir = args.ckpt
        args.ckpt, state = runtime.latest_checkpoint(run_dir)
        if state is None:
            raise ConfigError(f"--ckpt: no checkpoint in run directory {run_dir}")
    elif os.path.isfile(args.ckpt):
        state = runtime.load_checkpoint(args.ckpt)
    else:
        raise ConfigError(f"--ckpt {args.ckpt}: no such checkpoint or run directory")
    cfg = load_config(args.cfg, args.overrides) if args.cfg else \
        config_from_dict(state["config"], args.overrides)
    env = runtime.setup_env()
    model = model_from_checkpoint(state, cfg).to(env.device)
    meta = state["meta"]
    results = evaluate(model, cfg, env, meta["num_frames"], meta["crop_size"], meta["classes"])
    results["checkpoint"] = os.path.abspath(args.ckpt)
    if env.is_main:
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval.json")
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(os.path.join(os.path.dirname(out), "tb")) as tb:
            save_results(results, out, tb, int(state.get("step", 0)), model, meta["classes"],
                         cfg.data.relations)
        print(f"wrote {out} (confusion matrices: confusion_<dataset>.png beside it)")
    runtime.teardown_env(env)
    return 0


if __name__ == "__main__":
    runtime.run_cli(main)
