"""Routing zoo: hand-computed cases from the reference definitions, and invariants for every scheme."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core.model.routing import (
    SCHEMES, Routing, base, deepseek, expert_capacity, expert_choice, gshard, noisy_topk, route, softmax_topk,
    switch, update_bias, z_loss,
)


def logits_from_probs(rows):
    """Logits whose softmax is exactly `rows` (up to float rounding)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def kept(r, t):
    return [e for e in r.indices[t].tolist() if e >= 0]


# ----------------------------------------------------------------------------- hand-computed cases


def test_softmax_topk_mixtral_renormalises():
    r = softmax_topk(logits_from_probs([[0.1, 0.2, 0.3, 0.4]]), 2)
    assert r.indices.tolist() == [[3, 2]]
    assert torch.allclose(r.weights, torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]))
    assert torch.allclose(r.combine, torch.tensor([[0.0, 0.0, 0.3 / 0.7, 0.4 / 0.7]]))
    assert r.capacity is None and not r.dropped.any()


def test_softmax_topk_qwen_style_keeps_raw_probabilities():
    r = softmax_topk(logits_from_probs([[0.1, 0.2, 0.3, 0.4]]), 2, normalize=False)
    assert torch.allclose(r.weights, torch.tensor([[0.4, 0.3]]))


def test_ties_go_to_the_lowest_expert_index_every_time():
    for _ in range(5):
        r = softmax_topk(torch.zeros(3, 64), 8)
        assert r.indices.tolist() == [list(range(8))] * 3
    r = softmax_topk(torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]), 2)
    assert r.indices.tolist() == [[1, 2]]
    assert deepseek(torch.zeros(2, 8), 3).indices.tolist() == [[0, 1, 2]] * 2
    assert switch(torch.zeros(4, 4), capacity=4).indices[:, 0].tolist() == [0, 0, 0, 0]


def test_switch_drops_in_token_order_and_uses_raw_probability():
    probs = [[0.7, 0.3], [0.6, 0.4], [0.8, 0.2], [0.9, 0.1]]
    r = switch(logits_from_probs(probs), capacity_factor=1.0)  # C = ceil(1.0 * 4 / 2) = 2
    assert r.capacity == 2
    assert r.dispatch[:, 0].tolist() == [True, True, False, False]  # first two tokens win the slots
    assert r.dropped[:, 0].tolist() == [False, False, True, True]
    assert torch.allclose(r.weights[:2, 0], torch.tensor([0.7, 0.6]))
    assert r.indices[2:].tolist() == [[-1], [-1]] and (r.weights[2:] == 0).all()
    assert r.choices[:, 0].tolist() == [0, 0, 0, 0]  # the router's choice is kept for display
    # load balance uses the PRE-capacity choice: f = [1, 0], P_0 = mean p_0 = 0.75 -> 2 * 0.75
    assert r.aux["load_balance"].item() == pytest.approx(1.5, abs=1e-5)


def test_gshard_first_choices_claim_slots_before_second_choices():
    probs = [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.1, 0.7]]
    r = gshard(logits_from_probs(probs), capacity=1)
    # firsts: t0 -> e0 (slot 0), t1 -> e0 (slot 1: dropped), t2 -> e2 (slot 0)
    # seconds (offset by all firsts of that expert): t0 -> e1 (slot 0), t1 -> e1 (slot 1: dropped),
    # t2 -> e0 (slot 0 + 2 firsts = 2: dropped)
    assert r.choices.tolist() == [[0, 1], [0, 1], [2, 0]]
    assert kept(r, 0) == [0, 1] and kept(r, 1) == [] and kept(r, 2) == [2]
    assert r.dropped.tolist() == [[False, False, False], [True, True, False], [True, False, False]]
    # weights renormalised AFTER dropping
    assert torch.allclose(r.weights[0], torch.tensor([0.6 / 0.9, 0.3 / 0.9]))
    assert r.weights[2, 0].item() == pytest.approx(1.0)
    # l_aux from first choices: f = [2/3, 0, 1/3], P = [1.3/3, 0.8/3, 0.9/3]
    assert r.aux["load_balance"].item() == pytest.approx(3 * (2 / 3 * 1.3 / 3 + 1 / 3 * 0.9 / 3), abs=1e-5)


