"""Synthetic hard negatives: each rule against its equation, and the generator end to end."""

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_negatives import fresh_negatives  # the generator before it kept its buffers (8fd4217)
from synco.errors import SyncoError
from synco.negatives import (
    RULES,
    SyntheticNegatives,
    add_noise,
    cosine_grad,
    extrapolate,
    gradient_step,
    interpolate,
    mix,
    signed_gradient_step,
)

C = 8
N_HARD = 3


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _only(i, value=1):
    """counts with `value` slots of type i+1 and none of the others."""
    counts = [0] * len(RULES)
    counts[i] = value
    return tuple(counts)


@pytest.fixture(scope="module")
def scene():
    """Two queries, each with its own N_HARD similar queue entries; every other entry is dissimilar.

    Built along basis vectors (q0 = e0, q1 = e1, hard entries have no component on the other
    query's axis, distractors point away from both), then rotated so nothing is axis-aligned.
    """
    g = torch.Generator().manual_seed(0)
    rot, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    eye = torch.eye(C, dtype=torch.float64)
    hard = []
    for b in range(2):
        noise = torch.randn(N_HARD, C, generator=g, dtype=torch.float64)
        noise[:, :2] = 0
        hard.append(F.normalize(eye[b] + 0.6 * noise, dim=-1))
    far = torch.randn(10, C, generator=g, dtype=torch.float64)
    far[:, :2] = -far[:, :2].abs()
    rows = torch.cat([torch.cat(hard), F.normalize(far, dim=-1)]) @ rot.T
    perm = torch.randperm(rows.shape[0], generator=g)
    queue = rows[perm].float()
    q = (eye[:2] @ rot.T).float()
    # hard-set rows of each query in the shuffled queue
    where = torch.argsort(perm)
    hard_rows = [where[b * N_HARD : (b + 1) * N_HARD] for b in range(2)]
    hard64 = torch.stack([queue[r].double() for r in hard_rows])  # [2, N_HARD, C]
    return q, queue, hard64


def _run(scene, seed=0, **kwargs):
    q, queue, _ = scene
    kwargs.setdefault("n_hard", N_HARD)
    return SyntheticNegatives(**kwargs)(q, queue, torch.Generator().manual_seed(seed)).double()


def _fit(target, *basis):
    """Least-squares coefficients of target in span(basis) and the residual norm."""
    a = torch.stack(basis, dim=1)
    coef = torch.linalg.lstsq(a, target.unsqueeze(1)).solution.squeeze(1)
    return coef, (a @ coef - target).norm().item()


def _best_fit_with_q(s, q, hard):
    """For s in span{q, n} for some hard n: (coef of n, coef of q), residual, index of n."""
    fits = [_fit(s, n, q) for n in hard]
    k = min(range(len(fits)), key=lambda i: fits[i][1])
    return fits[k][0], fits[k][1], k


# --- rules on hand-made vectors ------------------------------------------------------------


def test_rules_registry_order_and_default_counts():
    names = tuple(rule.name for rule in RULES)
    assert names == (
        "interpolate", "extrapolate", "mix", "add_noise", "gradient_step", "signed_gradient_step"
    )
    assert SyntheticNegatives().counts == (128,) * 6
    assert SyntheticNegatives().num_synthetic == 768


def test_interpolate_eq3():
    out = interpolate(_t(1, 0, 0), _t(0, 1, 0), 0.25)
    torch.testing.assert_close(out, _t(0.25, 0.75, 0))


def test_extrapolate_eq4():
    # n + b (n - q), not q + b (n - q)
    out = extrapolate(_t(1, 0, 0), _t(0, 1, 0), 1.5)
    torch.testing.assert_close(out, _t(-1.5, 2.5, 0))


def test_mix_eq5():
    out = mix(_t(0, 1, 0), _t(0, 0, 2), 0.3)
    torch.testing.assert_close(out, _t(0, 0.3, 1.4))


def test_add_noise_eq6():
    out = add_noise(_t(0, 1, 0), _t(0.1, -0.2, 0.3))
    torch.testing.assert_close(out, _t(0.1, 0.8, 0.3))


