"""The hard-negative strategies against their equations, on small hand-made tensors (synco/hard_negatives.py):
HCL and debiased reweighting as their authors' code computes it, false-negative detection and cancellation,
MoCHi as a named configuration of SynCo's rules; and their wiring into the loss, the model and the config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synco.config import load_config
from synco.errors import SyncoError
from synco.hard_negatives import (
    cancel_false_negatives_loss,
    detect_false_negatives,
    mochi_negatives,
    reweighted_loss,
)
from synco.losses import Strategy, info_nce
from synco.methods import negatives_kwargs
from synco.negatives import SyntheticNegatives
from synco.options import layer_overrides

CPU = ["device=cpu", "precision=fp32"]


def _official_hcl(pos, neg, t, beta, tau_plus):
    """joshr17/HCL image/main.py's criterion, line by line, in float64 (pos [B], neg [B, N] cosines)."""
    pos, neg = np.exp(pos / t), np.exp(neg / t)
    n = neg.shape[1]
    imp = np.exp(beta * np.log(neg))
    reweight_neg = (imp * neg).sum(-1) / imp.mean(-1)
    ng = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
    ng = np.clip(ng, n * np.e ** (-1 / t), None)
    return -np.log(pos / (pos + ng))


@pytest.fixture
def cosines():
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(6, generator=g) * 0.8 + 0.1
    neg = torch.rand(6, 40, generator=g) * 1.6 - 0.8
    return pos, neg


@pytest.mark.parametrize("t, beta, tau_plus", [(0.2, 0.4, 0.1), (0.5, 1.0, 0.1), (0.2, 2.0, 0.01), (0.1, 0.0, 0.1)])
def test_hcl_is_the_authors_estimator(cosines, t, beta, tau_plus):
    pos, neg = cosines
    loss, stats = reweighted_loss(pos, neg, t, beta, tau_plus)
    ref = _official_hcl(pos.double().numpy(), neg.double().numpy(), t, beta, tau_plus)
    np.testing.assert_allclose(loss.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    w = torch.softmax(beta * neg.double() / t, 1)
    assert float(stats.top_weight) == pytest.approx(float((w.max(1).values * 40).mean()), rel=1e-5)


def test_debiased_is_hcl_with_beta_zero_and_infonce_without_prior(cosines):
    pos, neg = cosines
    t = 0.2
    debiased, _ = reweighted_loss(pos, neg, t, 0.0, 0.1)
    p, ng = torch.exp(pos.double() / t), torch.exp(neg.double() / t).sum(1)  # chingyaoc/DCL main.py
    n = neg.shape[1]
    ref = -torch.log(p / (p + torch.clamp((-0.1 * n * p + ng) / 0.9, min=n * math.e ** (-1 / t))))
    torch.testing.assert_close(debiased.double(), ref, rtol=1e-5, atol=1e-6)
    plain, stats = reweighted_loss(pos, neg, t, 0.0, 0.0)
    logits = torch.cat([pos[:, None], neg], 1) / t
    ce = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long), reduction="none")
    torch.testing.assert_close(plain, ce, rtol=1e-5, atol=1e-6)
    assert float(stats.top_weight) == pytest.approx(1.0)  # beta 0: uniform weights


def test_hcl_clamp_binds_and_is_reported():
    """A large prior against an easy query: the estimate would go negative, so N_g sits at its floor
    M exp(-1/t) and the loss is log(1 + M exp(-1/t) / exp(p/t))."""
    pos, neg = torch.tensor([0.9]), torch.full((1, 50), -0.5)
    t = 0.2
    loss, stats = reweighted_loss(pos, neg, t, 1.0, 0.5)
    assert float(stats.clamped) == 1.0
    assert float(loss[0]) == pytest.approx(math.log1p(50 * math.exp(-1 / t) / math.exp(0.9 / t)), rel=1e-5)


def test_hcl_no_overflow_at_large_beta_and_small_temperature():
    pos, neg = torch.tensor([0.2, 0.9]), torch.tensor([[0.99, -1.0, 0.5], [0.1, 0.2, 0.3]])
    loss, _ = reweighted_loss(pos, neg, 0.05, 6.0, 0.1)
    assert torch.isfinite(loss).all()
    np.testing.assert_allclose(loss.double().numpy(), _official_hcl(pos.double().numpy(), neg.double().numpy(),
                                                                     0.05, 6.0, 0.1), rtol=1e-4, atol=1e-6)


