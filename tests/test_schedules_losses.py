"""Schedules and losses against their equations, with numbers."""

import math

import pytest
import torch
import torch.nn.functional as F

from synco import schedules
from synco.engine.optim import create_scheduler
from synco.losses import byol_loss, info_nce


def test_momentum_schedule_endpoints_and_midpoint():
    assert schedules.momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert schedules.momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    assert schedules.momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    k, K = 30, 100
    expect = 1 - (1 - 0.99) * (math.cos(math.pi * k / K) + 1) / 2
    assert schedules.momentum_at(k, K, 0.99) == pytest.approx(expect)
    ms = [schedules.momentum_at(k, K, 0.99) for k in range(K + 1)]
    assert all(b >= a for a, b in zip(ms, ms[1:]))


def test_timm_scheduler_matches_warmup_cosine_closed_form():
    total, warmup, peak = 200, 30, 0.01
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = create_scheduler(opt, total, warmup, min_lr=0.0)
    for step in [0, 1, 15, 29, 30, 31, 100, 199, 200]:
        sched.step_update(num_updates=step)
        assert opt.param_groups[0]["lr"] == pytest.approx(schedules.lr_at(step, total, warmup, peak), abs=1e-12)
    assert schedules.lr_at(0, total, warmup, peak) == 0.0
    assert schedules.lr_at(warmup, total, warmup, peak) == pytest.approx(peak)
    assert schedules.lr_at(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)


def test_lr_scaling_and_synthetic_window():
    assert schedules.scaled_lr(1.5e-4, 512) == pytest.approx(1.5e-4)
    assert schedules.scaled_lr(1.5e-4, 4096) == pytest.approx(1.2e-3)
    window = (30, 200)  # 300 epochs, 30 warm-up, 100 cool-down
    assert [schedules.synthetic_active(e, window) for e in (0, 29, 30, 199, 200, 299)] == [
        False, False, True, True, False, False]


def test_info_nce_equals_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    B, K, S, C, T = 3, 5, 4, 6, 0.2
    q = F.normalize(torch.randn(B, C, generator=g), dim=1)
    k = F.normalize(torch.randn(B, C, generator=g), dim=1)
    queue = F.normalize(torch.randn(K, C, generator=g), dim=1)
    syn = F.normalize(torch.randn(B, S, C, generator=g), dim=2)
    loss, stats = info_nce(q, k, queue, T, syn)
    expect = 0.0
    for b in range(B):
        logits = [q[b] @ k[b]] + [q[b] @ n for n in queue] + [q[b] @ s for s in syn[b]]
        logits = torch.stack(logits) / T
        expect += -(logits[0] - torch.logsumexp(logits, 0))
    assert loss.item() == pytest.approx(expect.item() / B, rel=1e-5)
    assert stats["pos_cos"].item() == pytest.approx((q * k).sum(1).mean().item(), rel=1e-5)
    assert stats["hardest_neg_cos"].item() == pytest.approx((q @ queue.T).max(1).values.mean().item(), rel=1e-5)
    assert stats["synthetic_cos"].item() == pytest.approx(torch.einsum("bc,bsc->bs", q, syn).mean().item(), rel=1e-5)
    # without synthetic negatives it is MoCo's InfoNCE (Eq. 1)
    loss0, stats0 = info_nce(q, k, queue, T)
    assert "synthetic_cos" not in stats0
    assert loss0 < loss  # more negatives can only raise the denominator


def test_byol_loss_is_mse_of_normalised_vectors():
    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    loss, _ = byol_loss(p, z)
    mse = ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1).mean()
    assert loss.item() == pytest.approx(mse.item(), rel=1e-5)
    assert byol_loss(p, 3 * p)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p)[0].item() == pytest.approx(4.0, abs=1e-5)


def test_info_nce_statistics_per_synthetic_type_and_above_positive():
    # q = e0; positive cos 0.5; queue cosines 0.6 and -1; type a slots cos 0.9 and 0.1, type b 0.3.
    e = torch.eye(3)
    q = e[:1]
    unit = lambda c: torch.tensor([[c, (1 - c * c) ** 0.5, 0.0]])  # noqa: E731
    k, queue = unit(0.5), torch.cat([unit(0.6), -e[:1]])
    syn = torch.cat([unit(0.9), unit(0.1), unit(0.3)]).unsqueeze(0)
    _, stats = info_nce(q, k, queue, 0.2, syn, {"a": slice(0, 2), "b": slice(2, 3), "off": slice(3, 3)})
    assert stats["synthetic_cos_a"].item() == pytest.approx(0.5, abs=1e-6)
    assert stats["synthetic_cos_b"].item() == pytest.approx(0.3, abs=1e-6)
    assert "synthetic_cos_off" not in stats  # a type switched off (count 0) logs nothing
    assert stats["synthetic_cos"].item() == pytest.approx((0.9 + 0.1 + 0.3) / 3, abs=1e-6)
    assert stats["frac_synthetic_above_pos"].item() == pytest.approx(1 / 3)  # only 0.9 beats 0.5
    assert stats["frac_queue_above_pos"].item() == 1.0  # the hardest queue entry (0.6) beats it
    assert stats["frac_negatives_above_pos"].item() == 0.5  # 0.6 does, -1 does not


def test_chance_loss_is_infonce_of_uninformative_features():
    from synco.losses import chance_loss

    q = F.normalize(torch.ones(4, 8), dim=1)  # positive and all 255 negatives equally similar
    loss, _ = info_nce(q, q, q[:1].expand(255, 8), 0.2)
    assert loss.item() == pytest.approx(chance_loss(255), rel=1e-6) == pytest.approx(math.log(256))