def test_cosine_grad_hand_computed():
    # q = e0, n = (1, 1, 0): q/(|q||n|) - (q.n) n/(|q||n|^3) = (1, -1, 0) / (2 sqrt 2)
    out = cosine_grad(_t(1, 0, 0), _t(1, 1, 0))
    torch.testing.assert_close(out, _t(1, -1, 0) / (2 * math.sqrt(2)))


def test_gradient_steps_eq7_eq8():
    q, n = _t(1, 0, 0), _t(1, 1, 0)
    g = _t(1, -1, 0) / (2 * math.sqrt(2))
    torch.testing.assert_close(gradient_step(q, n, 0.1), n + 0.1 * g)
    # sign(0) = 0: the third coordinate is left alone
    torch.testing.assert_close(signed_gradient_step(q, n, 0.1), _t(1.1, 0.9, 0))


def test_cosine_grad_matches_autograd_with_broadcasting():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 1, 6, generator=g, dtype=torch.float64)  # unnormalised on purpose
    n = torch.randn(4, 5, 6, generator=g, dtype=torch.float64).requires_grad_()
    (expected,) = torch.autograd.grad(F.cosine_similarity(q, n, dim=-1).sum(), n)
    torch.testing.assert_close(cosine_grad(q, n.detach()), expected)


def test_cosine_grad_is_orthogonal_to_unit_n():
    g = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(10, 16, generator=g, dtype=torch.float64), dim=-1)
    n = F.normalize(torch.randn(10, 16, generator=g, dtype=torch.float64), dim=-1)
    dots = (cosine_grad(q, n) * n).sum(-1)
    torch.testing.assert_close(dots, torch.zeros(10, dtype=torch.float64), atol=1e-12, rtol=0)


# --- the generator -------------------------------------------------------------------------


def test_shape_unit_norm_and_detached(scene):
    q, queue, _ = scene
    q = q.clone().requires_grad_()
    gen = SyntheticNegatives(n_hard=N_HARD, counts=(2, 3, 1, 0, 4, 5))
    s = gen(q, queue)
    assert s.shape == (2, 15, C)
    assert not s.requires_grad and s.grad_fn is None
    torch.testing.assert_close(s.norm(dim=-1), torch.ones(2, 15), atol=1e-6, rtol=0)


def test_slot_order_interpolations_then_signed_steps(scene):
    """counts=(40,0,0,0,0,5): 40 interpolations (alpha in [0, alpha_max]) then 5 type-6 slots."""
    q, _, hard = scene
    alpha_max, eta = 0.5, 0.05
    s = _run(scene, counts=(40, 0, 0, 0, 0, 5), alpha_max=alpha_max, eta=eta)
    alphas = []
    for b in range(2):
        qb = q[b].double()
        mine = []
        for k in range(40):
            (x, y), residual, _ = _best_fit_with_q(s[b, k], qb, hard[b])
            assert residual < 1e-5
            mine.append((y / (x + y)).item())
        assert len({round(a, 4) for a in mine}) > 30  # one alpha per (query, slot)
        alphas += mine
        for k in range(40, 45):
            candidates = [F.normalize(signed_gradient_step(qb, n, eta), dim=-1) for n in hard[b]]
            assert min((s[b, k] - c).norm().item() for c in candidates) < 1e-5
    assert min(alphas) >= -1e-6 and max(alphas) <= alpha_max + 1e-6
    # drawn per slot across the whole range, not fixed and not U(0, 1)
    assert min(alphas) < 0.1 * alpha_max and max(alphas) > 0.9 * alpha_max


def test_extrapolation_beta_recovered_from_geometry(scene):
    q, _, hard = scene
    beta_max = 1.5
    s = _run(scene, counts=_only(1, 40), beta_max=beta_max)
    betas = []
    for b in range(2):
        for k in range(40):
            (x, y), residual, _ = _best_fit_with_q(s[b, k], q[b].double(), hard[b])
            assert residual < 1e-5
            # s' = (1 + beta) n - beta q  =>  beta = -y / (x + y)
            betas.append((-y / (x + y)).item())
    assert min(betas) >= 1 - 1e-5 and max(betas) <= beta_max + 1e-5
    assert min(betas) < 1.05 and max(betas) > 1.45