def test_hcl_with_eliminated_negatives_is_hcl_over_the_rest(cosines):
    pos, neg = cosines
    keep = torch.ones_like(neg, dtype=torch.bool)
    keep[:, :5] = False
    got, _ = reweighted_loss(pos, neg, 0.2, 0.4, 0.1, keep)
    ref, _ = reweighted_loss(pos, neg[:, 5:], 0.2, 0.4, 0.1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_hcl_gradient_flows_through_the_weights(cosines):
    pos, neg = (x.clone().requires_grad_(True) for x in cosines)
    loss, _ = reweighted_loss(pos, neg, 0.2, 0.4, 0.1)
    loss.sum().backward()
    assert neg.grad.abs().sum() > 0 and pos.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- false negatives


def test_false_negatives_are_the_top_k_above_the_threshold_over_both_views():
    """Entry j's score is its largest cosine with either view's key; flagged: in the top 2 and above 0.5."""
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 0.2]]), dim=1)
    k1 = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    k2 = F.normalize(torch.tensor([[0.0, 1.0]]), dim=1)
    keys = torch.stack([k1, k2])
    # scores: [1, 1, 0.707, 0 (view 2: 0), 0.98]: top 2 are entries 0 and 1, both above 0.5
    assert detect_false_negatives(keys, queue, top_k=2, threshold=0.5).tolist() == [[True, True, False, False, False]]
    assert detect_false_negatives(keys, queue, top_k=0, threshold=0.9).tolist() == [[True, True, False, False, True]]
    assert detect_false_negatives(keys, queue, top_k=3, threshold=None).tolist() == [[True, True, False, False, True]]
    assert not detect_false_negatives(keys, queue, top_k=2, threshold=1.0).any()


def test_elimination_drops_the_flagged_from_the_denominator(cosines):
    pos, neg = cosines
    flagged = torch.zeros(6, 30, dtype=torch.bool)  # the first 30 negatives are the queue's, the rest synthetic
    flagged[:, [2, 7]] = True
    loss, stats = cancel_false_negatives_loss(pos, neg, flagged, 0.2, "eliminate")
    keep = torch.ones(40, dtype=torch.bool)
    keep[[2, 7]] = False
    logits = torch.cat([pos[:, None], neg[:, keep]], 1) / 0.2
    ref = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long), reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert float(stats.cancelled) == 2.0


def test_attraction_averages_the_flagged_with_the_positive(cosines):
    pos, neg = cosines
    flagged = torch.zeros(6, 40, dtype=torch.bool)
    flagged[0, 3] = flagged[1, [4, 5, 6]] = True
    loss, _ = cancel_false_negatives_loss(pos, neg, flagged, 0.2, "attract")
    for b in range(6):
        logits = torch.cat([pos[b:b + 1], neg[b]]) / 0.2
        positives = torch.cat([pos[b:b + 1], neg[b][flagged[b]]]) / 0.2
        ref = -torch.log_softmax(logits, 0)[: 1].sum() if not flagged[b].any() else \
            torch.logsumexp(logits, 0) - positives.mean()
        assert float(loss[b]) == pytest.approx(float(ref), rel=1e-6, abs=1e-6)


# ----------------------------------------------------------------------------------- MoCHi and the hard set


def test_mochi_is_rules_1_and_3_scaled_to_the_queue():
    assert mochi_negatives(16384) == dict(n_hard=1024, counts=(256, 0, 512, 0, 0, 0), alpha_max=0.5,
                                          distinct_mix=True)
    assert mochi_negatives(4096)["n_hard"] == 256 and mochi_negatives(128)["counts"] == (2, 0, 4, 0, 0, 0)
    cfg = load_config("cpu-demo", CPU + ["method=mochi"])
    kw = negatives_kwargs(cfg)
    assert kw["n_hard"] == 8 and kw["counts"] == (2, 0, 4, 0, 0, 0) and kw["distinct_mix"]
    gen = SyntheticNegatives(**kw)
    assert gen.num_synthetic == 6 and gen.alpha_max == 0.5


