"""The routed experts, fast: every (token, expert) pair's weighted expert output, summed per token.

`run_experts` computes exactly what DeepSeek-V3's loop `moe_core.model.layer.expert_loop` computes
(tests/test_perf_experts.py checks it). It is faster because it does the bookkeeping once, not once
per expert: one sort puts the (token, expert) pairs in expert order, so each expert's tokens are one
block, and one index_add_ sums the outputs per token (2 CPU cores: 1.15-1.19x the loop's speed at
N = 8, 1.5-1.7x at N = 256). The experts then run, by device:

- CUDA, bfloat16: two grouped GEMMs over all the blocks, one kernel each whatever N is (not measured:
  no GPU was lent to the task that wrote this);
- CPU, 32+ experts with tokens, 2048+ rows, 2+ threads: whole experts shared out over threads, one core each;
- otherwise: one expert after another, each matmul on all cores.

torch.nn.functional.grouped_mm runs on the CPU too, but slower than these (8192 tokens, d 256, ff 512,
2 cores: N = 8, 84-88 ms against 77-79; N = 256, 131-161 against 106-112; docs/performance.md).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

# Experts with tokens, and rows in all, before run_experts gives whole experts to threads. Below that,
# one expert's matmul split over the cores is faster: small batches (the dashboard's texts), and few
# experts with many rows each. Timed in interleaved rounds (`bench.interleaved_times`), 8192 tokens,
# k = 2, 2 cores: threads lost at N = 16 (90 vs 79 ms), were even at 32 and won from 64 on (98 vs 110).
PARALLEL_MIN_EXPERTS = 32
PARALLEL_MIN_ROWS = 2048

# An expert's fixed cost (reading its weights, a few calls) in rows of matmul work: at N = 256 here
# an expert of 64 rows took 0.70 ms on one core, of which ~0.15 ms is not per row
EXPERT_COST_ROWS = 16


def run_experts(experts, x: Tensor, indices: Tensor, weights: Tensor, grouped_mm: bool | None = None) -> Tensor:
    """y[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t]), skipping -1, for x [n, d_model] and
    indices, weights [n, k]; `experts` a `layer.Experts`. `grouped_mm` forces that path (the benchmark)."""
    flat = indices.reshape(-1)
    pair = (flat >= 0).nonzero().squeeze(1)                  # real (token, expert) pairs, row-major
    ids, order = torch.sort(flat[pair], stable=True)         # ... sorted by expert
    pair = pair[order]
    tokens = pair // indices.shape[1]
    counts = torch.bincount(ids, minlength=experts.n_experts).tolist()
    w = weights.reshape(-1)[pair].to(x.dtype)[:, None]
    if grouped_mm or (grouped_mm is None and x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)   # where each expert's rows end
        h = torch._grouped_mm(x.index_select(0, tokens), experts.w_in.to(x.dtype), offs=offs)
        out = torch._grouped_mm(experts.act(h), experts.w_out.to(x.dtype), offs=offs) * w
    else:
        out = _blocks(experts, x, tokens, counts, w)
    return torch.zeros_like(x).index_add_(0, tokens, out)


def _blocks(experts, x: Tensor, tokens: Tensor, counts: list[int], w: Tensor) -> Tensor:
    """w * expert e(x[t]) for the pairs (t, e), in their (expert) order: one expert at a time, or on threads."""
    active = [e for e, c in enumerate(counts) if c]
    many = x.device.type == "cpu" and len(active) >= PARALLEL_MIN_EXPERTS and len(tokens) >= PARALLEL_MIN_ROWS
    threads = torch.get_num_threads() if many else 1
    # each expert's weights as views made in one call (unbind), not an indexing call per expert: its
    # backward stacks the gradients once, where indexing's zero-filled a full [N, ...] buffer per expert
    # (N = 64, 4096 tokens: forward and backward 666 -> 178 ms here)
    whole = list(zip(experts.w_in.unbind(0), experts.w_out.unbind(0)))
    grad = torch.is_grad_enabled()
    # one gather up front (on threads with autograd off, each thread gathers its own rows instead);
    # torch.split (not slicing), so the backward pass concatenates gradients too
    blocks = torch.split(x.index_select(0, tokens), counts) if grad or threads == 1 else None
    if grad:
        outs = _each(lambda e: experts.act(blocks[e] @ whole[e][0]) @ whole[e][1], active, counts, threads)
        return (torch.cat(outs) if outs else x.new_zeros(0, experts.d_model)) * w
    # autograd off (the dashboard, `bench`): each expert writes its block of the output and scales it
    # while it is in cache
    out = x.new_empty(len(tokens), experts.d_model)
    slots, rows, scales = torch.split(out, counts), torch.split(tokens, counts), torch.split(w, counts)
    w_in = experts.w_in.split(experts.d_ff, dim=2) if experts.activation == "swiglu" else (experts.w_in,)
    # per expert (w_gate, w_up, w_out) or (w_in, w_out), made in three calls rather than three per
    # expert (at N = 256 the Python time per expert is what the two expert threads contend for)
    views = list(zip(*(m.unbind(0) for m in (*w_in, experts.w_out))))

    def one(e: int) -> Tensor:
        if threads > 1:
            # many experts: their weights are not in cache. One sequential read first brings them in
            # faster than the matmuls' own access pattern does (one core, 256 experts of 64 tokens:
            # 0.70 -> 0.65-0.67 ms an expert)
            whole[e][0].sum(), whole[e][1].sum()
        part = x.index_select(0, rows[e]) if blocks is None else blocks[e]
        h = torch.mm(part, views[e][0])
        if experts.activation == "swiglu":
            F.silu(h, inplace=True).mul_(torch.mm(part, views[e][1]))
        else:
            h = F.gelu(h)
        return torch.mm(h, views[e][-1], out=slots[e]).mul_(scales[e])

    _each(one, active, counts, threads)
    return out


def _each(one, active: list[int], counts: list[int], threads: int) -> list[Tensor]:
    """[one(e) for e in active], on `threads` Python threads when threads > 1 (matmuls release the GIL).

    With many experts each gets few tokens (64 at N = 256 here), and a small matmul splits badly over
    cores: on 2 cores, 2 threads inside each matmul made N = 256 take 1.8-2.2x the time of N = 8;
    giving each core whole experts (each worker single-threaded, see `expert_pool`) keeps the layer
    within about 1.5x, the CPU's version of a grouped GEMM. Grad and inference mode are per thread in
    PyTorch, so the caller's are passed on."""
    if threads == 1:
        return [one(e) for e in active]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(ids: list[int]) -> list[tuple[int, Tensor]]:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return [(e, one(e)) for e in ids]

    done = dict(pair for chunk in expert_pool(threads).map(run, share_out(active, counts, threads))
                for pair in chunk)
    return [done[e] for e in active]


