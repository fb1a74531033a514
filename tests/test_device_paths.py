"""The GPU code paths walked on the CPU: the `meta` device stands in for the GPU, so a tensor
left on the host (or a host read of a device value) fails here as it would on the first CUDA
step; DDP's no_sync under torch.compile and models without unused parts under 2-process gloo."""
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import runtime
from config import load_config
from dali_pipes.loader import build_eval_loader, build_train_loader
from helpers import CROP, T, make_cfg
from models import MultiTrainLoss

META = torch.device("meta")


def test_training_step_on_a_stand_in_device(tmp_path, two_datasets):
    """loader batch -> mixup -> model -> loss -> backward -> clip -> optimizer, all on meta,
    with the recipe's two augmented clips per video."""
    from train import build_batch_augment, build_optimizer, train_step
    cfg = make_cfg(tmp_path, two_datasets, mixup_prob=1.0, cutmix_alpha=0.0, num_sample=2)
    cfg.model.arch, cfg.model.head_hidden, cfg.model.expander_hidden = "mvitv2_tiny", 16, 16
    cfg.model.expander_dim, cfg.model.num_frames, cfg.model.crop_size = 8, T, CROP
    loader = build_train_loader(cfg, T, CROP, device=META)
    batch = next(iter(loader.epoch(0)))  # 3 DALI-decoded clips and 1 from the PyAV fallback
    loader.close()
    assert [t.device for t in batch.tensors()] == [META] * 4
    assert batch.video.shape[0] == batch.labels.shape[0] == 8  # 4 videos x 2 copies
    with torch.device("meta"):
        model = runtime.build_model(cfg, loader.num_classes)
    optimizer = build_optimizer(cfg, model, META)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = MultiTrainLoss(loader.names)
    values, finite = train_step(model, None, loss_fn, [batch, batch], build_batch_augment(cfg, loader.num_classes),
                                optimizer, scaler, cfg, "fp32", np.random.default_rng(0))
    assert values["total"].device == META and finite.device == META
    assert {v.device for v in values.values()} == {META}
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())


def test_evaluation_on_a_stand_in_device(tmp_path, two_datasets):
    from eval import score_batches
    cfg = make_cfg(tmp_path, two_datasets)
    cfg.model.arch, cfg.model.num_frames, cfg.model.crop_size = "mvitv2_tiny", T, CROP
    with torch.device("meta"):
        model = runtime.build_model(cfg, {"dali": 3, "h264": 3}).eval()
    loader = build_eval_loader(cfg, "dali", T, CROP, device=META)
    with torch.no_grad():
        hits, confusion = score_batches(model, loader, "dali", 3, "fp32", META)
    loader.close()
    assert hits.device == META and hits.shape == (2,) and not loader.failed
    assert confusion.device == META and confusion.shape == (3, 3)


def test_bench_e2e_on_a_stand_in_device(tmp_path, two_datasets):
    import bench
    cfg = make_cfg(tmp_path, two_datasets)
    cfg.model.arch, cfg.model.num_frames, cfg.model.crop_size = "mvitv2_tiny", T, CROP
    env = runtime.Env(0, 1, 0, META)
    out = bench.bench_e2e(cfg, env, iters=2, warmup=1)
    assert out["clips_per_s"] > 0 and out["decode_device"] == "cpu"


def test_unused_loss_parts_are_not_built():
    cfg = load_config(runtime.__file__.replace("runtime.py", "configs/demo.yaml"), check_paths=False)
    full = runtime.build_model(cfg, {"a": 3, "b": 2})
    assert full.expander is not None and len(full.proj) == 2
    cfg.loss.w_inf, cfg.loss.w_proj = 0.0, 0.0
    bare = runtime.build_model(cfg, {"a": 3, "b": 2})
    assert bare.expander is None and len(bare.proj) == 0 and bare.pairs == []


# ------------------------------------------------------------------ 2-process gloo DDP ---

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, out_dir):
    """Two optimizer steps of 2 accumulated micro-batches, plain and compiled, counting the
    gradient all-reduces; the model has no expander (w_inf=0)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from train import build_batch_augment, build_optimizer, train_step
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = load_config(os.path.join(os.path.dirname(runtime.__file__), "configs", "demo.yaml"),
                      ["loss.w_inf=0", "model.head_hidden=16", "model.drop_path=0"],
                      check_paths=False)
    classes = {"a": 3, "b": 2}
    result = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = runtime.build_model(cfg, classes)
        ddp = DDP(model)
        calls = []

        def counting_allreduce(state, bucket, calls=calls):
            calls.append(1)
            fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0] / 2)

        ddp.register_comm_hook(None, counting_allreduce)
        train_model = torch.compile(ddp, backend="eager") if compiled else ddp
        optimizer = build_optimizer(cfg, model, torch.device("cpu"))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        g = torch.Generator().manual_seed(rank)

        class B:
            video = torch.randn(2, 3, 8, 64, 64, generator=g)
            dataset_ids = torch.tensor([0, 1])
            labels = torch.tensor([1, 0])

        def step(micro_batches, k):
            train_step(train_model, ddp, MultiTrainLoss(list(classes), w_inf=0.0), micro_batches,
                       build_batch_augment(cfg, classes), optimizer, scaler, cfg, "fp32",
                       np.random.default_rng(k))

        step([B], 0)  # DDP rebuilds its gradient buckets after the first iteration
        before = len(calls)
        step([B], 1)  # one micro-batch: one sync of every bucket
        per_sync, before = len(calls) - before, len(calls)
        for k in (2, 3):
            step([B, B], k)
        result[compiled] = {"per_sync": per_sync, "accumulated": len(calls) - before,
                            "weights": [p.detach().clone() for p in model.parameters()]}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_accumulation_all_reduces_once_per_step_even_compiled(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for compiled in (False, True):
        counts = r0[compiled]
        assert counts["per_sync"] > 0
        # 2 steps x 2 micro-batches: only the last micro-batch of a step all-reduces
        assert counts["accumulated"] == 2 * counts["per_sync"], (compiled, counts)
        # the ranks stay in step (and no unused expander made DDP fail at step 2)
        for a, b in zip(r0[compiled]["weights"], r1[compiled]["weights"]):
            torch.testing.assert_close(a, b)
    for a, b in zip(r0[False]["weights"], r0[True]["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