def test_mix_combines_only_the_querys_own_hard_entries(scene):
    _, _, hard = scene
    s = _run(scene, counts=_only(2, 60))
    pairs = 0
    for b in range(2):
        for k in range(60):
            coef, residual = _fit(s[b, k], *hard[b])
            assert residual < 1e-5  # inside span of this query's hard set only
            coef = coef / coef.sum()  # undo the normalisation: gamma, 1 - gamma on one or two entries
            assert (coef > -1e-5).all()
            used = int((coef.abs() > 1e-5).sum())
            assert used in (1, 2)
            pairs += used == 2
    assert pairs > 60  # n_i and n_j are independent draws, mostly distinct


def test_noise_free_noise_rule_copies_hard_entries_uniformly(scene):
    _, _, hard = scene
    s = _run(scene, counts=_only(3, 30), sigma=0.0)
    for b in range(2):
        dist = torch.cdist(s[b], hard[b])  # [30, N_HARD]
        assert (dist.min(dim=1).values < 1e-6).all()
        assert set(dist.argmin(dim=1).tolist()) == set(range(N_HARD))


def test_noise_rule_has_standard_deviation_sigma(scene):
    _, _, hard = scene
    sigma = 0.01
    s = _run(scene, counts=_only(3, 200), sigma=sigma)
    diffs = []
    for b in range(2):
        nearest = hard[b][torch.cdist(s[b], hard[b]).argmin(dim=1)]
        diffs.append(s[b] - nearest)
    # normalising a unit vector plus small isotropic noise removes the radial component only
    std = torch.cat(diffs).std().item()
    assert std == pytest.approx(sigma * math.sqrt((C - 1) / C), rel=0.15)


def test_gradient_step_matches_formula_and_increases_similarity(scene):
    q, _, hard = scene
    delta = 0.05
    s = _run(scene, counts=_only(4, 20), delta=delta)
    for b in range(2):
        qb = q[b].double()
        for k in range(20):
            candidates = torch.stack([F.normalize(gradient_step(qb, n, delta), dim=-1) for n in hard[b]])
            dist = (candidates - s[b, k]).norm(dim=-1)
            i = int(dist.argmin())
            assert dist[i] < 1e-6
            assert (s[b, k] - hard[b][i]).norm() > 1e-3  # a real step, not a copy
            assert s[b, k] @ qb > hard[b][i] @ qb  # ascent on cosine: harder than n_i


def test_zero_count_switches_a_type_off(scene):
    q, queue, _ = scene
    gen = SyntheticNegatives(n_hard=N_HARD, counts=(0, 3, 0, 0, 0, 2))
    assert gen.num_synthetic == 5
    assert gen.slices["extrapolate"] == slice(0, 3) and gen.slices["signed_gradient_step"] == slice(3, 5)
    assert gen(q, queue).shape == (2, 5, C)
    empty = SyntheticNegatives(n_hard=N_HARD, counts=(0,) * 6)(q, queue)
    assert empty.shape == (2, 0, C)


def test_n_hard_equal_to_queue_size_is_allowed(scene):
    q, queue, _ = scene
    s = SyntheticNegatives(n_hard=queue.shape[0], counts=(1,) * 6)(q, queue)
    assert s.shape == (2, 6, C)


def test_deterministic_given_a_generator(scene):
    kwargs = dict(counts=(2, 2, 2, 2, 2, 2))
    torch.testing.assert_close(_run(scene, 7, **kwargs), _run(scene, 7, **kwargs), atol=0, rtol=0)
    assert not torch.equal(_run(scene, 7, **kwargs), _run(scene, 8, **kwargs))


