"""The Mixture-of-Experts layer: a router, N routed experts and optional shared experts.

    y_t = sum_{e chosen for t} w_{t,e} * expert_e(x_t)  +  sum_shared expert_s(x_t)

Experts are stored as stacked weight tensors ([N, d_model, ...]) so tokens can be
dispatched in one sweep: tokens are sorted by expert and each expert runs one
matmul over its contiguous block of tokens (on CUDA a single grouped GEMM over
all experts; on a multi-core CPU with many experts, the experts are shared out
over threads). `forward_reference` keeps the plain per-expert loop of
DeepSeek-V3's inference code for tests and for reading.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .routing import SCHEMES, Routing, get_scheme, route

ACTIVATIONS = ("swiglu", "gelu")


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available, then mps, then cpu."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not str(device).startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA GPU is available on this machine")
    return torch.device(device)


class Router(nn.Module):
    """Linear scores per expert: l_t = W_r x_t (no bias), computed in float32."""

    param_part = "router"

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), self.weight.float())


class Experts(nn.Module):
    """N independent feed-forward networks stored as stacked weights.

    SwiGLU (Mixtral, DeepSeek, Qwen): expert(x) = W_out (silu(W_gate x) * W_up x),
    with W_gate and W_up fused into one [d_model, 2*d_ff] matrix per expert.
    GELU: expert(x) = W_out gelu(W_in x).
    """

    param_part = "routed_experts"

    def __init__(self, n_experts: int, d_model: int, d_ff: int, activation: str = "swiglu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
        self.n_experts, self.d_model, self.d_ff, self.activation = n_experts, d_model, d_ff, activation
        d_in = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, d_in))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    def params_per_expert(self) -> int:
        return (self.w_in.numel() + self.w_out.numel()) // self.n_experts

    def _act(self, h: Tensor) -> Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Run expert e alone on x [n, d_model]."""
        return self._act(x @ self.w_in[e]) @ self.w_out[e]

    def _weight_views(self) -> list[tuple[Tensor, ...]]:
        """Per expert (w_gate, w_up, w_out) views for SwiGLU, (w_in, w_out) for GELU: made in
        three calls per forward rather than three indexing calls per expert (at N = 256, the
        Python time per expert is what the two expert threads contend for)."""
        w_in = self.w_in.split(self.d_ff, dim=2) if self.activation == "swiglu" else (self.w_in,)
        return list(zip(*(w.unbind(0) for w in (*w_in, self.w_out))))

    def _expert_into(self, views: tuple[Tensor, ...], x: Tensor, out: Tensor, scale: Tensor | None) -> Tensor:
        """One expert (its `_weight_views` entry) on x, written into `out` and scaled by `scale` [n, 1]
        there, for when autograd is off (the dashboard, `bench`): the gate is activated and multiplied
        in place and the result lands in the caller's buffer, so no intermediate is copied and no
        torch.cat is needed."""
        if self.activation == "swiglu":
            w_gate, w_up, w_out = views
            h = torch.mm(x, w_gate)
            F.silu(h, inplace=True).mul_(torch.mm(x, w_up))
        else:
            w_in, w_out = views
            h = F.gelu(torch.mm(x, w_in))
        torch.mm(h, w_out, out=out)
        return out if scale is None else out.mul_(scale)

    def forward(self, x: Tensor, counts: list[int], rows: Tensor | None = None,
                scale: Tensor | None = None) -> Tensor:
        """Expert e runs on its block of counts[e] rows, blocks in expert order: the rows of x itself,
        or, given `rows` (the layer's dispatch), the rows x[rows]. Returns the outputs in that order,
        each row multiplied by `scale` [n, 1] if given (the layer's combine weights)."""
        n = x.shape[0] if rows is None else rows.shape[0]
        if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
            x = x if rows is None else x.index_select(0, rows)
            offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x, self.w_in.to(x.dtype), offs=offs)
            out = torch._grouped_mm(self._act(h), self.w_out.to(x.dtype), offs=offs)
            return out if scale is None else out * scale
        active = [e for e, c in enumerate(counts) if c]
        threads = torch.get_num_threads()
        on_threads = (x.device.type == "cpu" and threads > 1 and len(active) >= PARALLEL_MIN_EXPERTS
                      and n >= PARALLEL_MIN_ROWS)
        grad = torch.is_grad_enabled()
        if rows is not None and (grad or not on_threads):
            x, rows = x.index_select(0, rows), None      # one gather up front (else each thread gathers its own)
        # torch.split (not slicing) so the backward pass concatenates gradients
        # instead of zero-filling a full-size buffer for every expert
        blocks = torch.split(x if rows is None else rows, counts)
        if grad:
            if on_threads:
                outs = self._experts_on_threads(lambda ids: [self.expert(e, blocks[e]) for e in ids], active, threads,
                                                counts)
            else:
                outs = [self.expert(e, blocks[e]) for e in active]
            out = torch.cat(outs) if outs else x.new_zeros(0, self.d_model)
            return out if scale is None else out * scale
        # autograd off: each expert writes its block of the output and scales it while the block is in
        # cache; on threads, each also gathers its own rows, so that copy is shared out over the cores
        out = x.new_empty(n, self.d_model)
        slots, views = torch.split(out, counts), self._weight_views()
        scales = torch.split(scale, counts) if scale is not None else [None] * len(counts)
        whole = list(zip(self.w_in.unbind(0), self.w_out.unbind(0))) if on_threads else None

        def run(ids: list[int]) -> list[Tensor]:
            done = []
            for e in ids:
                if whole is not None:
                    # many experts: their weights are not in cache. One sequential read first brings them
                    # in faster than the matmuls' own access pattern does (one core, 256 experts of 64
                    # tokens: 0.70 -> 0.65-0.67 ms an expert)
                    whole[e][0].sum(), whole[e][1].sum()
                part = blocks[e] if rows is None else x.index_select(0, blocks[e])
                done.append(self._expert_into(views[e], part, slots[e], scales[e]))
            return done

        if on_threads:
            self._experts_on_threads(run, active, threads, counts)
        else:
            run(active)
        return out

    def _experts_on_threads(self, job, active: list[int], threads: int, counts: list[int]) -> list[Tensor]:
        """Run the experts `threads` at a time, one Python thread each (matmuls release the GIL).

        With many experts each gets few tokens (64 at N = 256 here), and a small matmul
        splits badly over cores: measured on 2 cores, 2 threads inside each matmul made
        N = 256 take 1.8-2.2x the time of N = 8; giving each core whole experts (each worker
        single-threaded, see `_expert_pool`) keeps the layer within about 1.5x, the CPU's
        version of what a grouped GEMM does on a GPU.
        Grad and inference mode are per thread in PyTorch, so the callers' are passed on.
        `job(ids)` runs the experts `ids` and returns their outputs in that order.
        The experts are shared out by their rows (`counts`), so the threads finish together:
        dealt in turn, N = 64 gave one thread 5 % more rows than the other (8617 vs 7767).
        """
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def run(ids: list[int]) -> list[tuple[int, Tensor]]:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return list(zip(ids, job(ids)))

        done = dict(pair for chunk in _expert_pool(threads).map(run, share_out(active, counts, threads))
                    for pair in chunk)
        return [done[e] for e in active]


