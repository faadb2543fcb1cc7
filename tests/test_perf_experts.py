"""perf.experts.run_experts computes exactly layer.expert_loop (DeepSeek-V3's loop), on every path it takes."""
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_core.perf.experts as X
from moe_core.model.layer import Experts, expert_loop
from moe_core.perf.experts import EXPERT_COST_ROWS, run_experts, share_out


def choices(n, N, k, gen, empty=(), drop=0.0):
    """indices [n, k] (k different experts per token, none from `empty`, a share `drop` of them -1) and weights."""
    allowed = torch.tensor([e for e in range(N) if e not in set(empty)], dtype=torch.long)
    idx = allowed[torch.rand(n, len(allowed), generator=gen).topk(k, dim=1).indices]
    idx[torch.rand(n, k, generator=gen) < drop] = -1
    return idx, torch.rand(n, k, generator=gen)


def both(experts, x, idx, w, grad, **kw):
    """(fast, loop) outputs, and with autograd on the gradients of x, the weights and the expert weights."""
    out = []
    for fn in (lambda *a: run_experts(*a, **kw), expert_loop):
        experts.zero_grad()
        xs, ws = x.clone().requires_grad_(grad), w.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = fn(experts, xs, idx, ws)
        got = [y.detach()]
        if grad:
            if y.requires_grad:                          # (not when no token reached an expert: y is zeros)
                (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            got += [torch.zeros_like(t) if t.grad is None else t.grad for t in (xs, ws, experts.w_in, experts.w_out)]
        else:
            assert y.grad_fn is None
        out.append(got)
    return out


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the threaded path (share_out runs only there)."""
    calls = []
    real = X.share_out
    monkeypatch.setattr(X, "share_out", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("N", [4, 64, 256])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("grad", [False, True])
def test_fast_path_equals_the_loop(N, k, activation, n_threads, grad, spy, threads):
    threads(n_threads)
    gen = torch.Generator().manual_seed(N * 100 + k)
    torch.manual_seed(k)
    experts = Experts(N, 16, 24, activation)
    n = 2600 // k                                        # ~2340 rows after drops: above PARALLEL_MIN_ROWS
    empty = list(range(2, N, 3))[: N - k]                # a third of the experts get no token
    idx, w = choices(n, N, k, gen, empty, drop=0.1)
    x = torch.randn(n, 16, generator=gen)
    fast, loop = both(experts, x, idx, w, grad)
    for a, b in zip(fast, loop):
        torch.testing.assert_close(a, b)
    active = len(set(idx[idx >= 0].tolist()))
    assert active == N - len(empty) and (idx < 0).any()
    # the case meant to take the threaded path took it (the test cannot pass on the one-thread path alone)
    expect = n_threads > 1 and active >= X.PARALLEL_MIN_EXPERTS and (idx >= 0).sum() >= X.PARALLEL_MIN_ROWS
    assert bool(spy) == expect and expect == (n_threads == 2 and N >= 64)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 120), N=st.integers(1, 24), k=st.integers(1, 4), drop=st.sampled_from([0.0, 0.3, 1.0]),
       activation=st.sampled_from(["swiglu", "gelu"]), grad=st.booleans(), n_threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_fast_path_equals_the_loop_on_any_routing(n, N, k, drop, activation, grad, n_threads, seed):
    """Small, random cases with the thresholds lowered, so both CPU paths meet odd shapes: no tokens,
    every pair dropped, one expert, k = N."""
    k = min(k, N)
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(X, "PARALLEL_MIN_EXPERTS", 2)
            mp.setattr(X, "PARALLEL_MIN_ROWS", 1)
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            experts = Experts(N, 8, 12, activation)
            idx, w = choices(n, N, k, gen, drop=drop)
            fast, loop = both(experts, torch.randn(n, 8, generator=gen), idx, w, grad)
            for a, b in zip(fast, loop):
                torch.testing.assert_close(a, b)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mm_path_equals_the_loop(activation):
    """The grouped-GEMM path (run on CUDA in bfloat16) checked here on the CPU, in float32, as the benchmark runs it."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped GEMM")
    gen = torch.Generator().manual_seed(0)
    experts = Experts(16, 32, 64, activation)
    idx, w = choices(500, 16, 2, gen, empty=[3, 7], drop=0.1)
    x = torch.randn(500, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(run_experts(experts, x, idx, w, grouped_mm=True), expert_loop(experts, x, idx, w))


def test_expert_threads_each_run_one_core_and_leave_the_callers_thread_count():
    """Each expert worker runs its matmuls single-threaded (a worker at the process's thread count
    would start a team inside every matmul: threads on top of threads, spinning); the caller keeps its
    own count, and so does a thread started afterwards (PyTorch gives new threads the last count set)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)                      # as the served app does (and as other tests leave it)
    torch.set_num_threads(3)
    X._POOLS.pop(3, None)
    try:
        pool = X.expert_pool(3)
        assert set(pool.map(lambda _: torch.get_num_threads(), range(12))) == {1}
        assert torch.get_num_threads() == 3
        later = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [3]
    finally:
        X._POOLS.pop(3).shutdown()
        torch.set_num_threads(before)


def test_share_out_gives_threads_equal_work_and_every_expert_once():
    counts = [410, 128, 300, 300, 250, 260, 0, 140]
    active = [e for e, c in enumerate(counts) if c]
    lists = share_out(active, counts, 2)
    assert sorted(e for ids in lists for e in ids) == active and all(ids == sorted(ids) for ids in lists)
    work = [sum(counts[e] + EXPERT_COST_ROWS for e in ids) for ids in lists]
    # dealt in turn ([0, 2, 4, 7] and [1, 3, 5]) the work is 1164 vs 736; shared out it is within one expert
    assert abs(work[0] - work[1]) <= min(counts[e] for e in active) + EXPERT_COST_ROWS, work
    assert share_out([3], counts, 2) == [[3], []]
    assert share_out(active, counts, 1) == [active]
