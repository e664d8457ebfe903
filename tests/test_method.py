"""The shared SynCo/MoBY/BYOL module: queues, EMA, the synthetic window, gradients, optimizer groups."""

import pytest
import torch

from synco.config import load_config
from synco.engine.optim import create_optimizer
from synco.models.backbone import TokenBatchNorm
from synco.models.method import create_model
from synco.options import layer_overrides


def make(tiny_overrides, *extra):
    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, list(extra)))
    torch.manual_seed(0)
    return cfg, create_model(cfg)


def views(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)


def test_target_starts_as_online_and_has_no_predictor(tiny_overrides):
    _, m = make(tiny_overrides)
    on, tg = m.online.state_dict(), m.target.state_dict()
    assert m.target.predictor is None and not any(k.startswith("predictor.") for k in tg)
    for k, v in tg.items():
        torch.testing.assert_close(v, on[k])
    assert not any(p.requires_grad for p in m.target.parameters())


def test_momentum_update_is_the_ema_equation(tiny_overrides):
    _, m = make(tiny_overrides)
    with torch.no_grad():
        for p in m.online.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in m.target.named_parameters()}
    online = dict(m.online.named_parameters())
    m.momentum_update(0.9)
    for k, v in m.target.named_parameters():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * online[k])


def test_enqueue_replaces_oldest_slice_and_wraps(tiny_overrides):
    _, m = make(tiny_overrides, "contrast.queue_size=6", "negatives.n_hard=4")
    k1, k2 = torch.arange(12.0).view(3, 4)[:, :1].repeat(1, 32), -torch.ones(3, 32)
    m.enqueue(k1, k2)
    assert int(m.queue.ptr) == 3
    torch.testing.assert_close(m.queue.queue1[:3], k1)
    torch.testing.assert_close(m.queue.queue2[:3], k2)
    m.enqueue(k1 + 100, k2)
    assert int(m.queue.ptr) == 0
    torch.testing.assert_close(m.queue.queue1[3:], k1 + 100)
    m.enqueue(k1 + 200, k2)
    torch.testing.assert_close(m.queue.queue1[:3], k1 + 200)
    torch.testing.assert_close(m.queue.queue1[3:], k1 + 100)
    with pytest.raises(ValueError, match="multiple"):
        m.enqueue(torch.ones(4, 32), torch.ones(4, 32))


def test_outside_the_window_synco_is_exactly_moby(tiny_overrides):
    x1, x2 = views()
    _, synco = make(tiny_overrides)
    _, moby = make(tiny_overrides, "method=moby")
    moby.load_state_dict(synco.state_dict())
    torch.manual_seed(3)
    l_synco, _, _ = synco(x1, x2, use_synthetic=False)
    torch.manual_seed(3)
    l_moby, _, _ = moby(x1, x2, use_synthetic=True)  # moby ignores the switch: it has no generator
    torch.testing.assert_close(l_synco, l_moby)
    torch.manual_seed(3)
    l_syn, stats, _ = synco(x1, x2, use_synthetic=True)
    assert "synthetic_cos" in stats and l_syn > l_synco


def test_symmetric_loss_uses_the_other_views_queue(tiny_overrides):
    import torch.nn.functional as F

    from synco.losses import info_nce

    x1, x2 = views()
    _, m = make(tiny_overrides, "method=moby", "model.drop_path_online=0.0")
    m.queue.queue1.normal_()
    m.queue.queue2.copy_(F.normalize(torch.randn_like(m.queue.queue2), dim=1))
    m.eval()  # fixed BN statistics so that the manual recomputation matches
    loss, _, (k1, k2) = m(x1, x2)
    q1, q2 = (F.normalize(q, dim=1) for q in m.online(x1, x2))
    expect = info_nce(q1, k2, m.queue.queue2, 0.2)[0] + info_nce(q2, k1, m.queue.queue1, 0.2)[0]
    torch.testing.assert_close(loss, expect)


def test_gradients_reach_only_the_online_network(tiny_overrides):
    x1, x2 = views()
    _, m = make(tiny_overrides)
    loss, _, _ = m(x1, x2, use_synthetic=True)
    loss.backward()
    assert all(p.grad is not None for p in m.online.parameters() if p.requires_grad)
    assert all(p.grad is None for p in m.target.parameters())


