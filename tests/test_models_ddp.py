"""2-process gloo DDP: global-batch loss and gradients equal one process on the whole batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import tiny_batch, tiny_model
from models import MultiTrainLoss

NC = {"a": 4, "b": 3}
WORLD = 2


def make_model():
    return tiny_model(NC)


def make_batch():
    # uneven weights, a clip mixed between the two datasets
    masks = [[1.0, 0], [0, 1], [1, 0], [1, 0], [0.7, 0.3], [0, 1]]
    return tiny_batch(NC, 6, seed=1, masks=masks)


def loss_and_grads(model, x, targets, masks, sizes=None):
    total, terms = MultiTrainLoss(list(NC))(model(x), targets, masks, sizes)
    total.backward()
    net = getattr(model, "module", model)
    return total.detach(), terms, {n: p.grad.clone() for n, p in net.named_parameters()}


def worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    try:
        model = DDP(make_model())
        x, targets, masks = make_batch()
        # Uneven split (4 + 2) also exercises the padding path of the gather.
        sl = slice(0, 4) if rank == 0 else slice(4, 6)
        res = loss_and_grads(model, x[sl], {n: y[sl] for n, y in targets.items()}, masks[sl],
                             sizes=[4, 2])
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ref_loss, ref_terms, ref_grads = loss_and_grads(make_model(), *make_batch())
    for rank in range(WORLD):
        loss, terms, grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for k in ref_terms:
            torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