def test_global_rng_is_used_without_a_generator(scene):
    q, queue, _ = scene
    gen = SyntheticNegatives(n_hard=N_HARD, counts=(2,) * 6)
    torch.manual_seed(3)
    first = gen(q, queue)
    torch.manual_seed(3)
    assert torch.equal(first, gen(q, queue))


def test_bf16_autocast_changes_nothing(scene):
    q, queue, _ = scene
    gen = SyntheticNegatives(n_hard=N_HARD, counts=(2,) * 6)
    plain = gen(q, queue, torch.Generator().manual_seed(0))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        auto = gen(q, queue, torch.Generator().manual_seed(0))
    assert auto.dtype == torch.float32 and torch.isfinite(auto).all()
    torch.testing.assert_close(auto.norm(dim=-1), torch.ones(2, 12), atol=1e-6, rtol=0)
    assert torch.equal(auto, plain)  # maths ran in float32 regardless


def test_bf16_inputs_return_bf16_computed_in_float32(scene):
    q, queue, _ = scene
    q16, queue16 = q.bfloat16(), queue.bfloat16()
    gen = SyntheticNegatives(n_hard=N_HARD, counts=(2,) * 6)
    s = gen(q16, queue16, torch.Generator().manual_seed(0))
    assert s.dtype == torch.bfloat16 and torch.isfinite(s).all()
    reference = gen(q16.float(), queue16.float(), torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(s, reference)
    torch.testing.assert_close(s.float().norm(dim=-1), torch.ones(2, 12), atol=1e-2, rtol=0)


def test_repr_round_trips():
    gen = SyntheticNegatives(n_hard=4, counts=(1, 2, 3, 4, 5, 6), alpha_max=0.25, beta_max=2, sigma=0.1)
    text = repr(gen)
    assert text.startswith("SyntheticNegatives(n_hard=4, counts=(1, 2, 3, 4, 5, 6), alpha_max=0.25")
    assert repr(eval(text)) == text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(counts=(1, 2, 3)), "counts"),
        (dict(counts=(1, 1, 1, 1, 1, -1)), "counts"),
        (dict(counts=(1, 1, 1, 1, 1, 1.5)), "counts"),
        (dict(n_hard=0), "n_hard"),
        (dict(n_hard=2.0), "n_hard"),
        (dict(alpha_max=0.0), "alpha_max"),
        (dict(alpha_max=1.5), "alpha_max"),
        (dict(beta_max=0.9), "beta_max"),
        (dict(sigma=-0.1), "sigma"),
        (dict(delta=float("nan")), "delta"),
        (dict(eta=-1), "eta"),
    ],
)
def test_invalid_configuration_names_the_parameter(kwargs, match):
    with pytest.raises(SyncoError, match=match) as info:
        SyntheticNegatives(**kwargs)
    assert isinstance(info.value, ValueError)


