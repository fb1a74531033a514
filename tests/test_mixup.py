"""Mixup/CutMix targets across datasets against hand computation."""
import numpy as np
import pytest
import torch

from dali_pipes.mixup import MixupCutmix, smooth_one_hot


def _batch():
    video = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1, 1).expand(4, 3, 2, 8, 8).clone()
    dataset_ids = torch.tensor([0, 1, 0, 0])
    labels = torch.tensor([2, 1, 0, 1])
    return video, dataset_ids, labels


def test_smoothing():
    t = smooth_one_hot(torch.tensor([1]), 4, 0.2)
    assert torch.allclose(t, torch.tensor([[0.05, 0.85, 0.05, 0.05]]))


def test_disabled_plain_smoothed_targets():
    mix = MixupCutmix({"a": 3, "b": 2}, 0.0, 0.0, label_smoothing=0.1)
    video, d, y = _batch()
    out, targets, masks = mix(video, d, y, np.random.default_rng(0))
    assert torch.equal(out, video)
    assert torch.allclose(targets["a"][0], torch.tensor([0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3]))
    assert torch.equal(targets["a"][1], torch.zeros(3))
    assert torch.allclose(targets["b"][1], torch.tensor([0.05, 0.95]))
    assert torch.equal(masks, torch.tensor([[1., 0.], [0., 1.], [1., 0.], [1., 0.]]))


def _smooth(c, n, eps):
    return torch.full((n,), eps / n) + (1 - eps) * torch.nn.functional.one_hot(torch.tensor(c), n)


@pytest.mark.parametrize("cross", [False, True])
def test_mixup_targets_by_hand(cross):
    eps = 0.1
    mix = MixupCutmix({"a": 3, "b": 2}, mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0,
                      label_smoothing=eps, cross_dataset=cross)
    video, d, y = _batch()
    lam, cut = mix.draw(np.random.default_rng(5))
    assert not cut and 0 < lam < 1
    out, t, masks = mix(video, d, y, np.random.default_rng(5))
    # partner of i is 3 - i; the pixels blend whole clips, whatever their datasets
    assert torch.allclose(out[0], lam * video[0] + (1 - lam) * video[3])
    assert torch.allclose(out[1], lam * video[1] + (1 - lam) * video[2])
    sa, sb = (lambda c: _smooth(c, 3, eps)), (lambda c: _smooth(c, 2, eps))
    # sample 0 (a, y=2) with partner 3 (a, y=1): both shares in a
    assert torch.allclose(t["a"][0], lam * sa(2) + (1 - lam) * sa(1))
    assert torch.equal(t["b"][0], torch.zeros(2))
    # sample 1 (b, y=1) with partner 2 (a, y=0): b keeps only its own share
    assert torch.allclose(t["b"][1], lam * sb(1))
    # sample 2 (a, y=0) with partner 1 (b)
    assert torch.allclose(t["a"][2], lam * sa(0))
    if cross:  # the partner's dataset learns the partner's share too
        assert torch.allclose(t["a"][1], (1 - lam) * sa(0))
        assert torch.allclose(t["b"][2], (1 - lam) * sb(1))
        assert torch.equal(masks, torch.tensor([[1., 0.], [1., 1.], [1., 1.], [1., 0.]]))
        assert torch.allclose(sum(t[k].sum(1) for k in t), torch.ones(4))
    else:  # the authors: another dataset's head gets nothing from the clip
        assert torch.equal(t["a"][1], torch.zeros(3)) and torch.equal(t["b"][2], torch.zeros(2))
        assert torch.equal(masks, torch.tensor([[1., 0.], [0., 1.], [1., 0.], [1., 0.]]))
        assert torch.allclose(sum(t[k].sum(1) for k in t), torch.tensor([1.0, lam, lam, 1.0]))


def test_cutmix_box_same_on_all_frames_and_lambda_from_area():
    mix = MixupCutmix({"a": 3, "b": 2}, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    video, d, y = _batch()
    out, t, _ = mix(video, d, y, np.random.default_rng(1))
    pasted = out[0, 0, 0] == 3.0  # sample 0 got partner 3's pixels
    assert pasted.any() and not pasted.all()
    for f in range(out.shape[2]):  # the same box on every frame and channel
        assert torch.equal(out[0, :, f] == 3.0, pasted.expand(3, 8, 8))
    lam = 1 - pasted.float().mean().item()
    assert torch.allclose(t["a"][0], torch.tensor([0.0, 1 - lam, lam]), atol=1e-6)


def test_draws_reproduce_with_the_seed_and_differ_without_it():
    mix = MixupCutmix({"a": 3, "b": 2})
    video, d, y = _batch()
    o1 = mix(video, d, y, np.random.default_rng(9))
    o2 = mix(video, d, y, np.random.default_rng(9))
    assert torch.equal(o1[0], o2[0]) and torch.equal(o1[2], o2[2])
    assert all(torch.equal(o1[1][k], o2[1][k]) for k in o1[1])
    o3 = mix(video, d, y, np.random.default_rng(10))  # another seed: another mix
    assert not torch.equal(o1[0], o3[0]) and not torch.equal(o1[1]["a"], o3[1]["a"])
    draws = {mix.draw(np.random.default_rng(s)) for s in range(20)}
    assert len(draws) == 20 and {c for _, c in draws} == {True, False}


def test_odd_batch_middle_clip_is_its_own_partner():
    mix = MixupCutmix({"a": 3}, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    video = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1, 1).expand(3, 3, 2, 4, 4).clone()
    out, t, _ = mix(video, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]),
                    np.random.default_rng(1))
    assert torch.equal(out[1], video[1]) and torch.allclose(t["a"][1], torch.tensor([0., 1., 0.]))
    assert not torch.equal(out[0], video[0])


def test_package_exports_and_no_mixing_prob_zero():
    from dali_pipes import MixupCutmix as Exported
    assert Exported is MixupCutmix
    mix = MixupCutmix({"a": 3, "b": 2}, 0.8, 1.0, prob=0.0, label_smoothing=0.0)
    video, d, y = _batch()
    out, t, m = mix(video, d, y, np.random.default_rng(0))
    assert torch.equal(out, video) and torch.equal(t["a"][0], torch.tensor([0., 0., 1.]))
