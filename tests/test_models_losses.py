"""Losses against explicit-loop hand computations; masks; gradients; heads; bf16."""

import json
import math

import numpy as np
import pytest
import torch

import helpers
from models import (MultiTrainLoss, inference_state_dict, informative_loss, projection_pairs,
                    soft_cross_entropy)
from models.heads import projection_argmax

NC = {"a": 4, "b": 3, "c": 5}


def rng(seed=0):
    return np.random.default_rng(seed)


def np_sce(z, y):
    """-Σ_c y_c log softmax(z)_c for one row, with loops."""
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return -sum(yc * (zc - lse) for zc, yc in zip(z, y))


def np_informative(e, vw=25.0, cw=1.0):
    b, d = e.shape
    mean = [sum(e[i, k] for i in range(b)) / b for k in range(d)]
    cov = [[sum((e[i, k] - mean[k]) * (e[i, l] - mean[l]) for i in range(b)) / (b - 1)
            for l in range(d)] for k in range(d)]
    std_term = sum(max(0.0, 1 - math.sqrt(cov[k][k] + 1e-4)) for k in range(d)) / d
    off = sum(cov[k][l] ** 2 for k in range(d) for l in range(d) if k != l)
    return vw * std_term + cw * off / d


def test_soft_cross_entropy_by_hand():
    g = rng()
    z, y = g.normal(size=(3, 5)) * 3, g.dirichlet(np.ones(5), size=3)
    got = soft_cross_entropy(torch.tensor(z, dtype=torch.bfloat16), torch.tensor(y))
    assert got.dtype == torch.float32
    got = soft_cross_entropy(torch.tensor(z), torch.tensor(y))
    for i in range(3):
        assert got[i].item() == pytest.approx(np_sce(z[i], y[i]), abs=1e-6)


def test_informative_loss_by_hand():
    g = rng(1)
    e = g.normal(size=(6, 4)) * np.array([0.3, 2.0, 0.5, 1.0])  # some dims below unit std
    got = informative_loss(torch.tensor(e, dtype=torch.float64)).item()
    assert got == pytest.approx(np_informative(e), abs=1e-6)
    got = informative_loss(torch.tensor(e), var_weight=2.0, cov_weight=0.5).item()
    assert got == pytest.approx(np_informative(e, 2.0, 0.5), abs=1e-6)
    assert informative_loss(torch.ones(1, 4)).item() == 0.0  # B=1: no statistics, no NaN


def random_outputs(b, g, with_proj=True, d_e=3):
    logits = {n: torch.tensor(g.normal(size=(b, c)), requires_grad=True) for n, c in NC.items()}
    proj = {}
    if with_proj:
        proj = {(s, d): torch.tensor(g.normal(size=(b, NC[d])), requires_grad=True)
                for s in NC for d in NC if s != d}
    embed = torch.tensor(g.normal(size=(b, d_e)), requires_grad=True)
    return {"logits": logits, "proj": proj, "embed": embed}