def test_invalid_inputs_at_call_time(scene):
    q, queue, _ = scene
    gen = SyntheticNegatives(n_hard=N_HARD, counts=(1,) * 6)
    with pytest.raises(SyncoError, match=r"n_hard=17 .*K=16"):
        SyntheticNegatives(n_hard=17)(q, queue)
    with pytest.raises(ValueError, match="q must be a 2-D"):
        gen(q[0], queue)
    with pytest.raises(ValueError, match="queue must be a 2-D"):
        gen(q, queue[0])
    with pytest.raises(ValueError, match="channel"):
        gen(q, queue[:, :4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract(scene):
    q, queue, hard = scene
    q, queue = q.cuda(), queue.cuda()
    gen = SyntheticNegatives(n_hard=N_HARD, counts=(2, 2, 2, 0, 2, 2), sigma=0.0)
    s = gen(q, queue, torch.Generator(device="cuda").manual_seed(0))
    again = gen(q, queue, torch.Generator(device="cuda").manual_seed(0))
    assert s.device.type == "cuda" and s.shape == (2, 10, C)
    assert torch.equal(s, again)
    torch.testing.assert_close(s.norm(dim=-1), torch.ones(2, 10, device="cuda"), atol=1e-6, rtol=0)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        auto = gen(q, queue, torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(auto, s)
    noise_free = SyntheticNegatives(n_hard=N_HARD, counts=_only(3, 10), sigma=0.0)(q, queue).double().cpu()
    for b in range(2):
        assert (torch.cdist(noise_free[b], hard[b]).min(dim=1).values < 1e-6).all()
    with pytest.raises(SyncoError, match="generator"):
        gen(q, queue, torch.Generator().manual_seed(0))


# --- kept buffers: the same bits as fresh arrays, and never overwriting a result in use ----------


def _unit(shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize(
    "batch, k, c, n_hard, counts",
    [(8, 64, 16, 8, (3, 4, 5, 6, 7, 8)), (5, 40, 12, 6, (0, 3, 0, 2, 0, 4)), (16, 256, 256, 32, (16,) * 6)],
)
def test_bit_identical_to_the_fresh_array_implementation(batch, k, c, n_hard, counts, one_thread):
    q, queue = _unit((batch, c), 0), _unit((k, c), 1)
    gen = SyntheticNegatives(n_hard=n_hard, counts=counts, sigma=0.05)
    mine, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    # repeated calls reuse the kept buffers; a different batch size replaces them; bf16 goes through float32
    for qq, kk in [(q, queue), (q, queue), (q, queue), (q[:3], queue), (q, queue), (q.bfloat16(), queue.bfloat16())]:
        got, expected = gen(qq, kk, mine), fresh_negatives(gen, qq, kk, ref)
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_held_results_are_never_overwritten(scene):
    q, queue, _ = scene
    gen = SyntheticNegatives(n_hard=N_HARD, counts=(3,) * 6)
    g = torch.Generator().manual_seed(0)
    held = [gen(q, queue, g) for _ in range(5)]  # more than the workspace keeps
    view = gen(q, queue, g)[:, 2:4]  # a view of a result keeps it alive too
    copies = [h.clone() for h in held] + [view.clone()]
    for _ in range(4):
        gen(q, queue, g)
    for h, c in zip(held + [view], copies):
        assert torch.equal(h, c)
    assert len({h.data_ptr() for h in held}) == 5


def test_a_training_step_reuses_two_outputs_and_gets_the_right_gradients(one_thread):
    """Two calls (one per view) enter the loss's autograd graph before backward, as in the model."""
    gen = SyntheticNegatives(n_hard=16, counts=(4,) * 6)
    queue = _unit((64, 8), 0)
    mine, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ptrs = []
    for step in range(4):
        q = _unit((10, 8), 10 + step).requires_grad_()
        syn = [gen(q.detach(), queue, mine), gen(q.detach(), queue, mine)]
        ptrs.append(tuple(s.data_ptr() for s in syn))
        loss = sum(torch.einsum("bc,bsc->bs", q, s).exp().sum() for s in syn)
        loss.backward()
        expected = [fresh_negatives(gen, q.detach(), queue, ref) for _ in range(2)]
        grad = sum((e * torch.einsum("bc,bsc->bs", q.detach(), e).exp().unsqueeze(-1)).sum(1) for e in expected)
        torch.testing.assert_close(q.grad, grad, rtol=1e-6, atol=1e-6)
        del syn, loss  # as the model's forward drops its references; backward freed the graph's
    assert len(set(ptrs[0])) == 2 and len(set(ptrs)) == 1  # the same two buffers every step


def test_kept_buffers_stop_page_faults_and_are_not_pickled(one_thread):
    """Arrays above glibc's mmap threshold (here a 25 MB output) are not faulted in again on every call."""
    import copy
    import resource

    q, queue = _unit((64, 256), 0), _unit((1024, 256), 1)
    gen = SyntheticNegatives(n_hard=64, counts=(64,) * 6)
    gen(q, queue)
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        gen(q, queue)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert min(faults) < 500  # fresh arrays: > 20,000 faults per call (64 x 384 x 256 floats = 6,144 pages)
    clone = copy.deepcopy(gen)
    assert repr(clone) == repr(gen) and not clone._workspace._outputs and not clone._workspace._work
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(clone(q, queue, g1), gen(q, queue, g2))