# An expert's fixed cost (reading its weights, a few calls) in rows of matmul work: at N = 256 here
# an expert of 64 rows took 0.70 ms on one core, of which ~0.15 ms is not per row
EXPERT_COST_ROWS = 16


def share_out(experts: list[int], counts: list[int], threads: int) -> list[list[int]]:
    """Split experts into `threads` lists of near-equal work (rows + EXPERT_COST_ROWS each): the
    largest first, each to the least-loaded list (longest-processing-time-first), then each list
    in expert order."""
    lists, load = [[] for _ in range(threads)], [0] * threads
    for e in sorted(experts, key=lambda e: -counts[e]):
        i = load.index(min(load))
        lists[i].append(e)
        load[i] += counts[e] + EXPERT_COST_ROWS
    return [sorted(ids) for ids in lists]


# Experts with tokens, and rows in all, before Experts.forward gives whole experts to threads. Below
# that, one expert's matmul split over the cores is faster: small batches (the dashboard's texts), and
# few experts with many rows each. Timed in interleaved rounds (`bench.interleaved_times`), 8192 tokens,
# k = 2, 2 cores: threads lost at N = 16 (90 vs 79 ms), were even at 32 and won from 64 on (98 vs 110).
PARALLEL_MIN_EXPERTS = 32
PARALLEL_MIN_ROWS = 2048
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _expert_pool(threads: int) -> ThreadPoolExecutor:
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


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeekMoE, Dai et al. 2024, arXiv:2401.06066): every token uses them.

    n_shared experts of width d_ff are fused into one FFN of width n_shared * d_ff,
    which computes exactly the sum of the n_shared experts' outputs (as in
    DeepSeek-V3's `MoE.shared_experts`).
    """

    param_part = "shared_experts"

    def __init__(self, n_shared: int, d_model: int, d_ff: int, activation: str = "swiglu"):
        super().__init__()
        self.ffn = Experts(1, d_model, n_shared * d_ff, activation)
        self.ffn.param_part = "shared_experts"

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn.expert(0, x)


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    `y, routing = layer(x)` for x of shape [B, T, d_model] or [T, d_model].
    All tokens of one call form one routing group (capacity and Expert Choice
    compete across them) unless `group_size` splits them into consecutive
    groups. Routing options can be overridden per call without touching the
    weights: `layer(x, top_k=4, scheme="switch", capacity_factor=1.5)`.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int = 2,
        scheme: str = "softmax_topk",
        n_shared: int = 0,
        activation: str = "swiglu",
        **router_options,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive whole number, got {v!r}")
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"the number of experts N must be at least 1, got {n_experts!r}")
        if isinstance(n_shared, bool) or not isinstance(n_shared, int) or n_shared < 0:
            raise ValueError(f"n_shared must be 0 or more, got {n_shared!r}")
        get_scheme(scheme)
        self.d_model, self.d_ff, self.n_experts = d_model, d_ff, n_experts
        self.top_k, self.scheme, self.n_shared = top_k, scheme, n_shared
        self.group_size = router_options.pop("group_size", None)
        self.router_options = router_options
        self._check_call(scheme, top_k, router_options)
        self.router = Router(d_model, n_experts)
        # noisy top-k learns a per-expert noise scale (zero-initialised as in tensor2tensor);
        # only models built for noisy top-k carry it, and noise only acts while training
        self.noise = None
        if scheme == "noisy_topk":
            self.noise = Router(d_model, n_experts)
            nn.init.zeros_(self.noise.weight)
        # DeepSeek-V3 selection bias: a buffer, changed by update_bias, never by gradients
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.experts = Experts(n_experts, d_model, d_ff, activation)
        self.shared = SharedExperts(n_shared, d_model, d_ff, activation) if n_shared else None

    # -- routing ---------------------------------------------------------------

    def _check_call(self, scheme: str, top_k: int | None, options: dict) -> None:
        s = get_scheme(scheme)
        allowed = set(s.options) - {"noise_logits", "generator", "training", "bias"}
        bad = set(options) - allowed
        if bad:
            raise ValueError(f"{scheme} does not take option(s) {', '.join(sorted(bad))} (it takes: {', '.join(sorted(allowed)) or 'none'})")
        if s.uses_k and top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.n_experts:
                raise ValueError(f"top-k must be between 1 and N = {self.n_experts}, got {top_k!r}")

    def _check_disabled(self, disabled, scheme: str, k: int | None, options: dict) -> list[int]:
        """Validate `disabled_experts`; return the sorted experts that stay switched on."""
        if isinstance(disabled, (str, bytes)) or not hasattr(disabled, "__iter__"):
            raise ValueError(f"disabled_experts must be a list of expert numbers, got {disabled!r}")
        off = set()
        for e in disabled:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.n_experts:
                raise ValueError(f"disabled expert {e!r} does not exist: experts are numbered 0 to {self.n_experts - 1}")
            off.add(e)
        on = [e for e in range(self.n_experts) if e not in off]
        s = get_scheme(scheme)
        need = k if s.uses_k else (s.fixed_k or 1)
        if len(on) < need:
            what = f"top-k = {k}" if s.uses_k else f"{s.label} ({need} expert(s) per token)"
            raise ValueError(f"{len(off)} of {self.n_experts} experts are switched off: {len(on)} remain, "
                             f"but {what} needs at least {need}")
        if scheme == "deepseek" and options.get("n_groups", 1) > 1 and off:
            raise ValueError("switching experts off is not supported with group-limited DeepSeek routing "
                             "(n_groups > 1): the expert groups would no longer be equal")
        return on

    def route(self, x: Tensor, *, top_k: int | None = None, scheme: str | None = None,
              disabled_experts=None, **options) -> Routing:
        """Router decision for x [n, d_model] (one or more groups), without running experts.

        `disabled_experts` (a list of expert numbers) switches experts off for
        this call, for ablations: the router can never select them. They are
        removed from the routing group before the scheme runs, and the scheme
        routes over the remaining N' experts exactly as it would in a model
        that only had those. For softmax schemes this is the same as setting the
        disabled logits to -inf (their probability is 0 and top-k weights are
        renormalised over what remains, as the scheme does); for DeepSeek the
        sigmoid score is 0 and the bias cannot bring the expert back; Expert
        Choice and BASE give a disabled expert no tokens (the remaining experts
        share all of them). Capacity follows the scheme's own rule over N'
        experts (ceil(cf * T / N')). The weights are never touched, and the
        returned Routing still has N columns: zeros for disabled experts, whose
        raw router logits are kept in `logits` for display.
        """
        scheme = scheme or self.scheme
        s = get_scheme(scheme)
        if scheme == self.scheme:
            options = {**self.router_options, **options}
        group_size = options.pop("group_size", self.group_size)
        k = (top_k or self.top_k) if s.uses_k else None
        self._check_call(scheme, k, options)
        on = None
        if disabled_experts is not None:
            on = self._check_disabled(disabled_experts, scheme, k, options)
            if len(on) == self.n_experts:
                on = None
        logits = self.router(x)
        if scheme == "noisy_topk" and self.noise is not None:
            options.update(noise_logits=self.noise(x), training=self.training)
        if scheme == "deepseek":
            options.setdefault("bias", self.expert_bias)
        full_logits = logits
        if on is not None:
            keep = torch.tensor(on, device=logits.device)
            logits = logits[:, keep]
            if options.get("noise_logits") is not None:
                options["noise_logits"] = options["noise_logits"][:, keep]
            if options.get("bias") is not None:
                options["bias"] = options["bias"][keep.to(options["bias"].device)]
        n = logits.shape[0]
        if group_size is None or group_size >= n:
            routing = route(logits, scheme, k=k, **options)
        else:
            parts = []
            for start in range(0, n, group_size):
                sub = {kk: (v[start : start + group_size] if kk == "noise_logits" else v) for kk, v in options.items()}
                parts.append(route(logits[start : start + group_size], scheme, k=k, **sub))
            routing = Routing.cat(parts)
        if on is not None:
            routing = _expand_routing(routing, keep, self.n_experts, full_logits)
        return routing

    def experts_per_token(self, *, top_k: int | None = None, scheme: str | None = None,
                          capacity_factor: float | None = None) -> float:
        """Average routed experts a token uses (before drops): k, or the scheme's fixed value.

        For Expert Choice it is the capacity factor (each expert takes cf*T/N tokens).
        """
        s = get_scheme(scheme or self.scheme)
        if s.uses_k:
            return float(top_k or self.top_k)
        if s.fixed_k is not None:
            return float(s.fixed_k)
        cf = capacity_factor or self.router_options.get("capacity_factor") or s.default_capacity_factor
        return float(min(cf, self.n_experts))

    # -- forward -----------------------------------------------------------------

    def forward(self, x: Tensor, **overrides) -> tuple[Tensor, Routing]:
        shape = x.shape
        if x.dim() not in (2, 3) or shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects [B, T, {self.d_model}] or [T, {self.d_model}], got {tuple(shape)}")
        x2 = x.reshape(-1, self.d_model)                      # (B*T, C)
        routing = self.route(x2, **overrides)
        y = self._combine_experts(x2, routing)
        if self.shared is not None:
            y = y + self.shared(x2)
        return y.view(shape), routing

    def _combine_experts(self, x: Tensor, routing: Routing) -> Tensor:
        """Vectorised dispatch: sort (token, expert) pairs by expert, run each expert once."""
        idx = routing.indices                                   # (n, kmax), -1 = unused
        flat = idx.reshape(-1)
        valid = flat >= 0
        pair = valid.nonzero().squeeze(1)                       # positions of real (token, expert) pairs
        experts = flat[pair]
        order = torch.sort(experts, stable=True).indices
        pair, experts = pair[order], experts[order]
        tokens = pair // idx.shape[1]
        counts = torch.bincount(experts, minlength=self.n_experts).tolist()
        w = routing.weights.reshape(-1)[pair].to(x.dtype)[:, None]
        out = self.experts(x, counts, rows=tokens, scale=w)     # w * expert e(x[t]) for its tokens t
        y = torch.zeros_like(x, dtype=out.dtype)
        y.index_add_(0, tokens, out)
        return y.to(x.dtype)

    def forward_reference(self, x: Tensor, routing: Routing | None = None, **overrides) -> tuple[Tensor, Routing]:
        """The same layer as a plain loop over experts (DeepSeek-V3 inference code style)."""
        shape = x.shape
        x2 = x.reshape(-1, self.d_model)
        if routing is None:
            routing = self.route(x2, **overrides)
        y = torch.zeros_like(x2)
        for e in range(self.n_experts):
            tok, rank = torch.where(routing.indices == e)
            if tok.numel() == 0:
                continue
            y[tok] += self.experts.expert(e, x2[tok]) * routing.weights[tok, rank, None].to(x2.dtype)
        if self.shared is not None:
            y = y + self.shared(x2)
        return y.view(shape), routing

    @torch.no_grad()
    def update_bias(self, load: Tensor, gamma: float) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing: nudge the selection bias towards balance."""
        from .routing import update_bias

        self.expert_bias.copy_(update_bias(self.expert_bias, load, gamma))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, top_k={self.top_k}, "
                f"scheme={self.scheme!r}, n_shared={self.n_shared}")


def _expand_routing(r: Routing, keep: Tensor, n_experts: int, logits: Tensor) -> Routing:
    """Map a Routing over the N' switched-on experts `keep` back to all N experts (zeros elsewhere)."""

    def cols(t: Tensor) -> Tensor:                      # (T, N') -> (T, N)
        out = t.new_zeros(t.shape[0], n_experts)
        out[:, keep] = t
        return out

    def ids(t: Tensor | None) -> Tensor | None:         # expert numbers N' -> N, -1 stays -1
        if t is None:
            return None
        return torch.where(t >= 0, keep[t.clamp(min=0)], t)

    return Routing(scheme=r.scheme, combine=cols(r.combine), dispatch=cols(r.dispatch), indices=ids(r.indices),
                   weights=r.weights, probs=cols(r.probs), dropped=cols(r.dropped), capacity=r.capacity,
                   aux=r.aux, choices=ids(r.choices), logits=logits)


class DenseFFN(nn.Module):
    """A standard (dense) feed-forward layer, for comparisons: every token uses every weight."""

    param_part = "dense_ffn"

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu"):
        super().__init__()
        self.ffn = Experts(1, d_model, d_ff, activation)
        self.ffn.param_part = "dense_ffn"

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        return self.ffn.expert(0, x.reshape(-1, shape[-1])).view(shape)


__all__ = ["MoELayer", "Experts", "SharedExperts", "Router", "DenseFFN", "pick_device", "SCHEMES"]