def test_skip_top_takes_the_next_ranks():
    queue = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    q = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    ranks = (q @ queue.t()).argsort(1, descending=True)
    gen = SyntheticNegatives(n_hard=8, counts=(0, 0, 0, 400, 0, 0), sigma=0.0, skip_top=4)
    picked = (gen(q, queue, generator=torch.Generator().manual_seed(0)) @ queue.t()).argmax(-1)
    for b in range(3):
        assert set(picked[b].tolist()) == set(ranks[b, 4:12].tolist())


def test_excluded_entries_never_enter_the_hard_set():
    queue = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    q = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    ranks = (q @ queue.t()).argsort(1, descending=True)
    exclude = torch.zeros(3, 64, dtype=torch.bool)
    exclude.scatter_(1, ranks[:, :3], True)  # the three nearest: suspected false negatives
    gen = SyntheticNegatives(n_hard=8, counts=(0, 0, 0, 400, 0, 0), sigma=0.0)
    picked = (gen(q, queue, generator=torch.Generator().manual_seed(0), exclude=exclude) @ queue.t()).argmax(-1)
    for b in range(3):
        assert set(picked[b].tolist()) == set(ranks[b, 3:11].tolist())


def test_distinct_mix_never_mixes_an_entry_with_itself():
    """MoCHi's pairs: the second hard negative is uniform over the other entries of the set (SynCo's default: two
    independent picks, the same entry a quarter of the time with 4)."""
    from scipy import stats

    from synco.negatives import _Draw

    queue = torch.eye(4)
    hard_idx = torch.tensor([[0, 1, 2, 3]]).expand(5, -1)
    work = [torch.empty(5 * 4000 * 4) for _ in range(2)]
    d = _Draw(queue, hard_idx, 4000, torch.Generator().manual_seed(0), work)
    d.hard()
    first = d.last_pick.clone()
    d.another_hard()
    second = d.last_pick
    assert not (first == second).any()
    counts = np.bincount(((second - first) % 4).reshape(-1).numpy(), minlength=4)[1:]
    assert stats.chisquare(counts).pvalue > 1e-3  # each of the 3 others equally often
    d = _Draw(queue, hard_idx, 4000, torch.Generator().manual_seed(0), work)
    d.hard()
    first = d.last_pick.clone()
    d.hard()
    assert float((first == d.last_pick).float().mean()) == pytest.approx(0.25, abs=0.02)


# -------------------------------------------------------------------------------- in the loss and the model


def _qkq(seed=0, b=8, k=64, c=16):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, c, generator=g), dim=1)
    key = F.normalize(q + 0.5 * torch.randn(b, c, generator=g), dim=1)
    queue = F.normalize(torch.randn(k, c, generator=g), dim=1)
    return q, key, queue


def test_info_nce_with_each_strategy_is_its_equation():
    q, k, queue = _qkq()
    pos, neg = (q * k).sum(1), q @ queue.t()
    plain, _ = info_nce(q, k, queue, 0.2)
    same, _ = info_nce(q, k, queue, 0.2, strategy=Strategy())
    assert torch.equal(plain, same)
    hcl, stats = info_nce(q, k, queue, 0.2, strategy=Strategy("hcl", 0.4, 0.1))
    torch.testing.assert_close(hcl, reweighted_loss(pos, neg, 0.2, 0.4, 0.1)[0].mean())
    assert "hcl_clamped" in stats and "hcl_top_weight" in stats
    fn = detect_false_negatives(torch.stack([k, k]), queue, 3, None)
    for mode in ("eliminate", "attract"):
        got, stats = info_nce(q, k, queue, 0.2, strategy=Strategy(cancel=mode), false_neg=fn)
        torch.testing.assert_close(got, cancel_false_negatives_loss(pos, neg, fn, 0.2, mode)[0].mean())
        assert float(stats["fnc_flagged"]) == 3.0
    with pytest.raises(ValueError, match="false_neg"):
        info_nce(q, k, queue, 0.2, strategy=Strategy(cancel="attract"))


