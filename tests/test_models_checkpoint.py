"""PySlowFast checkpoint import: round trip, interpolation, refusal message."""

import numpy as np
import pytest
import torch

from helpers import linear_resample, tiny_backbone as tiny
from models import MultiTrainModel, load_pyslowfast


def test_round_trip_through_pyth_file(tmp_path):
    torch.manual_seed(0)
    src = tiny()
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}  # DDP-saved
    sd["head.projection.weight"] = torch.zeros(400, src.embed_dim)
    torch.save({"model_state": sd, "epoch": 3}, tmp_path / "k400.pyth")
    torch.manual_seed(1)
    dst = tiny()
    x = torch.randn(1, 3, 8, 64, 64)
    assert not torch.allclose(src(x), dst(x))
    report = load_pyslowfast(dst, tmp_path / "k400.pyth")
    torch.testing.assert_close(src(x), dst(x), rtol=0, atol=0)
    assert report["skipped"] == ["head.projection.weight"] and not report["interpolated"]
    assert len(report["loaded"]) == len(src.state_dict())


def test_loads_into_multitrain_backbone_from_plain_dict():
    src = tiny(cls_embed=True, rel_pos=True)
    model = MultiTrainModel(tiny(cls_embed=True, rel_pos=True), {"a": 3})
    load_pyslowfast(model, src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v)


def test_interpolates_frames_and_crop():
    torch.manual_seed(0)
    src = tiny(rel_pos=True, abs_pos=True, cls_embed=True)  # 8 frames, 64 px
    dst = tiny(num_frames=16, crop_size=96, rel_pos=True, abs_pos=True, cls_embed=True)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_pyslowfast(dst, {"model_state": src.state_dict()})
    done = " ".join(report["interpolated"])
    assert "pos_embed_spatial (1, 256, 32) -> (1, 576, 32)" in done
    assert "pos_embed_temporal (1, 4, 32) -> (1, 8, 32)" in done
    a, b = src.state_dict(), dst.state_dict()
    resized = {k for k in a if a[k].shape != b[k].shape}
    # every relative-position table that changed length holds its source, linearly resampled
    for name in sorted(k for k in resized if "rel_pos" in k):
        assert name in done
        want = linear_resample(a[name].numpy(), b[name].shape[0])
        np.testing.assert_allclose(b[name].numpy(), want, rtol=1e-5, atol=1e-7, err_msg=name)
    assert {"blocks.0.attn.rel_pos_h", "blocks.0.attn.rel_pos_t"} <= resized  # 31 -> 47, 7 -> 15
    # the temporal table too (4 -> 8 entries per channel), and the rest copied as it was
    np.testing.assert_allclose(b["pos_embed_temporal"][0].numpy(),
                               linear_resample(a["pos_embed_temporal"][0].numpy(), 8), rtol=1e-5, atol=1e-7)
    for k in set(a) - resized - {"pos_embed_spatial"}:
        assert torch.equal(b[k], a[k]), k
    assert not torch.equal(b["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert dst(torch.randn(1, 3, 16, 96, 96)).shape == (1, 32 * 4)


def test_interpolated_tables_by_hand():
    """A temporal ramp 0..3 at 4 positions read at 8 (linear between centres, ends held), and a
    spatial table that varies only down the rows of its 16x16 grid: at 24x24 it still varies
    only down the rows, rising from top to bottom (rows and columns not swapped)."""
    src = tiny(abs_pos=True)
    with torch.no_grad():
        src.pos_embed_temporal.copy_(torch.arange(4.0).view(1, 4, 1).expand(1, 4, 32))
        rows = torch.arange(16.0).view(16, 1).expand(16, 16).reshape(1, 256, 1)
        src.pos_embed_spatial.copy_(rows.expand(1, 256, 32))
    big = tiny(num_frames=16, crop_size=96, abs_pos=True)
    load_pyslowfast(big, src.state_dict())
    temporal = big.pos_embed_temporal[0, :, 0].tolist()
    assert temporal == pytest.approx([0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], abs=1e-6)
    grid = big.pos_embed_spatial[0, :, 0].view(24, 24)
    assert torch.allclose(grid, grid[:, :1].expand(24, 24), atol=1e-5)  # constant along a row
    column = grid[:, 0]
    assert (column[1:] >= column[:-1] - 1e-5).all() and column[-1] - column[0] > 14
    torch.testing.assert_close(big.pos_embed_temporal[0, :, 5], big.pos_embed_temporal[0, :, 0])


def test_mismatch_names_every_offending_tensor():
    src = tiny(cls_embed=True).state_dict()
    src["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    src.pop("blocks.1.norm2.bias")
    with pytest.raises(ValueError) as err:
        load_pyslowfast(tiny(), src)
    msg = str(err.value)
    for name in ("cls_token", "pos_embed_class", "blocks.0.mlp.fc1.weight (7, 32) vs (128, 32)",
                 "blocks.1.norm2.bias (64,)", "cls_embed=True"):
        assert name in msg, (name, msg)
    assert msg.count("\n") >= 3


def test_skip_prefix_matches_whole_components():
    src = tiny().state_dict()
    src["heads.x"] = torch.zeros(1)
    with pytest.raises(ValueError, match="heads.x"):
        load_pyslowfast(tiny(), src)  # "head" must not hide "heads.x"
    report = load_pyslowfast(tiny(), src, skip=("head", "heads"))
    assert "heads.x" in report["skipped"]


def test_backbone_from_a_train_py_checkpoint(tmp_path):
    """A MultiTrain run's own checkpoint ({"model": ..., "optimizer": ...}) initialises a new
    run's backbone; its heads and projections are not backbone weights and are skipped."""
    torch.manual_seed(0)
    src = MultiTrainModel(tiny(), {"a": 3, "b": 2}, head_hidden=16, expander_hidden=16,
                          expander_dim=8)
    torch.save({"model": src.state_dict(), "optimizer": {}, "step": 7}, tmp_path / "ckpt.pt")
    torch.manual_seed(1)
    dst = MultiTrainModel(tiny(), {"c": 4}, head_hidden=16, expander_dim=None)
    x = torch.randn(1, 3, 8, 64, 64)
    assert not torch.allclose(src.backbone(x), dst.backbone(x))
    report = load_pyslowfast(dst, tmp_path / "ckpt.pt", skip=("head",))
    torch.testing.assert_close(src.backbone(x), dst.backbone(x), rtol=0, atol=0)
    assert len(report["loaded"]) == len(src.backbone.state_dict())
    assert any(k.startswith("heads.a.") for k in report["skipped"])
    assert any(k.startswith("proj.") for k in report["skipped"])