def test_weight_decay_groups_and_fixed_patch_embed(tiny_overrides):
    cfg, m = make(tiny_overrides, "model.fixed_patch_embed=true")
    opt = create_optimizer(m, cfg.optim, 1e-3, torch.device("cpu"))
    ids = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    b = m.online.backbone
    assert ids[id(b.pos_embed)] == 0 and ids[id(b.cls_token)] == 0
    assert ids[id(b.blocks[0].norm1.weight)] == 0 and ids[id(b.blocks[0].attn.qkv.bias)] == 0
    assert ids[id(b.blocks[0].attn.qkv.weight)] == cfg.optim.weight_decay
    assert id(b.patch_embed.proj.weight) not in ids  # frozen random patch projection
    assert all(id(p) not in ids for p in m.target.parameters())
    w = b.patch_embed.proj.weight.clone()
    x1, x2 = views()
    m(x1, x2)[0].backward()
    opt.step()
    torch.testing.assert_close(b.patch_embed.proj.weight, w)


def test_bn_before_mlp_and_asymmetric_drop_path(tiny_overrides):
    _, m = make(tiny_overrides, "model.bn_before_mlp=true", "model.drop_path_online=0.1",
                "model.drop_path_target=0.0",
                "model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}")
    for enc in (m.online, m.target):
        assert all(isinstance(blk.norm2, TokenBatchNorm) for blk in enc.backbone.blocks)
        assert not enc.batch_views  # BatchNorm in the backbone: views go through separately
    # timm's stochastic-depth rule: rates rise linearly to the configured one at the last block
    assert m.online.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(m.target.backbone.blocks[-1].drop_path1, torch.nn.Identity)
    x1, x2 = views()
    loss, _, _ = m(x1, x2)
    assert torch.isfinite(loss)


def test_checkpoints_with_the_old_queue_names_still_load(tiny_overrides):
    """Before KeyQueues, the queue buffers were the model's own (queue1, queue2, queue_ptr)."""
    _, m = make(tiny_overrides, "contrast.queue_size=6", "negatives.n_hard=4")
    m.enqueue(torch.ones(3, 32), -torch.ones(3, 32))
    state = m.state_dict()
    old = {{"queue.queue1": "queue1", "queue.queue2": "queue2", "queue.ptr": "queue_ptr"}.get(k, k): v
           for k, v in state.items()}
    assert "queue1" in old and "queue.queue1" not in old
    _, fresh = make(tiny_overrides, "contrast.queue_size=6", "negatives.n_hard=4")
    fresh.load_state_dict(old, strict=True)
    assert int(fresh.queue.ptr) == 3
    torch.testing.assert_close(fresh.queue.queue2[:3], -torch.ones(3, 32))


