"""Preflight check of a machine and a config before a run: what will decode where, and what
will stop the run. Runs with or without a GPU (`--gpu-arch` plans the routing of a GPU
generation on a CPU machine).

    python -m dali_pipes.doctor --cfg configs/multi.yaml [--json] [--gpu-arch hopper]

Checks: GPU, driver and its CUDA version against torch's and DALI's, libnvcuvid (NVDEC, part
of the driver; containers need the `video` driver capability), NVDEC formats of this GPU, for
every manifest of the config how many files go to NVDEC, DALI's CPU decoder or the PyAV
fallback and why, shared memory, the open-file limit and free disk in train.output_dir.
Exit code 0 when every check passes, 1 otherwise; the JSON is
{"checks": [{"name", "ok", "detail"}], "routing": {"files": [{"path", "route", "reason",
"dataset", "split"}], "summary": {route: count}, "datasets": {...}}}.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Optional

from dali_pipes import nvdec, routing

# CUDA major version of the DALI wheel the project installs (nvidia-dali-cuda120).
DALI_CUDA_MAJOR = 12
MIN_OPEN_FILES = 4096  # decoder and reader threads plus the checkpoint and event files
MIN_SHM_GB = 1.0


class Report:
    def __init__(self):
        self.checks: list[dict] = []
        self.routing: dict = {"files": [], "summary": {r: 0 for r in routing.ROUTES}, "datasets": {}}

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


# ----------------------------------------------------------------------------- software ---

def check_packages(report: Report) -> dict:
    """Versions of torch, DALI and PyAV; a missing one is a failed check with the fix."""
    found = {}
    for name, module, fix in (
            ("torch", "torch", "pip install torch (see README)"),
            ("DALI", "nvidia.dali", "pip install nvidia-dali-cuda120==2.4.0"),
            ("PyAV", "av", "pip install av (the probe and the fallback decoder need it)")):
        try:
            found[name] = importlib.import_module(module).__version__
            report.add(f"{name} installed", True, found[name])
        except ImportError as exc:
            report.add(f"{name} installed", False, f"{exc}; {fix}")
    return found


# ---------------------------------------------------------------------------------- GPU ---

def check_gpu(report: Report, versions: dict, device_index: int = 0) -> Optional[dict]:
    """Driver, GPU, CUDA versions and NVDEC; returns the formats NVDEC decodes (None: no GPU)."""
    try:
        info = nvdec.query(device_index)
    except nvdec.NvdecUnavailable as exc:
        text = str(exc)
        if text.startswith("no NVIDIA driver"):
            report.add("GPU", True, f"no GPU here ({text}); training and decoding run on the CPU")
            return None
        report.add("NVDEC (libnvcuvid)", False, text)
        _container_check(report)
        return frozenset()
    arch = routing.arch_of(*info.capability)
    report.add("GPU", True, f"{info.name}, compute capability {info.capability[0]}.{info.capability[1]} "
                            f"({arch}), driver CUDA {info.driver_version}")
    _cuda_versions(report, info.driver_version, versions)
    report.add("NVDEC (libnvcuvid)", True, nvdec.nvcuvid_loadable()[1])
    _container_check(report)
    supported = {f: (*c["min"], *c["max"]) for f, c in info.formats.items() if c["supported"]}
    names = sorted(f"{c} {ch[0]}:{ch[1]}:{ch[2]} {d}-bit" for c, ch, d in supported)
    report.add("NVDEC formats", bool(supported), ", ".join(names) or "none")
    return supported


def _cuda_versions(report: Report, driver: str, versions: dict) -> None:
    """The driver must support the CUDA major versions torch and DALI were built for."""
    driver_major = int(driver.split(".")[0])
    try:
        import torch
        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    if torch_cuda:
        need = int(torch_cuda.split(".")[0])
        report.add("driver vs torch CUDA", driver_major >= need,
                   f"driver supports CUDA {driver}, torch {versions.get('torch')} is built for CUDA "
                   f"{torch_cuda}" + ("" if driver_major >= need else
                                      ": update the NVIDIA driver or install a torch built for an "
                                      "older CUDA"))
    if "DALI" in versions:
        report.add("driver vs DALI CUDA", driver_major >= DALI_CUDA_MAJOR,
                   f"driver supports CUDA {driver}, DALI wheel is nvidia-dali-cuda{DALI_CUDA_MAJOR}0"
                   + ("" if driver_major >= DALI_CUDA_MAJOR else ": update the NVIDIA driver"))


def _container_check(report: Report) -> None:
    problem = nvdec.container_video_capability()
    if problem:
        report.add("container video capability", False, problem)
    elif os.environ.get("NVIDIA_DRIVER_CAPABILITIES"):
        report.add("container video capability", True,
                   f"NVIDIA_DRIVER_CAPABILITIES={os.environ['NVIDIA_DRIVER_CAPABILITIES']}")


# ------------------------------------------------------------------------------ routing ---

def plan_routing(report: Report, cfg, decode_device: str, nvdec_formats, arch_note: str,
                 list_files: bool = True) -> None:
    """Route of every file of every manifest of `cfg`, by dataset and split."""
    from dali_pipes.manifest import ManifestError, load_manifest

    for ds in cfg.data.datasets:
        for split, folder in (("train", ds.manifest), ("val", ds.val_manifest)):
            if not folder:
                continue
            try:
                records, _ = load_manifest(folder)
            except ManifestError as exc:
                report.add(f"manifest {ds.name}/{split}", False, str(exc))
                continue
            routes = [routing.route(r["probe"], decode_device, nvdec_formats) for r in records]
            summary = routing.summarize(routes)
            report.routing["datasets"][f"{ds.name}/{split}"] = summary
            for r, n in summary["summary"].items():
                report.routing["summary"][r] += n
            if list_files:
                report.routing["files"] += [
                    {"path": rec["path"], "route": r, "reason": why, "dataset": ds.name,
                     "split": split} for rec, (r, why) in zip(records, routes)]
            report.add(f"manifest {ds.name}/{split}", True,
                       f"{len(records):,} files {arch_note}: " + describe_summary(summary))


def describe_summary(summary: dict) -> str:
    names = {routing.NVDEC: "NVDEC", routing.DALI_CPU: "DALI CPU", routing.PYAV: "PyAV fallback"}
    parts = []
    for r, count in summary["summary"].items():
        if not count:
            continue
        reasons = summary["reasons"][r]
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        parts.append(f"{names[r]} {count:,} (" + ", ".join(f"{k} {v:,}" for k, v in top) + ")")
    return "; ".join(parts) or "no files"


# ------------------------------------------------------------------------------ machine ---

def check_machine(report: Report, cfg) -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    report.add("open-file limit", soft >= MIN_OPEN_FILES,
               f"{soft} (soft)" + ("" if soft >= MIN_OPEN_FILES else
                                   f": raise it to at least {MIN_OPEN_FILES} (ulimit -n 65536)"))
    if os.path.isdir("/dev/shm"):
        shm = shutil.disk_usage("/dev/shm").free / 2**30
        report.add("shared memory (/dev/shm)", shm >= MIN_SHM_GB,
                   f"{shm:.1f} GiB free" + ("" if shm >= MIN_SHM_GB else
                                            "; containers: docker run --shm-size=8g"))
    out = Path(cfg.train.output_dir).resolve()
    probe_dir = next((p for p in [out, *out.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe_dir).free / 2**30
    need = checkpoint_gb(cfg) * (cfg.train.keep_ckpts + 2)  # kept + the one being written + export
    report.add("free disk in train.output_dir", free >= need,
               f"{free:.1f} GiB free at {probe_dir}, about {need:.1f} GiB needed for "
               f"{cfg.train.keep_ckpts} checkpoints of {checkpoint_gb(cfg):.2f} GiB")


def checkpoint_gb(cfg) -> float:
    """Size of one checkpoint: fp32 weights and AdamW's two moments of the configured model,
    counted on the meta device (no memory, no weights)."""
    import torch

    import runtime
    with torch.device("meta"):
        model = runtime.build_model(cfg, _class_counts(cfg))
    params = sum(p.numel() for p in model.parameters())
    return params * 4 * 3 / 2**30


def _class_counts(cfg) -> dict:
    counts = {}
    for ds in cfg.data.datasets:
        path = Path(ds.manifest) / "classes.json"
        counts[ds.name] = len(json.loads(path.read_text())) if path.is_file() else 400
    return counts


# ---------------------------------------------------------------------------------- run ---

def run(cfg, gpu_arch: Optional[str] = None, device_index: int = 0,
        list_files: bool = True) -> Report:
    report = Report()
    versions = check_packages(report)
    if gpu_arch:
        formats = routing.NVDEC_BY_ARCH[gpu_arch]
        report.add("GPU", True, f"planning for a {gpu_arch} GPU (--gpu-arch; no device used)")
        note = f"on a {gpu_arch} GPU"
    else:
        formats = check_gpu(report, versions, device_index)
        note = "on this GPU" if formats is not None else "on this CPU machine"
    on_gpu = formats is not None and cfg.data.decode_device != "cpu"
    plan_routing(report, cfg, "mixed" if on_gpu else "cpu", formats if on_gpu else None,
                 note + ("" if on_gpu or formats is None else " (data.decode_device=cpu)"),
                 list_files)
    check_machine(report, cfg)
    return report


def preflight(cfg, env) -> list[str]:
    """The checks train.py runs at start on a GPU: lines to print for what failed."""
    report = Report()
    check_gpu(report, check_packages(report), env.device.index or 0)
    check_machine(report, cfg)
    return [f"doctor: {c['name']}: {c['detail']}" for c in report.checks if not c["ok"]]


def print_report(report: Report, file=sys.stdout) -> None:
    width = max(len(c["name"]) for c in report.checks)
    for c in report.checks:
        print(f"[{'ok' if c['ok'] else 'FAIL':>4}] {c['name']:<{width}}  {c['detail']}", file=file)
    fallback = [f for f in report.routing["files"] if f["route"] == routing.PYAV]
    if fallback:
        print(f"\n{len(fallback):,} files go to the PyAV fallback, e.g.:", file=file)
        for f in fallback[:10]:
            print(f"  {f['dataset']}/{f['split']}: {f['path']}: {f['reason']}", file=file)
    print(f"\n{'all checks passed' if report.ok else 'some checks FAILED'}", file=file)


def main(argv=None) -> int:
    from config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m dali_pipes.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--cfg", required=True, help="YAML config of the run")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--gpu-arch", choices=sorted(routing.NVDEC_BY_ARCH),
                   help="plan the routing for this GPU generation without a device")
    p.add_argument("--device", type=int, default=0, help="GPU index to check")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.cfg, args.overrides, check_paths=False)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    report = run(cfg, args.gpu_arch, args.device, list_files=True)
    if args.json:
        print(json.dumps({"checks": report.checks, "routing": report.routing}, indent=1))
    else:
        print_report(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