def test_multitrain_loss_by_hand():
    g = rng(2)
    b, names = 5, list(NC)
    out = random_outputs(b, g)
    targets = {n: torch.tensor(g.dirichlet(np.ones(c), size=b)) for n, c in NC.items()}
    # weights per sample summing to 1, less (a share no head learns) and more (a clip mixed
    # across datasets teaches both): the loss divides by the batch size, not by the weights
    masks = torch.tensor([[1, 0, 0], [0, 1, 0], [0.6, 0.4, 0], [0, 0, 0.5], [1, 1, 0]],
                         dtype=torch.float64)
    lambdas, wp, wi = {"a": 1.0, "b": 0.5, "c": 2.0}, 0.7, 0.1
    total, terms = MultiTrainLoss(names, lambdas, w_proj=wp, w_inf=wi)(out, targets, masks)

    np_out = {k: {kk: vv.detach().numpy() for kk, vv in v.items()} if isinstance(v, dict)
              else v.detach().numpy() for k, v in out.items()}
    y = {n: t.numpy() for n, t in targets.items()}
    m = masks.numpy()
    cls = proj = 0.0
    ce_num = {n: 0.0 for n in names}
    ce_den = {n: 0.0 for n in names}
    for i in range(b):
        for j, d in enumerate(names):
            ce = np_sce(np_out["logits"][d][i], y[d][i])
            cls += m[i, j] * lambdas[d] * ce
            ce_num[d] += m[i, j] * ce
            ce_den[d] += m[i, j]
            for s in names:
                if s != d:
                    proj += m[i, j] * lambdas[d] * np_sce(np_out["proj"][(s, d)][i], y[d][i]) / 2
    cls, proj = cls / b, proj / b
    inf = np_informative(np_out["embed"])
    for n in names:
        assert terms[f"ce_sum/{n}"].item() == pytest.approx(ce_num[n], abs=1e-6)
        assert terms[f"n/{n}"].item() == pytest.approx(ce_den[n], abs=1e-6)
    assert terms["cls"].item() == pytest.approx(cls, abs=1e-6)
    assert terms["proj"].item() == pytest.approx(proj, abs=1e-6)
    assert terms["inf"].item() == pytest.approx(inf, abs=1e-6)
    assert terms["cls_proj"].item() == pytest.approx(cls + wp * proj, abs=1e-6)
    assert total.item() == pytest.approx(cls + wp * proj + wi * inf, abs=1e-6)
    assert terms["total"].item() == pytest.approx(cls + wp * proj + wi * inf, abs=1e-6)
    assert all(not t.requires_grad for t in terms.values())


def test_absent_dataset_gives_zero_terms_and_no_nan():
    g = rng(3)
    out = random_outputs(4, g)
    targets = {n: torch.full((4, c), float("nan")) for n, c in NC.items()}  # junk rows
    targets["a"] = torch.tensor(g.dirichlet(np.ones(4), size=4))
    masks = torch.tensor([[1.0, 0, 0]] * 4, dtype=torch.float64)
    total, terms = MultiTrainLoss(list(NC))(out, targets, masks)
    assert torch.isfinite(total)
    assert terms["n/b"].item() == 0.0 and terms["ce_sum/b"].item() == 0.0 and terms["ce_sum/c"].item() == 0.0
    total.backward()
    # Only head a's targets are used: b and c logits get gradient only via projections into a.
    for d in ("b", "c"):
        for s in NC:
            if s != d:
                assert out["proj"][(s, d)].grad.abs().sum() == 0
    assert out["proj"][("b", "a")].grad.abs().sum() > 0


def tiny_model(**kw):
    return helpers.tiny_model(NC, **kw)


def tiny_batch(b=6, seed=0):
    return helpers.tiny_batch(NC, b, seed)


def test_model_output_structure():
    m = tiny_model()
    x, _, _ = tiny_batch(2)
    out = m(x)
    assert m.names == ["a", "b", "c"] and list(out["logits"]) == m.names
    assert out["feat"].shape == (2, 128) and out["embed"].shape == (2, 16)
    assert set(out["proj"]) == {(s, d) for s in NC for d in NC if s != d}
    torch.testing.assert_close(out["proj"][("a", "c")], out["logits"]["a"] @ m.proj["a->c"].weight.t())


def test_head_expander_and_projection_init_near_zero():
    # The authors' init (trunc-normal std 0.02, zero bias) for every head Linear, the projections
    # included: PyTorch's default would start W_{s->d} at +-1/sqrt(C_s), a random "relation".
    torch.manual_seed(0)
    m = tiny_model()
    for name, mod in [*m.heads.named_modules(), *m.expander.named_modules(), *m.proj.named_modules()]:
        if isinstance(mod, torch.nn.Linear):
            # std 0.02 (default init of Linear(4, 3): uniform +-0.5, std 0.29)
            assert mod.weight.abs().max() < 0.12 and 0.005 < mod.weight.std() < 0.04, name
            assert mod.bias is None or not mod.bias.any(), name