def test_class_diagnostics_on_a_hand_made_queue():
    """Labels only feed diagnostics: the share of the queue entries above the positive that share the query's
    class, the same share over the queue, and the detector's precision; unknown classes (-1) are left out."""
    q = torch.tensor([[1.0, 0.0]])
    k = F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)  # positive cosine 0.707
    queue = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.2], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    queue_labels = torch.tensor([3, 5, -1, 3, 3])
    labels = torch.tensor([3])
    fn = torch.tensor([[True, True, True, False, False]])
    with_labels, stats = info_nce(q, k, queue, 0.2, labels=labels, queue_labels=queue_labels, false_neg=fn,
                                  strategy=Strategy(cancel="eliminate"))
    assert float(stats["same_class_above_pos"]) == pytest.approx(0.5)  # above: 0 (3), 1 (5); 2 is unknown
    assert float(stats["same_class_in_queue"]) == pytest.approx(3 / 4)
    assert float(stats["fnc_precision"]) == pytest.approx(0.5)
    without, _ = info_nce(q, k, queue, 0.2, false_neg=fn, strategy=Strategy(cancel="eliminate"))
    assert torch.equal(with_labels, without)  # labels never change the loss


def test_model_strategy_from_the_config(tiny_overrides):
    from synco.models.method import create_model

    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, CPU, ["method=moby", "contrast.reweight=debiased",
                                                          "fnc.cancel=eliminate", "fnc.top_k=2"]))
    model = create_model(cfg).train()
    assert model.strategy == Strategy("debiased", 0.0, 0.1, "eliminate", 2, 0.7, False)
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss, stats, _ = model(x1, x2)
    assert torch.isfinite(loss) and "hcl_clamped" in stats and "fnc_flagged" in stats
    loss.backward()


def test_filtered_hard_set_uses_the_detector(tiny_overrides, monkeypatch):
    from synco.models.method import create_model

    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, CPU, ["fnc.filter_hard_set=true", "fnc.top_k=3",
                                                          "fnc.threshold=null"]))
    model = create_model(cfg).train()
    seen = []
    real = model.negatives.__call__
    monkeypatch.setattr(type(model.negatives), "__call__",
                        lambda self, q, queue, generator=None, exclude=None: seen.append(exclude) or
                        real(q, queue, generator, exclude))
    model(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), use_synthetic=True)
    assert len(seen) == 2 and all(e is not None and e.sum(1).eq(3).all() for e in seen)


@pytest.mark.parametrize("overrides, key", [
    (["method=byol", "contrast.reweight=hcl"], "method"),
    (["contrast.reweight=hcl", "fnc.cancel=attract"], "contrast.reweight"),
    (["contrast.reweight=hard"], "contrast.reweight"),
    (["contrast.tau_plus=1.0"], "contrast.tau_plus"),
    (["contrast.beta=-1"], "contrast.beta"),
    (["fnc.cancel=drop"], "fnc.cancel"),
    (["fnc.threshold=1.5"], "fnc.threshold"),
    (["fnc.top_k=-1"], "fnc.top_k"),
    (["fnc.cancel=eliminate", "fnc.top_k=0", "fnc.threshold=null"], "fnc.top_k"),
    (["method=moby", "fnc.filter_hard_set=true"], "fnc.filter_hard_set"),
    (["negatives.skip_top=100"], "negatives.skip_top"),
    (["negatives.skip_top=-1"], "negatives.skip_top"),
])
def test_bad_strategy_configs_name_the_key(overrides, key):
    with pytest.raises(SyncoError, match=key.replace(".", r"\.")):
        load_config("cpu-demo", CPU + overrides)


@pytest.mark.parametrize("strategy", [
    ["method=mochi"], ["method=moby", "contrast.reweight=hcl"], ["method=moby", "contrast.reweight=debiased"],
    ["fnc.filter_hard_set=true"], ["method=moby", "fnc.cancel=attract"],
])
def test_each_strategy_trains_and_logs_its_diagnostics(tmp_path, tiny_overrides, strategy):
    import json

    from synco.engine.train import Trainer

    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, CPU, ["epochs=1", "log_every=2"], strategy))
    Trainer(cfg, tmp_path / "run", progress=False).train()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    last = steps[-1]
    assert "negatives_above_pos" in last and "same_class_above_pos" in last  # digits: labels known
    if "contrast.reweight" in " ".join(strategy):
        assert 0.0 <= last["hcl_clamped"] <= 1.0 and last["hcl_top_weight"] >= 1.0
    if "fnc" in " ".join(strategy):
        assert last["fnc_flagged"] > 0 and 0.0 <= last["fnc_precision"] <= 1.0