def test_gshard_batch_prioritized_gives_slots_to_confident_tokens_first():
    probs = [[0.55, 0.45], [0.9, 0.1], [0.6, 0.4]]
    plain = gshard(logits_from_probs(probs), capacity=1)
    bpr = gshard(logits_from_probs(probs), capacity=1, batch_prioritized=True)
    assert plain.dispatch[:, 0].tolist() == [True, False, False]
    assert bpr.dispatch[:, 0].tolist() == [False, True, False]


def test_gshard_random_policy_can_skip_second_expert_and_is_seeded():
    lg = torch.randn(64, 4)
    a = gshard(lg, second_policy="random", generator=torch.Generator().manual_seed(1))
    b = gshard(lg, second_policy="random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.indices, b.indices)
    assert (a.choices[:, 1] == -1).any()  # some second experts not dispatched (p2 < 0.5 always)
    s = gshard(lg, second_policy="sampling", generator=torch.Generator().manual_seed(0))
    assert (s.choices[:, 1] != s.choices[:, 0]).all()


def test_expert_choice_hand_case_token_taken_twice_and_token_unrouted():
    probs = [[0.9, 0.1], [0.5, 0.5], [0.5, 0.5], [0.1, 0.9]]
    r = expert_choice(logits_from_probs(probs), capacity=2)
    # expert 0 takes t0 (0.9) then the tie t1/t2 -> t1; expert 1 takes t3 then t1
    assert r.dispatch.tolist() == [[True, False], [True, True], [False, False], [False, True]]
    assert r.load.tolist() == [2, 2]
    assert kept(r, 2) == [] and r.aux["unrouted"].item() == pytest.approx(0.25)
    assert torch.allclose(r.combine[1], torch.tensor([0.5, 0.5]))  # raw probabilities, not renormalised


def test_base_is_exactly_balanced_and_maximises_score():
    lg = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    r = base(lg)
    assert r.indices[:, 0].tolist() == [0, 0, 1, 1]  # total score 5 + 4 + 0 + 1 = 10 is the best balanced one
    assert torch.allclose(r.weights[:, 0], torch.sigmoid(torch.tensor([5.0, 4.0, 0.0, 1.0])))
    r5 = base(torch.randn(5, 2))
    assert sorted(r5.load.tolist()) == [2, 3]  # T % N tokens spread as floor/ceil
    r2 = base(torch.randn(3, 8))  # fewer tokens than experts: one expert each
    assert r2.load.max().item() == 1 and r2.load.sum().item() == 3


def test_deepseek_bias_selects_but_does_not_weight():
    r = deepseek(torch.zeros(1, 4), 1, bias=torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert r.indices.tolist() == [[2]]
    assert r.weights.item() == pytest.approx(1.0)   # renormalised unbiased score 0.5 / 0.5
    raw = deepseek(torch.zeros(1, 4), 1, bias=torch.tensor([0.0, 0.0, 1.0, 0.0]), normalize=False, scaling=2.5)
    assert raw.weights.item() == pytest.approx(0.5 * 2.5)  # sigmoid(0) * route_scale
    assert torch.allclose(r.probs, torch.full((1, 4), 0.5))


def test_deepseek_group_limited_routing():
    # groups {0,1} and {2,3}: top-2 sums 0.953+0.881 > 0.269+0.982, so expert 3 (the best) is out
    r = deepseek(torch.tensor([[3.0, 2.0, -1.0, 4.0]]), 1, n_groups=2, topk_groups=1)
    assert r.indices.tolist() == [[0]]
    assert deepseek(torch.tensor([[3.0, 2.0, -1.0, 4.0]]), 1).indices.tolist() == [[3]]


def test_update_bias_moves_against_the_load():
    b = update_bias(torch.zeros(4), torch.tensor([4, 0, 2, 2]), 0.1)
    assert torch.allclose(b, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_noisy_topk_without_noise_is_softmax_topk_and_with_noise_follows_t2t():
    lg = torch.randn(16, 6)
    a, b = noisy_topk(lg, 2), softmax_topk(lg, 2)
    assert torch.equal(a.indices, b.indices) and torch.allclose(a.weights, b.weights)
    noise_logits = torch.randn(16, 6)
    r = noisy_topk(lg, 2, noise_logits=noise_logits, training=True, generator=torch.Generator().manual_seed(3))
    # independent re-computation of tensor2tensor's noisy_top_k_gating
    sigma = torch.nn.functional.softplus(noise_logits) + 1e-2
    noisy = lg + torch.randn(16, 6, generator=torch.Generator().manual_seed(3)) * sigma
    top = noisy.topk(3, dim=-1).values
    gates = torch.zeros(16, 6).scatter(1, noisy.topk(2).indices, noisy.topk(2).values.softmax(-1))
    inside = gates > 0
    thr = torch.where(inside, top[:, 2:3], top[:, 1:2])
    load = torch.distributions.Normal(0, 1).cdf((lg - thr) / sigma).sum(0)
    cv2 = lambda v: v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)  # noqa: E731
    assert torch.allclose(r.combine, gates, atol=1e-6)
    assert r.aux["cv_load"].item() == pytest.approx(cv2(load).item(), rel=1e-4)
    assert r.aux["cv_importance"].item() == pytest.approx(cv2(gates.sum(0)).item(), rel=1e-4)


def test_losses_on_uniform_and_collapsed_routers():
    N = 8
    uniform = torch.zeros(64, N)
    assert softmax_topk(uniform, 2).aux["load_balance"].item() == pytest.approx(1.0)
    assert z_loss(uniform).item() == pytest.approx(math.log(N) ** 2)
    collapsed = torch.zeros(64, N)
    collapsed[:, 3] = 30.0
    assert softmax_topk(collapsed, 1).aux["load_balance"].item() == pytest.approx(N, rel=1e-4)
    assert switch(collapsed).aux["load_balance"].item() == pytest.approx(N, rel=1e-4)
    assert z_loss(collapsed).item() == pytest.approx(30.0 ** 2, rel=1e-3)


@pytest.mark.parametrize("scheme,kw", [("softmax_topk", {"k": 2}), ("softmax_topk", {"k": 1}), ("switch", {}),
                                       ("gshard", {}), ("expert_choice", {}), ("deepseek", {"k": 2})])
def test_every_schemes_z_loss_is_the_st_moe_formula_in_value_and_gradient(scheme, kw):
    """Some schemes take logsumexp from the softmax they already computed (l_max - log p_max):
    value and gradient must be those of z_loss(logits) = mean logsumexp(l)^2, for small and huge logits."""
    torch.manual_seed(0)
    for scale in (0.01, 1.0, 40.0):
        logits = (torch.randn(50, 16, dtype=torch.float64) * scale).float().requires_grad_()
        got = route(logits, scheme, **kw).aux["z_loss"]
        (g_got,) = torch.autograd.grad(got, logits)
        want = z_loss(logits)
        (g_want,) = torch.autograd.grad(want, logits)
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


def test_capacity_formula():
    assert expert_capacity(12, 4, 1.0) == 3
    assert expert_capacity(10, 4, 1.0) == 3   # ceil(2.5)
    assert expert_capacity(10, 1, 1.1) == 11  # no float noise: 1.1 * 10 is 11, not 12
    assert expert_capacity(3, 64, 1.0) == 1   # at least one slot
    assert expert_capacity(0, 4, 64) == 1 and expert_capacity(10, 1, 64) == 640
    for args in [(8, 0), (8, 4, 1e308), (8, 4, 65), ("8", 4), (8, 4.0), (True, 4)]:
        with pytest.raises(ValueError, match="number of|capacity factor"):
            expert_capacity(*args)


def test_router_logits_must_be_finite_and_below_the_float32_limit():
    # finite logits up to 1e18 give a finite routing (the z-loss logsumexp^2 stays below float32's 3.4e38);
    # larger ones, NaN or infinity, integer or meta tensors are refused with a sentence, in every scheme
    for name in SCHEMES:
        k = 2 if SCHEMES[name].uses_k else None
        ids = {"token_ids": torch.arange(3)} if "token_ids" in SCHEMES[name].options else {}
        r = route(torch.tensor([[1e18, -1e18, 0.0, 5.0]] * 3), name, k=k, **ids)
        assert torch.isfinite(r.weights).all() and all(torch.isfinite(v) for v in r.aux.values())
        for bad, message in [(torch.full((3, 4), 2e18), "reach 2e\\+18"), (torch.full((3, 4), float("inf")), "NaN"),
                             (torch.ones(3, 4, dtype=torch.long), "floating-point"), (torch.ones(3, 4, device="meta"), "meta")]:
            with pytest.raises(ValueError, match=message):
                route(bad, name, k=k, **ids)


@pytest.mark.parametrize("call, message", [
    (lambda: softmax_topk(torch.randn(4, 4), 5), "larger than the number of experts"),
    (lambda: softmax_topk(torch.randn(4, 4), 0), "at least 1"),
    (lambda: softmax_topk(torch.randn(4, 0), 1), "at least 1 expert"),
    (lambda: softmax_topk(torch.randn(0, 4), 1), "no tokens"),
    (lambda: softmax_topk(torch.tensor([[float("nan"), 0.0]]), 1), "NaN"),
    (lambda: switch(torch.randn(4, 4), capacity=0), "at least 1 token slot"),
    (lambda: switch(torch.randn(4, 4), capacity_factor=-1.0), "positive"),
    (lambda: gshard(torch.randn(4, 1)), "at least 2 experts"),
    (lambda: gshard(torch.randn(4, 4), second_policy="best"), "unknown second_policy"),
    (lambda: deepseek(torch.randn(4, 6), 2, n_groups=4), "must divide"),
    (lambda: deepseek(torch.randn(4, 8), 2, n_groups=8), "at least 2 experts"),
    (lambda: deepseek(torch.randn(4, 8), 2, n_groups=2, topk_groups=3), "topk_groups .* from 1 to 2, got 3"),
    (lambda: deepseek(torch.randn(4, 8), 2, bias=torch.zeros(8, 1)), r"shape \(8,\)"),
    (lambda: deepseek(torch.randn(4, 8), 2, normalize=1), "normalize must be True or False"),
    (lambda: softmax_topk(torch.randn(4, 4), 2, normalize="no"), "normalize must be True or False"),
    (lambda: noisy_topk(torch.randn(4, 4), 2, noise_epsilon=0.0), "noise_epsilon must be a positive number"),
    (lambda: gshard(torch.randn(4, 4), batch_prioritized=None), "batch_prioritized"),
    (lambda: switch(torch.randn(4, 4), capacity=10**30), "at least 1 token slot"),
    (lambda: update_bias(torch.zeros(4), torch.ones(4), -0.1), "non-negative"),
    (lambda: deepseek(torch.randn(4, 8), 5, n_groups=2, topk_groups=1), "cannot be picked"),
    (lambda: route(torch.randn(4, 4), "magic", k=2), "unknown routing scheme"),
    (lambda: route(torch.randn(4, 4), "switch", k=2), "always sends each token to 1"),
    (lambda: route(torch.randn(4, 4), "softmax_topk", k=2, capacity=3), "does not take"),
])
def test_bad_settings_give_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- invariants


def run_scheme(name, logits, k, cf):
    s = SCHEMES[name]
    opts = {"capacity_factor": cf} if s.uses_capacity else {}
    if name == "noisy_topk":
        opts.update(noise_logits=torch.randn_like(logits), training=True, generator=torch.Generator().manual_seed(0))
    if "token_ids" in s.options:
        opts["token_ids"] = torch.arange(logits.shape[0]) % 5
    return route(logits, name, k=min(k, logits.shape[1]) if s.uses_k else None, **opts)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 40), N=st.integers(2, 12), k=st.integers(1, 4),
    cf=st.floats(0.25, 3.0), scale=st.sampled_from([0.01, 1.0, 20.0]), seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(SCHEMES)),
)
def test_invariants_on_random_logits(T, N, k, cf, scale, seed, name):
    logits = torch.randn(T, N, generator=torch.Generator().manual_seed(seed)) * scale
    r = run_scheme(name, logits, k, cf)
    # shapes and padding
    assert r.combine.shape == r.dispatch.shape == r.probs.shape == r.dropped.shape == (T, N)
    assert r.indices.shape == r.weights.shape and r.indices.shape[0] == T
    assert ((r.indices >= 0) | (r.weights == 0)).all()
    # weights finite and non-negative, zero exactly where nothing is dispatched
    assert torch.isfinite(r.combine).all() and (r.combine >= 0).all()
    assert (r.combine[~r.dispatch] == 0).all()
    # combine matches (indices, weights)
    dense = torch.zeros(T, N).scatter_add(1, r.indices.clamp(min=0), torch.where(r.indices >= 0, r.weights, 0.0))
    assert torch.allclose(dense, r.combine)
    # capacity never exceeded; the load (counted from the indices) is what the dense dispatch mask says
    assert torch.equal(r.load, r.dispatch.sum(0))
    if r.capacity is not None:
        assert int(r.load.max()) <= r.capacity
    # tokens accounted for: routed + dropped = chosen
    chosen = torch.zeros(T, N, dtype=torch.bool)
    for t, row in enumerate(r.choices.tolist()):
        for e in row:
            if e >= 0:
                chosen[t, e] = True
    assert not (r.dispatch & r.dropped).any()
    assert torch.equal(r.dispatch | r.dropped, chosen)
    assert int(r.dispatch.sum() + r.dropped.sum()) == int(chosen.sum())
    for v in r.aux.values():
        assert torch.isfinite(v)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 60), N=st.integers(1, 9), seed=st.integers(0, 1000))