def test_every_parameter_gets_a_nonzero_gradient():
    m = tiny_model()
    x, targets, masks = tiny_batch()
    total, _ = MultiTrainLoss(m.names)(m(x), targets, masks)
    total.backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_sample_of_one_dataset_touches_only_its_terms():
    m = tiny_model()
    x, targets, _ = tiny_batch(4)
    masks = torch.tensor([[0, 1.0, 0]] * 4)  # dataset b only
    total, terms = MultiTrainLoss(m.names, w_proj=0.0, w_inf=0.0)(m(x), targets, masks)
    assert terms["ce_sum/a"] == 0 and terms["ce_sum/c"] == 0 and terms["ce_sum/b"] > 0
    assert terms["n/b"] == 4
    total.backward()
    for n in ("a", "c"):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.heads[n].parameters())
    assert m.heads["b"][0].weight.grad.abs().sum() > 0
    # With the projection loss only maps INTO b learn, and the source heads through them.
    m.zero_grad()
    total, _ = MultiTrainLoss(m.names, w_inf=0.0)(m(x), targets, masks)
    total.backward()
    for key, lin in m.proj.items():
        into_b = key.endswith("->b")
        assert (lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0) == into_b, key
    assert m.heads["a"][0].weight.grad.abs().sum() > 0


def test_mask_weight_scales_sample_contribution():
    m = tiny_model()
    x, targets, masks = tiny_batch(3)
    loss = MultiTrainLoss(m.names, w_inf=0.0)
    with torch.no_grad():
        out = m(x)
    base, _ = loss(out, targets, masks)
    half = masks.clone()
    half[0] *= 0.5
    lower, _ = loss(out, targets, half)
    dropped = masks.clone()
    dropped[0] = 0
    zero, _ = loss(out, targets, dropped)
    assert lower.item() == pytest.approx((base.item() + zero.item()) / 2, rel=1e-6)


def test_bf16_autocast_forward_backward_finite():
    m = tiny_model()
    x, targets, masks = tiny_batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        total, terms = MultiTrainLoss(m.names)(out, targets, masks)
    assert out["logits"]["a"].dtype == torch.bfloat16 and total.dtype == torch.float32
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_inference_state_dict_loads_without_projections():
    m = tiny_model()
    sd = inference_state_dict(m)
    assert not any(k.startswith(("proj.", "expander.")) for k in sd)
    infer = tiny_model(projections=False)
    infer.load_state_dict(sd)  # strict
    x, _, _ = tiny_batch(2)
    m.eval(), infer.eval()
    torch.testing.assert_close(infer(x)["logits"]["b"], m(x)["logits"]["b"])
    bad = dict(sd)
    bad.pop("heads.a.0.weight")
    with pytest.raises(RuntimeError, match="heads.a.0.weight"):
        infer.load_state_dict(bad)


def test_projection_pairs_and_argmax():
    m = tiny_model()
    with torch.no_grad():
        w = torch.zeros(NC["c"], NC["a"])  # W_{a→c}: (C_c, C_a)
        w[4, 1], w[0, 2], w[2, 1] = 3.0, 2.0, 1.0
        m.proj["a->c"].weight.copy_(w)
    names = {n: [f"{n}{i}" for i in range(c)] for n, c in NC.items()}
    top = projection_pairs(m, names, k=2)
    assert set(top) == {f"{s}->{d}" for s in NC for d in NC if s != d}
    assert top["a->c"] == [("a1", "c4", 3.0), ("a2", "c0", 2.0)]
    assert projection_argmax(m)[("a", "c")][1].item() == 4
    assert projection_argmax(m)[("a", "c")].shape == (NC["a"],)


def test_relation_report_counts_only_trained_datasets(tmp_path):
    from eval import relation_report

    m = tiny_model()
    with torch.no_grad():
        w = torch.zeros(NC["c"], NC["a"])  # W_{a→c}: a1 -> c4, a2 -> c0
        w[4, 1], w[0, 2] = 3.0, 2.0
        m.proj["a->c"].weight.copy_(w)
    names = {n: [f"{n}{i}" for i in range(c)] for n, c in NC.items()}
    truth = [{"source": "a", "source_class": "a1", "target": "c", "target_classes": ["c4"]},
             {"source": "a", "source_class": "a2", "target": "c", "target_classes": ["c1", "c2"]},
             # a dataset this model was not trained on: left out of the total, no KeyError
             {"source": "a", "source_class": "a1", "target": "z", "target_classes": ["z0"]}]
    path = tmp_path / "relations.json"
    path.write_text(json.dumps(truth))
    rep = relation_report(m, names, str(path))
    assert (rep["recovered"], rep["total"]) == (1, 2)
    assert rep["missed"] == ["a:a2 -> c:c0"]