def test_the_model_is_built_from_its_own_arguments():
    """The factory pair: model_kwargs(cfg) holds everything SelfSupervisedModel needs, and nothing is a Config."""
    from synco.config import load_config
    from synco.models.method import SelfSupervisedModel, model_kwargs

    cfg = load_config("cpu-demo", ["contrast.queue_size=128", "negatives.n_hard=16", "negatives.counts=[1,2,0,0,0,3]"])
    kw = model_kwargs(cfg)
    assert kw["negatives"]["counts"] == (1, 2, 0, 0, 0, 3) and kw["backbone"]["name"] == cfg.model.backbone
    torch.manual_seed(0)
    a = SelfSupervisedModel(**kw)
    torch.manual_seed(0)
    b = create_model(cfg)
    assert a.queue.size == 128 and a.negatives.n_hard == 16
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_each_views_synthetic_negatives_come_from_the_other_views_queue(tiny_overrides):
    """SynCo: view 1's queries meet queue 2 *and* synthetic negatives made from queue 2's hard negatives, view 2's
    meet queue 1 and negatives made from queue 1. The loss is that sum computed by hand with the same random stream,
    and differs clearly from the sum with the synthetic negatives' queues swapped (queue 2 holds near-copies of view
    1's queries, queue 1 random keys: swapping them moves the loss by ~3, the hand computation agrees to 1e-5)."""
    import torch.nn.functional as F

    from synco.losses import info_nce

    x1, x2 = views()
    _, m = make(tiny_overrides, "model.drop_path_online=0.0")
    m.eval()  # fixed BN statistics so that the manual recomputation matches
    with torch.no_grad():
        q1, q2 = (F.normalize(q.float(), dim=1) for q in m.online(x1, x2))
        k1, k2 = (F.normalize(k.float(), dim=1) for k in m.target(x1, x2))
        near_q1 = q1.repeat(m.queue.size // len(q1), 1)
        m.queue.queue2.copy_(F.normalize(near_q1 + 0.05 * torch.randn_like(near_q1), dim=1))
        m.queue.queue1.copy_(F.normalize(torch.randn_like(m.queue.queue1), dim=1))
        loss, stats, _ = m(x1, x2, use_synthetic=True, generator=torch.Generator().manual_seed(7))
    queue1, queue2, tau, slices = m.queue.queue1, m.queue.queue2, m.temperature, m.negatives.slices

    def by_hand(syn_queue_1, syn_queue_2):
        g = torch.Generator().manual_seed(7)  # the model draws view 1's negatives first, then view 2's
        syn1 = m.negatives(q1, syn_queue_1, generator=g)
        syn2 = m.negatives(q2, syn_queue_2, generator=g)
        return (info_nce(q1, k2, queue2, tau, syn1, slices)[0] + info_nce(q2, k1, queue1, tau, syn2, slices)[0])

    expect, swapped = by_hand(queue2, queue1), by_hand(queue1, queue2)
    torch.testing.assert_close(loss, expect, rtol=0, atol=1e-5)
    assert (swapped - expect).abs() > 1.0, (float(swapped), float(expect))
    assert stats["synthetic_cos"] > 0.5  # view 1's synthetic negatives sit next to its queries


def test_byol_pairs_each_prediction_with_the_other_views_target(tiny_overrides):
    """BYOL's loss is byol_loss(q1, z2) + byol_loss(q2, z1): each prediction against the target projection of the
    other view, 2 - 2 cos per pair, with the numbers. Predictions that equal the other view's targets (any norm)
    give 0 (to 1e-6); predictions that equal their own view's targets give 2 (2 - 2 cos(z1, z2)), 0.18 here."""
    import torch.nn.functional as F

    from synco.losses import byol_loss

    x1, x2 = views()
    _, m = make(tiny_overrides, "method=byol", "model.drop_path_online=0.0")
    assert m.queue is None and m.negatives is None
    m.eval()  # fixed BN statistics so that the manual recomputation matches
    loss, stats, (k1, k2) = m(x1, x2)
    with torch.no_grad():
        q1, q2 = m.online(x1, x2)
        z1, z2 = m.target(x1, x2)
    torch.testing.assert_close(loss, byol_loss(q1, z2)[0] + byol_loss(q2, z1)[0], rtol=0, atol=1e-6)
    by_hand = (2 - 2 * F.cosine_similarity(q1, z2)).mean() + (2 - 2 * F.cosine_similarity(q2, z1)).mean()
    torch.testing.assert_close(loss, by_hand, rtol=0, atol=1e-5)
    expect_sim = (F.cosine_similarity(q1, z2).mean() + F.cosine_similarity(q2, z1).mean()) / 2
    torch.testing.assert_close(stats["pos_cos"], expect_sim, rtol=0, atol=1e-6)
    torch.testing.assert_close(k1, F.normalize(z1, dim=1))  # the keys handed back are the normalised targets
    torch.testing.assert_close(k2, F.normalize(z2, dim=1))
    # the pairing, by its extremes: m.loss takes the predictions as they are
    crossed, _, _ = m.loss(3 * z2, 0.5 * z1, x1, x2)
    torch.testing.assert_close(crossed, torch.tensor(0.0), rtol=0, atol=1e-6)
    same_view, _, _ = m.loss(z1, z2, x1, x2)
    torch.testing.assert_close(same_view, 2 * (2 - 2 * F.cosine_similarity(z1, z2)).mean(), rtol=0, atol=1e-5)
    assert same_view > 0.1, float(same_view)
