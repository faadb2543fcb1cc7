"""Expert parallelism on torch.distributed: experts live on different processes, tokens travel.

With P processes (ranks) and N routed experts, rank r holds the contiguous
block of experts [r*N/P, (r+1)*N/P) and nothing of the others; the router,
attention, embeddings and shared experts are replicated, and every rank brings
its own tokens (data parallel over tokens). One MoE layer then runs as
(GShard, Lepikhin et al. 2020, arXiv:2006.16668, section 3; DeepSpeed-MoE,
Rajbhandari et al. 2022, arXiv:2201.05596):

    1. route        every rank computes router logits for its tokens
    2. dispatch     each (token, expert) pair is sent to the rank that holds the expert
                    (all_to_all_single with variable split sizes)
    3. experts      each rank runs its local experts on the tokens it received
    4. combine      the results travel back the same way (the reverse all_to_all)
                    and every token sums its experts' outputs with the router weights

Where capacity is decided. Capacity and Expert Choice make tokens compete
inside a routing group, so the group must be defined. Production systems
usually route each device's tokens as their own group (GShard's "local
groups"), which changes the routing as P changes. Here the routing group is
the WHOLE batch over all ranks: every rank all-gathers the router logits
(N floats per token, small next to the d_model activations that travel in
step 2), routes the whole group with the unchanged `MoELayer.route`, and keeps
its own rows. Every rank therefore computes the same `Routing` as the
single-process layer on the concatenated batch, so outputs, drops, balancing
losses and gradients all match it (tests/test_parallel.py checks this).
The layer returns that global `Routing` (all ranks' tokens, rank order).

Gradients cross the exchanges through two autograd Functions below: the
backward of an all-to-all is the all-to-all with send and receive swapped,
and the backward of the logits all-gather is an all-reduce followed by taking
one's own rows. Replicated parameters then get their gradients averaged over
ranks (as in data parallelism) and expert gradients are divided by P, which
makes every gradient that of the mean loss over all ranks.

Backends: gloo on CPU (its all_to_all_single supports unequal split sizes in
torch 2.13; checked by the tests), NCCL on CUDA (one GPU per rank; that path
is written but has not been run here, where no multi-GPU machine was at hand).

Running it:

    moe-lab route --expert-parallel 2 "def f(x): return 42" --json
    moe-lab train --preset tiny --expert-parallel 2
    python -m torch.distributed.run --standalone --nproc-per-node 4 \
        -m moe_core.parallel.expert_parallel record --model moe-n8-switch --out assets/parallel/moe-n8-switch-p4.json

`moe-lab route/train --expert-parallel P` starts `torchrun --standalone
--nproc-per-node P` itself when it is not already running under torchrun
(inside torchrun, P must equal the number of processes). Only rank 0 prints;
`train` saves an ordinary checkpoint (experts gathered back on rank 0).

Things to know:
- Every rank builds or loads the full model, then keeps its block of experts:
  simple and fine at this scale; a large model would be loaded shard by shard.
- Training splits each global batch evenly over the ranks, so the mean of the
  ranks' losses is the single-process loss; the balancing terms come from the
  global routing and are the same on every rank.
- Stochastic schemes (noisy top-k while training, GShard's random second
  expert) draw their noise on every rank for the whole group; ranks agree
  because they share the seed and draw the same numbers in the same order.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..analysis.export import trace_json
from ..analysis.metrics import balance_metrics
from ..analysis.specialisation import model_card
from ..data.tokens import load_token_data
from ..inference import RouteResult, params_of, tokenize, windows
from ..model.checkpoint import list_checkpoints, load, save
from ..model.gpt import MoEConfig, MoEGPT
from ..model.layer import Experts, MoELayer, Router, pick_device
from ..model.request import RoutingRequest
from ..model.routing import Routing
from ..perf.experts import run_experts
from ..train.loop import Trainer, train

TEXT_FILE_ENV = "MOE_LAB_EP_TEXT_FILE"  # how a self-launched route run hands the text to its processes
MAX_LOCAL_PROCESSES = 16   # self-launched torchrun on one machine: more processes only thrash the CPUs


# ----------------------------------------------------------------------------- process group


def under_torchrun() -> bool:
    """True inside a process started by torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init(device: str = "cpu") -> torch.device:
    """Join the torchrun process group: gloo on CPU, NCCL on CUDA (GPU = LOCAL_RANK). Returns this rank's device.

    `device` is "cpu", "cuda" or "auto" (CUDA when available). Calling it again returns the same device.
    """

    if str(device) == "mps" or pick_device(device).type == "mps":
        device = "cpu"   # no torch.distributed backend runs on Apple GPUs: experts stay on the CPU
    cuda = pick_device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(f"rank {local_rank} needs GPU {local_rank} but only "
                             f"{torch.cuda.device_count()} are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        # a collective that waits longer than this means a peer died: fail instead of hanging for torch's 30 min
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    return dev


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def check_expert_parallel(n_experts: int, p) -> int:
    """Validate P for N experts: a whole number >= 1 that divides N (every rank holds N/P experts)."""
    if isinstance(p, bool) or not isinstance(p, int):
        raise ValueError(f"expert parallelism P must be a whole number, got {p!r}")
    if p < 1:
        raise ValueError(f"expert parallelism P must be at least 1 process, got {p}")
    if n_experts % p:
        divisors = [d for d in range(1, n_experts + 1) if n_experts % d == 0]
        raise ValueError(f"expert parallelism P = {p} must divide the number of experts N = {n_experts} "
                         f"(each process holds N/P experts); choose one of {', '.join(map(str, divisors))}")
    return p


def expert_placement(n_experts: int, p: int) -> list[list[int]]:
    """Experts held by each rank: contiguous blocks, rank r holds [r*N/P, (r+1)*N/P)."""
    check_expert_parallel(n_experts, p)
    e = n_experts // p
    return [list(range(r * e, (r + 1) * e)) for r in range(p)]


# ----------------------------------------------------------------------------- collectives with gradients


class _AllToAll(torch.autograd.Function):
    """Rows of x go to ranks in blocks of `send` sizes; `recv` rows arrive, in rank order.

    Backward: the same exchange in reverse (send and receive sizes swapped).
    """

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (sizes may differ), in rank order, on every rank.

    Backward: every rank holds a gradient for ALL rows (its own loss used the
    whole group), so the gradient of my rows is the sum over ranks of theirs:
    an all-reduce, then my slice.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], group) -> Tensor:
        r = dist.get_rank(group)
        ctx.sizes, ctx.group, ctx.start = sizes, group, sum(sizes[:r])
        m = max(sizes)
        padded = x.new_zeros((m, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[ctx.start : ctx.start + ctx.sizes[r]], None, None


def all_to_all(x: Tensor, send: list[int], recv: list[int], group=None) -> Tensor:
    return _AllToAll.apply(x, send, recv, group)


def gather_sizes(n: int, device, group=None) -> list[int]:
    t = torch.tensor([n], dtype=torch.long, device=device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return [int(p.item()) for p in parts]


def all_gather_rows(x: Tensor, group=None) -> tuple[Tensor, list[int]]:
    """Every rank's rows of x, concatenated in rank order (differentiable); also the row counts."""
    sizes = gather_sizes(x.shape[0], x.device, group)
    return _AllGatherRows.apply(x, sizes, group), sizes


# ----------------------------------------------------------------------------- the layer


class GatheredRouter(Router):
    """The replicated router, whose output is the logits of the WHOLE routing group.

    Each rank scores its own tokens (l_t = W_r x_t, float32) and all-gathers
    the scores, so `MoELayer.route` (unchanged: options, groups, switched-off
    experts, DeepSeek bias...) routes all ranks' tokens as one group. Same
    weight name as `Router`, so checkpoints load as usual.
    """

    def __init__(self, router: Router, group=None):
        nn.Module.__init__(self)
        self.weight = router.weight      # the same Parameter: replicated on every rank
        self.group = group
        self.sizes: list[int] = []       # tokens per rank in the last call

    def forward(self, x: Tensor) -> Tensor:
        logits, self.sizes = all_gather_rows(F.linear(x.float(), self.weight.float()), self.group)
        return logits


@dataclass
class ExchangeStats:
    """What one expert-parallel forward sent where (measured, not modelled)."""

    tokens_per_rank: list[int]      # tokens each rank brought
    counts: list[list[int]]         # [source rank][expert]: (token, expert) pairs sent, after capacity
    placement: list[list[int]]      # experts held by each rank
    dropped: list[int]              # [expert]: pairs cut by capacity (the router chose them, nobody computes them)
    bytes_per_pair: int             # one activation row (d_model values) each way
    exchange_s: float = 0.0         # this rank's wall time inside the two all-to-alls
    expert_s: float = 0.0           # this rank's wall time in its local experts

    @property
    def traffic(self) -> list[list[int]]:
        """[source rank][destination rank] pairs sent (dispatch; combine sends the same back)."""
        return [[sum(row[e] for e in experts) for experts in self.placement] for row in self.counts]

    @property
    def load_per_rank(self) -> list[int]:
        """Pairs each rank's experts computed."""
        return [sum(self.counts[s][e] for s in range(len(self.counts)) for e in experts) for experts in self.placement]

    @property
    def dropped_per_rank(self) -> list[int]:
        """Pairs cut by capacity at each rank's experts."""
        return [sum(self.dropped[e] for e in experts) for experts in self.placement]

    def as_dict(self) -> dict:
        return {"tokens_per_rank": self.tokens_per_rank, "counts": self.counts, "traffic": self.traffic,
                "load_per_rank": self.load_per_rank, "dropped_per_expert": self.dropped,
                "dropped_per_rank": self.dropped_per_rank, "bytes_per_pair": self.bytes_per_pair,
                "exchange_s": round(self.exchange_s, 6), "expert_s": round(self.expert_s, 6)}


class ExpertParallelMoE(MoELayer):
    """An MoELayer whose routed experts are split over the ranks of a process group.

    Built from a full `MoELayer` (same weights on every rank): keeps the
    router, the noise router, the bias and the shared experts (replicated)
    and copies out only this rank's block of N/P experts.

    `y, routing = layer(x)`: y covers this rank's tokens x; `routing` is the
    routing of the whole group (every rank's tokens, in rank order), the same
    on every rank and the same as `MoELayer` gives for the concatenated batch.
    `last_stats` holds the traffic of the last forward.
    """

    def __init__(self, layer: MoELayer, group=None):
        nn.Module.__init__(self)
        p, r = dist.get_world_size(group), dist.get_rank(group)
        check_expert_parallel(layer.n_experts, p)
        for name in ("d_model", "d_ff", "n_experts", "top_k", "scheme", "n_shared", "group_size"):
            setattr(self, name, getattr(layer, name))
        self.router_options = dict(layer.router_options)
        self.group, self.world, self.rank = group, p, r
        self.placement = expert_placement(layer.n_experts, p)
        self.local_experts = self.placement[r]
        self.router = GatheredRouter(layer.router, group)
        self.noise = GatheredRouter(layer.noise, group) if layer.noise is not None else None
        self.register_buffer("expert_bias", layer.expert_bias)
        full = layer.experts
        lo, hi = self.local_experts[0], self.local_experts[-1] + 1
        self.experts = Experts(hi - lo, full.d_model, full.d_ff, full.activation)
        with torch.no_grad():
            self.experts.w_in.copy_(full.w_in[lo:hi])
            self.experts.w_out.copy_(full.w_out[lo:hi])
        self.experts.to(full.w_in.device)
        self.experts.w_in.requires_grad_(full.w_in.requires_grad)
        self.experts.w_out.requires_grad_(full.w_out.requires_grad)
        self.shared = layer.shared
        self.last_stats: ExchangeStats | None = None

    def forward(self, x: Tensor, token_ids: Tensor | None = None, **overrides) -> tuple[Tensor, Routing]:
        shape = x.shape
        if x.dim() not in (2, 3) or shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects [B, T, {self.d_model}] or [T, {self.d_model}], got {tuple(shape)}")
        x2 = x.reshape(-1, self.d_model)                          # (n, C) this rank's tokens
        routing = self.route(x2, token_ids=token_ids, **overrides)   # the whole group, identical on every rank
        sizes = self.router.sizes
        start = sum(sizes[: self.rank])
        idx = routing.indices[start : start + x2.shape[0]]        # (n, kmax) my tokens' experts, -1 = none
        w_all = routing.weights[start : start + x2.shape[0]]

        # (token, expert) pairs sorted by expert: experts are in contiguous rank blocks,
        # so this is also sorted by destination rank, as all_to_all_single needs
        flat = idx.reshape(-1)
        pair = (flat >= 0).nonzero().squeeze(1)
        experts = flat[pair]
        order = torch.sort(experts, stable=True).indices
        pair, experts = pair[order], experts[order]
        tokens = pair // idx.shape[1]
        mine = torch.bincount(experts, minlength=self.n_experts)  # (N,) pairs I send to each expert
        counts = torch.empty(self.world, self.n_experts, dtype=torch.long, device=x2.device)
        dist.all_gather(list(counts.unbind(0)), mine, group=self.group)   # (P, N): everyone's sends
        E = len(self.local_experts)
        send = mine.view(self.world, E).sum(1).tolist()           # pairs to each rank
        lo = self.local_experts[0]
        recv_by = counts[:, lo : lo + E]                          # (P, E) what arrives here, per source and expert
        recv = recv_by.sum(1).tolist()

        t0 = time.perf_counter()
        x_recv = all_to_all(x2[tokens], send, recv, self.group)   # rows in (source rank, expert) order
        t1 = time.perf_counter()
        # the local expert of each received row (they come in (source rank, expert) blocks): run_experts
        # gives every row its expert's output, in the order received (weight 1: the sender applies w)
        local = torch.arange(E, device=x2.device).repeat(self.world).repeat_interleave(recv_by.flatten())
        out = run_experts(self.experts, x_recv, local[:, None], x_recv.new_ones(len(local), 1))
        t2 = time.perf_counter()
        y_pairs = all_to_all(out, recv, send, self.group)         # my pairs' results, in my send order
        t3 = time.perf_counter()

        w = w_all.reshape(-1)[pair].to(y_pairs.dtype)
        y = torch.zeros_like(x2, dtype=y_pairs.dtype)
        y.index_add_(0, tokens, y_pairs * w[:, None])
        y = y.to(x2.dtype)
        if self.shared is not None:
            y = y + self.shared(x2)
        self.last_stats = ExchangeStats(
            tokens_per_rank=list(sizes), counts=counts.tolist(), placement=self.placement,
            dropped=routing.dropped.sum(0).tolist(), bytes_per_pair=self.d_model * x2.element_size(),
            exchange_s=(t1 - t0) + (t3 - t2), expert_s=t2 - t1)
        return y.view(shape), routing


    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}/{self.world}, experts={self.local_experts}"


def shard_model(model: nn.Module, group=None) -> nn.Module:
    """Replace every MoELayer of `model` (in place) by its expert-parallel version for this rank."""
    for block in getattr(model, "blocks", []):
        if isinstance(block.moe, MoELayer) and not isinstance(block.moe, ExpertParallelMoE):
            block.moe = ExpertParallelMoE(block.moe, group)
    return model


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the sharded (per-rank) parameters: the routed experts of expert-parallel layers."""
    return {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()}


def gather_state_dict(model: nn.Module, group=None) -> dict[str, Tensor]:
    """The full (unsharded) state dict, on every rank: expert weights all-gathered in rank order."""
    state = {}
    for name, t in model.state_dict().items():
        state[name] = t
    for mod_name, m in model.named_modules():
        if isinstance(m, ExpertParallelMoE):
            for pname in ("w_in", "w_out"):
                local = getattr(m.experts, pname).detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(m.world)]
                dist.all_gather(parts, local, group=group)
                state[f"{mod_name}.experts.{pname}"] = torch.cat(parts)
    return state


def unshard_model(model: nn.Module, group=None) -> nn.Module:
    """A plain single-process copy of a sharded MoEGPT (every rank must call it)."""

    state = gather_state_dict(model, group)
    full = MoEGPT(model.config)
    full.load_state_dict(state)
    return full.to(next(model.parameters()).device)


def collect_stats(model: nn.Module) -> list[ExchangeStats]:
    return [b.moe.last_stats for b in model.blocks if isinstance(b.moe, ExpertParallelMoE)]


# ----------------------------------------------------------------------------- inference


@torch.no_grad()
def route_ids_parallel(model: nn.Module, ids: list[int], request: RoutingRequest, group=None):
    """`inference.route_ids` for a sharded model: windows are split over ranks in contiguous blocks.

    Windows keep their order (rank 0 the first ones), so the concatenated
    tokens, and with them the routing group, are those of the single process.
    Returns (routings of the whole text, mean next-token loss, per-layer ExchangeStats).
    """

    device = next(model.parameters()).device
    x, y, mask = windows(ids, model.config.block_size, device)
    p, r = dist.get_world_size(group), dist.get_rank(group)
    per = -(-x.shape[0] // p)                              # windows per rank (the last ranks may get fewer)
    sl = slice(r * per, (r + 1) * per)
    out = model(x[sl], y[sl] if len(ids) > 1 else None, mask=mask[sl], return_logits=False, request=request)
    routings = [rt.detach().apply(lambda t: t.cpu()) for rt in out.routings]
    loss = None
    if out.ce_loss is not None:
        # the mean over all targets = sum over ranks of (mean x count) / total count
        n = (y[sl] >= 0).sum().to(torch.float64)
        t = torch.stack([out.ce_loss.double() * n, n])
        dist.all_reduce(t, group=group)
        loss = (t[0] / t[1].clamp(min=1)).item()
    return routings, loss, collect_stats(model)


def _summary(stats: list[ExchangeStats], group=None) -> dict:
    """JSON block: placement, and per layer the traffic matrix, loads, drops; timings are the max over ranks."""
    layers = []
    for i, s in enumerate(stats):
        t = torch.tensor([s.exchange_s, s.expert_s], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        d = s.as_dict()
        d.update(layer=i, exchange_s=round(t[0].item(), 6), expert_s=round(t[1].item(), 6))
        layers.append(d)
    return {"world_size": dist.get_world_size(group), "backend": dist.get_backend(group),
            "placement": stats[0].placement if stats else [], "routing_group": "global (router logits all-gathered)",
            "layers": layers}


def route_text_parallel(model, text: str, *, scheme=None, top_k=None, capacity_factor=None, group=None):
    """`inference.route_text` with the experts spread over the ranks; returns a RouteResult on rank 0, None elsewhere.

    The result has the same routing, loss and JSON as the single-process one,
    plus an "expert_parallel" block (placement, traffic, loads, drops).
    """

    request = RoutingRequest.make(model.config, scheme, top_k, capacity_factor)
    tokens, _ = tokenize(text)
    sharded = shard_model(_copy_model(model.model), group)
    routings, loss, stats = route_ids_parallel(sharded, [t.id for t in tokens], request, group)
    summary = _summary(stats, group)
    if dist.get_rank(group) != 0:
        return None
    return ParallelRouteResult(tokens, routings, loss, request, False, len(tokens), params_of(model, request),
                               expert_parallel=summary)


def _copy_model(model):
    """A private copy to shard (loaded checkpoints are shared, read-only, per process)."""

    return copy.deepcopy(model)


@dataclass
class ParallelRouteResult(RouteResult):
    """A RouteResult plus what the expert-parallel run sent where."""

    expert_parallel: dict = field(default_factory=dict)

    def to_json(self, model) -> dict:
        d = super().to_json(model)
        d["expert_parallel"] = self.expert_parallel
        return d

    def traffic_table(self) -> str:
        ep = self.expert_parallel
        lines = [f"expert parallel: {ep['world_size']} processes ({ep['backend']}), experts per process: "
                 + "; ".join(f"rank {r}: {','.join(map(str, e))}" for r, e in enumerate(ep["placement"]))]
        for L in ep["layers"]:
            rows = ", ".join(f"{r}->[{' '.join(map(str, row))}]" for r, row in enumerate(L["traffic"]))
            lines.append(f"layer {L['layer']}: tokens sent rank->rank {rows}; computed per rank "
                         f"{L['load_per_rank']}; dropped per rank {L['dropped_per_rank']}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- training


def sync_gradients(model: nn.Module, group=None) -> None:
    """Make every gradient that of the MEAN loss over ranks.

    Replicated parameters: all-reduce and divide by P (data parallelism).
    Expert parameters: their gradient already sums every rank's loss (it came
    back through the all-to-all), so only divide by P.
    """
    p = dist.get_world_size(group)
    sharded = expert_parameters(model)
    replicated = [q for q in model.parameters() if q.grad is not None and id(q) not in sharded]
    if replicated:
        flat = torch.cat([q.grad.reshape(-1) for q in replicated])
        dist.all_reduce(flat, group=group)
        flat /= p
        for q, g in zip(replicated, flat.split([q.numel() for q in replicated])):
            q.grad.copy_(g.view_as(q.grad))
    for q in model.parameters():
        if id(q) in sharded and q.grad is not None:
            q.grad /= p


def clip_grad_norm(model: nn.Module, max_norm: float, group=None) -> float:
    """`torch.nn.utils.clip_grad_norm_` over the whole (sharded) model: the same norm and factor on every rank."""
    sharded = expert_parameters(model)
    params = [q for q in model.parameters() if q.grad is not None]
    dev = params[0].grad.device
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    rep = sum((q.grad.double().pow(2).sum() for q in params if id(q) not in sharded), zero)   # same on every rank
    exp = sum((q.grad.double().pow(2).sum() for q in params if id(q) in sharded), zero)       # this rank's experts
    dist.all_reduce(exp, group=group)
    norm = (rep + exp).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for q in params:
        q.grad.mul_(coef.to(q.grad.dtype))
    return norm.item()


def _rows_of(n: int, p: int, r: int) -> slice:
    per = -(-n // p)
    return slice(r * per, (r + 1) * per)


class ExpertParallelTrainer(Trainer):
    """The one training loop (`train.loop.Trainer`) with the experts spread over the ranks.

    Every rank builds the same initial model (same seed) and draws the same global batch; rank r trains
    on rows [r*B/P, (r+1)*B/P). Same data, same routing group and same loss as the single process: the
    replicated gradients are averaged, the norm is clipped over the whole model, and the losses and
    held-out evaluation are averaged over the ranks. `traffic[step]` = what each layer exchanged.
    """

    def __init__(self, model_cfg, cfg, *, data=None, group=None):
        self.group = group
        self.p, self.r = dist.get_world_size(group), dist.get_rank(group)
        check_expert_parallel(model_cfg.n_experts, self.p)
        if cfg.batch_size % self.p:
            raise ValueError(f"batch size {cfg.batch_size} must be divisible by the {self.p} processes")
        device = init(cfg.device)
        torch.manual_seed(cfg.seed)
        super().__init__(model_cfg, cfg, data=data, model=shard_model(MoEGPT(model_cfg).to(device), group))
        self.traffic = []

    def batch(self):
        x, y = super().batch()                                  # the global batch, on every rank
        rows = _rows_of(self.cfg.batch_size, self.p, self.r)
        return x[rows], y[rows]

    def clip_gradients(self) -> None:
        sync_gradients(self.model, self.group)
        clip_grad_norm(self.model, self.cfg.grad_clip, self.group)

    def losses(self, out) -> tuple[float, float]:
        self.traffic.append([s.traffic for s in collect_stats(self.model)])   # this step's, before any evaluation
        t = torch.tensor([out.loss.item(), out.ce_loss.item()], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return (t[0] / self.p).item(), (t[1] / self.p).item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """`inference.evaluate` for the sharded model: each 16-window batch is one routing group split over ranks."""
        model, batch_size = self.model, 16
        was = model.training
        model.eval()
        x, y = self.data.eval_windows(model.config.block_size, self.cfg.eval_batches * batch_size)
        total = torch.zeros(2, dtype=torch.float64)
        for xs, ys in zip(x.split(batch_size), y.split(batch_size)):
            sl = _rows_of(xs.shape[0], self.p, self.r)
            out = model(xs[sl].to(self.device), ys[sl].to(self.device), return_logits=False)
            total += torch.tensor([out.ce_loss.item() * ys[sl].numel(), ys[sl].numel()], dtype=torch.float64)
        dist.all_reduce(total, group=self.group)
        model.train(was)
        return (total[0] / total[1]).item()


def train_parallel(model_cfg, cfg, *, data=None, progress: bool = False, group=None):
    """`train.loop.train` with the experts spread over the ranks: (TrainResult with the sharded model,
    per-step traffic)."""
    trainer = ExpertParallelTrainer(model_cfg, cfg, data=data, group=group)
    result = train(model_cfg, cfg, trainer=trainer, progress=progress and trainer.r == 0)
    return result, trainer.traffic


def train_and_save_parallel(preset, model_cfg, cfg, out_dir, *, progress: bool = True, group=None):
    """`train.train_and_save` with expert parallelism: rank 0 gathers the experts and saves a normal checkpoint."""


    data = load_token_data()
    result, traffic = train_parallel(model_cfg, cfg, data=data, progress=progress, group=group)
    history, wall = result.history, result.wall_s
    full = unshard_model(result.model, group)
    p = dist.get_world_size(group)
    path = None
    if dist.get_rank(group) == 0:
        full.eval()
        tokens = len(history) * cfg.batch_size * model_cfg.block_size
        card = model_card(full, data)
        card.update({
            "corpus_hash": data.corpus_hash, "seed": cfg.seed, "steps": len(history), "tokens_seen": tokens,
            "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall) if wall > 0 else None,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, "
                       f"device {cfg.device}, expert parallel over {p} processes ({dist.get_backend(group)})",
            "final_train_loss": round(history[-1]["ce_loss"], 4) if history else None,
            "expert_parallel": {"world_size": p, "placement": expert_placement(model_cfg.n_experts, p),
                                "traffic_last_step": traffic[-1] if traffic else []},
        })
        recipe = {"preset": preset.name, "description": preset.description, "balancing": preset.balancing,
                  "order": preset.order, "train": asdict(cfg)}
        path = save(full, Path(out_dir) / preset.name, name=preset.name, recipe=recipe, card=card)
    dist.barrier(group)
    return path


# ----------------------------------------------------------------------------- launching from the CLI


def launch(argv: list[str], p: int, *, capture_stderr: bool = True, env: dict | None = None) -> int:
    """Run `python -m moe_core ARGV` under `torchrun --standalone --nproc-per-node P` and relay its output.

    Used by `moe-lab route/train --expert-parallel P` when not already under
    torchrun. Only rank 0 prints. With `capture_stderr`, a failure is reported
    as the processes' own one-line error instead of torchrun's report.
    """
    if p > MAX_LOCAL_PROCESSES:
        raise ValueError(f"--expert-parallel {p}: at most {MAX_LOCAL_PROCESSES} local processes "
                         f"(for more, run under torchrun across machines)")
    env = {**os.environ, **(env or {})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // p)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}",
           "-m", "moe_core", *argv]
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, text=True,
                          stderr=subprocess.PIPE if capture_stderr else None)
    if proc.returncode == 0:
        return 0
    if capture_stderr:
        ours = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith("moe-lab")]
        if ours:
            print(ours[0], file=sys.stderr)
            return 2 if ": error:" in ours[0] or "--help" in ours[0] else 1
        tail = (proc.stderr or "").strip().splitlines()
        print(f"moe-lab: expert-parallel run failed (torchrun exit {proc.returncode}): "
              f"{tail[-1] if tail else 'no output'}", file=sys.stderr)
    return 1


def check_devices(device: str, p: int) -> None:
    """On CUDA every process needs its own GPU (NCCL refuses two ranks on one device)."""

    if pick_device(device).type == "cuda" and not under_torchrun() and torch.cuda.device_count() < p:
        raise ValueError(f"--expert-parallel {p} on CUDA needs {p} GPUs (one per process), "
                         f"{torch.cuda.device_count()} visible; use --device cpu or a smaller P")


def check_launch(p: int) -> None:
    """Under torchrun, P must be the number of processes torchrun started."""
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) != p:
        raise ValueError(f"--expert-parallel {p} does not match torchrun's {os.environ['WORLD_SIZE']} processes "
                         f"(--nproc-per-node)")


def route_argv(args, model_name: str, device: str) -> list[str]:
    """The `moe-lab route` command line each torchrun process runs (the text is in TEXT_FILE_ENV's file)."""
    argv = ["route", "--expert-parallel", str(args.expert_parallel), "--model", model_name, "--device", device]
    for flag, v in (("--top-k", args.top_k), ("--scheme", args.scheme), ("--capacity-factor", args.capacity_factor),
                    ("--seed", args.seed)):
        if v is not None:
            argv += [flag, str(v)]
    if args.json:
        argv.append("--json")
    return argv + ["--", "(text read from $" + TEXT_FILE_ENV + ")"]


def train_argv(args) -> list[str]:
    argv = ["train", "--preset", args.preset, "--expert-parallel", str(args.expert_parallel), "--device", args.device]
    for flag, v in (("--steps", args.steps), ("--seed", args.seed), ("--out", args.out), ("--threads", args.threads)):
        if v is not None:
            argv += [flag, str(v)]
    if args.quiet:
        argv.append("--quiet")
    return argv


def cmd_route(args, text: str, model_name: str, route_table) -> int:
    """`moe-lab route --expert-parallel P`: validate, launch torchrun if needed, route, print on rank 0."""

    p = args.expert_parallel
    configs = {d["name"]: d["config"] for d in list_checkpoints()}
    if model_name not in configs:
        raise ValueError(f"unknown model {model_name!r}; choose one of: {', '.join(configs)}")

    config = MoEConfig.from_dict(configs[model_name])
    check_expert_parallel(config.n_experts, p)
    RoutingRequest.make(config, args.scheme, args.top_k, args.capacity_factor)   # bad options fail here, once
    if under_torchrun() and os.environ.get(TEXT_FILE_ENV):
        text = Path(os.environ[TEXT_FILE_ENV]).read_text(encoding="utf-8")
    if not text:
        raise ValueError("the text is empty: type or paste something to route")
    device = pick_device(args.device)
    check_devices(args.device, p)
    if not under_torchrun():

        tokenize(text)                                   # too long: fails here, before launching
        # the text travels in a private temporary file, not on the command line (size limits, stdin)
        with tempfile.TemporaryDirectory(prefix="moe-lab-ep-") as tmp:
            path = Path(tmp) / "text.txt"
            path.write_text(text, encoding="utf-8")
            return launch(route_argv(args, model_name, device.type), p, env={TEXT_FILE_ENV: str(path)})
    check_launch(p)
    try:
        dev = init(device.type)
        model = load(model_name, device=dev)
        torch.manual_seed(args.seed or 0)     # every rank draws the same random routing
        res = route_text_parallel(model, text, scheme=args.scheme, top_k=args.top_k,
                                  capacity_factor=args.capacity_factor)
        if res is not None:
            print(trace_json(res, model) if args.json else route_table(res, model) + "\n" + res.traffic_table())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_train(args, model_cfg, train_cfg, preset, out_dir) -> int:
    """`moe-lab train --expert-parallel P`: validate, launch torchrun if needed, train, save on rank 0."""
    p = args.expert_parallel
    check_expert_parallel(model_cfg.n_experts, p)
    if train_cfg.batch_size % p:
        raise ValueError(f"--expert-parallel {p} must divide the batch size {train_cfg.batch_size} "
                         f"(each process trains on batch/P sequences)")
    check_devices(train_cfg.device, p)
    if not under_torchrun():
        return launch(train_argv(args), p, capture_stderr=False)
    check_launch(p)
    try:
        init(train_cfg.device)
        path = train_and_save_parallel(preset, model_cfg, train_cfg, out_dir, progress=not args.quiet)
        if rank() == 0:
            print(f"saved {path}.safetensors and {path}.json (trained on {p} expert-parallel processes)")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- recording a run for the dashboard


def record(model_name: str, out: str, *, n_tokens: int = 4096, scheme=None, top_k=None, capacity_factor=None,
           device: str = "cpu") -> dict | None:
    """Route the first `n_tokens` held-out corpus tokens through a shipped model with expert parallelism.

    Run under torchrun (`python -m torch.distributed.run --standalone
    --nproc-per-node P -m moe_core.parallel.expert_parallel record --model NAME --out FILE`).
    Rank 0 writes the JSON the dashboard's parallelism view reads: placement,
    per-layer traffic matrix, load and drops per rank, timings, and where the
    numbers come from.
    """


    dev = init(device)
    model = load(model_name, device=dev)
    p = check_expert_parallel(model.config.n_experts, world_size())
    scheme_arg = scheme
    request = RoutingRequest.make(model.config, scheme, top_k, capacity_factor)
    ids = load_token_data().splits["eval"][:n_tokens].tolist()
    sharded = shard_model(_copy_model(model.model))
    t0 = time.perf_counter()
    routings, loss, stats = route_ids_parallel(sharded, ids, request)
    wall = time.perf_counter() - t0
    summary = _summary(stats)
    if rank() != 0:
        return None
    doc = {
        "format": "moe-router-lab/parallel-run/1",
        "model": model.info(), "scheme": request.scheme, "top_k": request.top_k,
        "capacity_factor": request.capacity_factor,
        "n_tokens": len(ids), "text": "the first held-out (eval split) corpus tokens", "loss": loss,
        "wall_s": round(wall, 4), **summary,
        "capacity": [rt.capacity for rt in routings],
        "drop_rate": [balance_metrics(rt)["drop_rate"] for rt in routings],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, "
                   f"{p} processes on {dev.type}",
        "command": " ".join(
            ["python -m torch.distributed.run --standalone", f"--nproc-per-node {p}", "-m moe_core.parallel.expert_parallel record",
             f"--model {model_name}", f"--tokens {n_tokens}"]
            + [f"{flag} {v}" for flag, v in (("--scheme", scheme_arg), ("--top-k", top_k),
                                               ("--capacity-factor", capacity_factor)) if v is not None]
            + [f"--out {out}"]),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


def main(argv: list[str] | None = None) -> int:

    ap = argparse.ArgumentParser(prog="python -m moe_core.parallel.expert_parallel",
                                 description="record an expert-parallel run for the dashboard (run under torchrun)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("record")
    q.add_argument("--model", default="moe-n8-switch")
    q.add_argument("--out", required=True)
    q.add_argument("--tokens", type=int, default=4096)
    q.add_argument("--scheme")
    q.add_argument("--top-k", type=int)
    q.add_argument("--capacity-factor", type=float)
    q.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if not under_torchrun():
        print("run this under torchrun: python -m torch.distributed.run --standalone --nproc-per-node P "
              "-m moe_core.parallel.expert_parallel record ...", file=sys.stderr)
        return 2
    try:
        record(args.model, args.out, n_tokens=args.tokens, scheme=args.scheme, top_k=args.top_k,
               capacity_factor=args.capacity_factor, device=args.device)
    except ValueError as e:
        print(f"moe-lab: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
