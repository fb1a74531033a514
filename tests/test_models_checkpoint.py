"""PySlowFast checkpoint import: round trip, interpolation, refusal message."""

import pytest
import torch

from models import MultiTrainModel, build_backbone, load_pyslowfast


def tiny(**kw):
    return build_backbone("mvitv2_tiny", **kw).eval()


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
    dst = build_backbone("mvitv2_tiny", num_frames=16, crop_size=96, rel_pos=True, abs_pos=True,
                         cls_embed=True).eval()
    report = load_pyslowfast(dst, {"model_state": src.state_dict()})
    assert src.pos_embed_temporal.shape == (1, 4, 32) and dst.pos_embed_temporal.shape == (1, 8, 32)
    assert src.pos_embed_spatial.shape == (1, 256, 32) and dst.pos_embed_spatial.shape == (1, 576, 32)
    done = " ".join(report["interpolated"])
    assert "pos_embed_spatial (1, 256, 32) -> (1, 576, 32)" in done
    assert "pos_embed_temporal (1, 4, 32) -> (1, 8, 32)" in done
    assert "blocks.0.attn.rel_pos_h" in done and "blocks.0.attn.rel_pos_t" in done
    # A constant table stays constant under interpolation: a sanity check on the resampling.
    flat = tiny()
    with torch.no_grad():
        flat.pos_embed_temporal.fill_(0.25)
    big = build_backbone("mvitv2_tiny", num_frames=16)
    load_pyslowfast(big, flat.state_dict())
    torch.testing.assert_close(big.pos_embed_temporal, torch.full((1, 8, 32), 0.25))
    assert dst(torch.randn(1, 3, 16, 96, 96)).shape == (1, 128)


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