def share_out(experts: list[int], counts: list[int], threads: int) -> list[list[int]]:
    """Split experts into `threads` lists of near-equal work (rows + EXPERT_COST_ROWS each): the
    largest first, each to the least-loaded list (longest-processing-time-first), then each list
    in expert order, so the threads finish together: dealt in turn, N = 64 gave one thread 5 % more
    rows than the other (8617 vs 7767)."""
    lists, load = [[] for _ in range(threads)], [0] * threads
    for e in sorted(experts, key=lambda e: -counts[e]):
        i = load.index(min(load))
        lists[i].append(e)
        load[i] += counts[e] + EXPERT_COST_ROWS
    return [sorted(ids) for ids in lists]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def expert_pool(threads: int) -> ThreadPoolExecutor:
    """`threads` workers, each running its matmuls on its own core: torch's thread count is per
    thread, and a worker left at the process's count would start a team of that many inside
    every matmul, so 2 workers ran 4 threads on 2 cores and spun (N = 256: 139 -> 107 ms here).

    Two PyTorch details: a thread's count is set up lazily, from the last count set by ANY thread,
    on its first parallel call (so a worker sets itself to 1 only after that); and set_num_threads
    also sets that default for threads started later, so the caller puts its own count back once
    every worker has started."""
    if threads not in _POOLS:
        def one_core():
            torch.get_num_threads()           # PyTorch's per-thread set-up first, or it would undo the next line
            torch.set_num_threads(1)

        pool = ThreadPoolExecutor(threads, thread_name_prefix="moe-experts", initializer=one_core)
        started = threading.Barrier(threads + 1)
        for _ in range(threads):              # a task each, held until all have started: every worker exists
            pool.submit(started.wait)
        started.wait()
        torch.set_num_threads(threads)        # the default for threads started later, as it was
        _POOLS[threads] = pool
    return _POOLS[threads]