def test_base_and_expert_choice_balance(T, N, seed):
    logits = torch.randn(T, N, generator=torch.Generator().manual_seed(seed))
    b = base(logits)
    assert set(b.load.tolist()) <= {T // N, -(-T // N)} and int(b.load.sum()) == T
    if N >= 2:
        ec = expert_choice(logits, capacity_factor=1.0)
        assert (ec.load == min(ec.capacity, T)).all()


def test_switch_keeps_exactly_the_earliest_tokens_per_expert():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    r = switch(logits, capacity=5)
    first = logits.softmax(-1).argmax(-1)
    for e in range(4):
        mine = (first == e).nonzero().flatten().tolist()
        assert r.dispatch[:, e].nonzero().flatten().tolist() == mine[:5]


def test_softmax_topk_weights_sum_to_one_and_gradients_reach_the_router():
    logits = torch.randn(10, 6, requires_grad=True)
    r = softmax_topk(logits, 3)
    assert torch.allclose(r.weights.sum(-1), torch.ones(10))
    (r.combine * torch.arange(6.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_dense_views_are_built_when_read_and_equal_explicit_ones():
    """A scheme returns the sparse record; combine, dispatch and dropped are derived on first read (the
    layer's forward never reads them), and copies made with apply() or Routing(...) carry them."""
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(3))
    r = switch(logits, capacity=2)
    assert r.__dict__["_combine"] is None and r.__dict__["_dropped"] is None     # not built yet
    dropped = r.dropped                                                         # built now: drops exist
    assert int(dropped.sum()) > 0 and r.__dict__["_dropped"] is dropped         # ... and kept
    copy = r.detach()
    assert torch.equal(copy.combine, r.combine) and torch.equal(copy.dropped, dropped)
    explicit = Routing(scheme=r.scheme, combine=r.combine.clone(), dispatch=r.dispatch.clone(), indices=r.indices,
                       weights=r.weights, probs=r.probs, dropped=torch.zeros_like(dropped), capacity=r.capacity)
    assert not explicit.dropped.any()                                           # given values are used as given
