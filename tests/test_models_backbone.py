"""MViTv2 backbone: architecture numbers from SPEC §2, factory, compile-friendliness."""

import pytest
import torch
from torch import nn

from helpers import tiny_clips
from models import build_backbone, count_flops

SPEC_PARAMS = {  # SPEC §2 table, 400-class linear head
    "seed_cls": 51_293_968,
    "seed_nocls": 51_293_776,
    "official": 51_230_128,
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def meta_b(**kw) -> nn.Module:
    with torch.device("meta"):
        return build_backbone("mvitv2_b_32x3", **kw)


def test_stage_shapes_b32x3():
    net = meta_b()
    x = torch.empty(2, 3, 32, 224, 224, device="meta")
    tokens, stages = net.forward_features(x, return_stages=True)
    assert [tuple(s.shape[1:]) for s in stages] == [
        (96, 16, 56, 56), (192, 16, 28, 28), (384, 16, 14, 14), (768, 16, 7, 7)]
    assert tokens.shape == (2, 16 * 7 * 7, 768)
    assert net(x).shape == (2, 768) and net.embed_dim == 768
    assert (net.num_frames, net.crop_size) == (32, 224)


@pytest.mark.parametrize("kw,key", [
    (dict(cls_embed=True), "seed_cls"),
    (dict(cls_embed=False), "seed_nocls"),
    (dict(cls_embed=True, rel_pos=True), "official"),
])
def test_param_counts_with_linear_head(kw, key):
    assert n_params(meta_b(**kw)) + 768 * 400 + 400 == SPEC_PARAMS[key]


def test_param_count_with_mlp_head():
    from models import MultiTrainModel
    with torch.device("meta"):
        m = MultiTrainModel(build_backbone("mvitv2_b_32x3", cls_embed=True), {"k400": 400},
                            expander_dim=0, projections=False)
    assert n_params(m) == 53_380_880


def test_official_variant_has_no_absolute_tables_and_pytorch_names():
    names = {n for n, _ in meta_b(cls_embed=True, rel_pos=True).named_parameters()}
    assert not any(n.startswith("pos_embed") for n in names)
    expected = {"patch_embed.proj.weight", "cls_token", "blocks.0.attn.rel_pos_t",
                "blocks.2.proj.weight", "blocks.2.attn.pool_q.weight", "blocks.23.mlp.fc2.bias",
                "blocks.0.attn.norm_v.weight", "norm.weight", "blocks.5.norm1.bias"}
    assert expected <= names
    assert "blocks.3.proj.weight" not in names  # skip Linear only at transitions
    seed = {n for n, _ in meta_b(cls_embed=True).named_parameters()}
    assert {"pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"} <= seed


@pytest.mark.parametrize("kw,head,ref", [
    (dict(cls_embed=True), "linear", 223.97),
    (dict(cls_embed=False), "linear", 223.83),
    (dict(cls_embed=True, rel_pos=True), "linear", 225.17),
    (dict(cls_embed=True), "mlp", 223.98),
])
def test_flops_match_spec(kw, head, ref):
    with torch.device("meta"):
        net = build_backbone("mvitv2_b_32x3", **kw)
        h = nn.Linear(768, 400) if head == "linear" else nn.Sequential(
            nn.Linear(768, 2048), nn.GELU(), nn.Linear(2048, 400))
    g = count_flops(nn.Sequential(net, h), (1, 3, 32, 224, 224)) / 1e9
    assert abs(g - ref) / ref < 0.005, g


def test_flops_default_shape_and_real_weights_untouched():
    net = build_backbone("mvitv2_tiny")
    before = net.blocks[0].attn.qkv.weight.clone()
    f = count_flops(net)
    assert f == count_flops(net, (1, 3, 8, 64, 64)) and f > 0
    assert count_flops(net, (2, 3, 8, 64, 64)) == pytest.approx(2 * f)
    assert torch.equal(before, net.blocks[0].attn.qkv.weight) and net.training


def test_s16x4_layout():
    with torch.device("meta"):
        net = build_backbone("mvitv2_s_16x4")
        _, stages = net.forward_features(torch.empty(1, 3, 16, 224, 224), return_stages=True)
    assert len(net.blocks) == 16 and net.stage_ends == [0, 2, 13, 15]
    assert [tuple(s.shape[1:]) for s in stages][-1] == (768, 8, 7, 7)


def test_factory_rejects_unknown_name_and_override():
    with pytest.raises(ValueError, match="mvitv2_tiny"):
        build_backbone("mvit_huge")
    with pytest.raises(ValueError, match="skip_from_norm"):
        build_backbone("mvitv2_tiny", frames=3)


def test_tiny_has_two_transitions_and_overrides_apply():
    net = build_backbone("mvitv2_tiny", num_frames=4, crop_size=32, drop_path=0.2)
    assert len(net.stage_ends) >= 3  # ≥ 2 transitions
    assert net.pos_embed_temporal.shape[1] == 2 and net.pos_embed_spatial.shape[1] == 64
    assert net.blocks[-1].drop_path_p == pytest.approx(0.2) and net.blocks[0].drop_path_p == 0
    assert hasattr(net.blocks[1], "proj") and hasattr(net.blocks[1], "pool_skip")


def test_drop_path_off_is_deterministic_on_is_not():
    torch.manual_seed(0)
    x = tiny_clips(4)
    net = build_backbone("mvitv2_tiny", drop_path=0.0).train()
    assert torch.equal(net(x), net(x))
    net = build_backbone("mvitv2_tiny", drop_path=0.5).train()
    assert not torch.equal(net(x), net(x))


@pytest.mark.parametrize("kw", [dict(), dict(cls_embed=True, rel_pos=True)])
def test_act_checkpoint_same_output_and_grads(kw):
    torch.manual_seed(0)
    a = build_backbone("mvitv2_tiny", **kw)
    b = build_backbone("mvitv2_tiny", act_checkpoint=True, **kw)
    b.load_state_dict(a.state_dict())
    x = tiny_clips()
    ya, yb = a(x), b(x)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(ya, yb)
    ga = a.blocks[0].attn.pool_k.weight.grad
    torch.testing.assert_close(ga, b.blocks[0].attn.pool_k.weight.grad)


def test_skip_from_norm_switch_changes_output():
    torch.manual_seed(0)
    a = build_backbone("mvitv2_tiny")
    b = build_backbone("mvitv2_tiny", skip_from_norm=False)
    b.load_state_dict(a.state_dict())
    x = tiny_clips()
    assert not torch.allclose(a(x), b(x))


def test_wrong_input_size_is_refused():
    with pytest.raises(ValueError, match="patch grid"):
        build_backbone("mvitv2_tiny")(torch.randn(1, 3, 16, 64, 64))


def test_dynamo_no_graph_breaks():
    torch._dynamo.reset()
    net = build_backbone("mvitv2_tiny", rel_pos=True, cls_embed=True, act_checkpoint=True)
    exp = torch._dynamo.explain(net)(tiny_clips())
    assert exp.graph_break_count == 0, exp.break_reasons
    assert exp.graph_count == 1
