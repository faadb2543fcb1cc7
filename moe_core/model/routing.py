"""The routing zoo: one function per routing scheme, all returning the same `Routing`.

Every function takes the router logits of ONE routing group, shape [T, N]
(T tokens, N experts), and decides which experts process which token and with
what weight. The dashboard, the CLI and the training loss all read the same
`Routing` object, so what a student sees is exactly what the model computed.

Conventions shared by every scheme (see docs/routing-reference in the shared
notes for how real implementations differ, and the docstrings below for which
one we follow):

- Scores are computed in float32, whatever the dtype of the logits.
- Ties are broken towards the LOWEST expert index (and, where a scheme ranks
  tokens, the lowest token index), every time. `torch.topk` leaves tie order
  unspecified, so we use `_topk_lowest_index`.
- Capacity, when a scheme has one, is `ceil(capacity_factor * T / N)` slots
  per expert unless an absolute `capacity` is given (see `expert_capacity`).
- `aux["load_balance"]` is always N * sum_e f_e * P_e, where f_e is the share
  of the router's (pre-capacity) choices that went to expert e and P_e the
  mean router score of expert e. It is 1.0 for a perfectly uniform router and
  N when everything collapses onto one expert, for any k. (HF Mixtral's loss
  counts all k choices without dividing by k, so it reads k times ours.)
- `aux["z_loss"]` is the ST-MoE router z-loss of the raw logits.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class _DenseView:
    """A [T, N] field of `Routing` that a scheme may leave as None: it is then built on first use
    from the sparse record (indices, weights, choices), which is all the layer's forward pass
    reads. The dashboard, the metrics and the exports read the dense views; building them in
    every forward cost the MoE layer ~2 ms per pass at N = 256 (three [8192, 256] tensors
    zero-filled and scattered into), for nothing."""

    def __init__(self, build: Callable[["Routing"], Tensor]):
        self.build = build

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:                     # on the class: no default value (dataclass asks)
            raise AttributeError(self.slot[1:])
        value = obj.__dict__.get(self.slot)
        if value is None:
            value = obj.__dict__[self.slot] = self.build(obj)
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class Routing:
    """What a router decided for one group of T tokens over N experts.

    combine, dispatch and dropped may be passed as None: they are then derived from
    indices, weights and choices the first time they are read (see _DenseView)."""

    scheme: str
    combine: Tensor    # [T, N] float: weight of expert e in token t's output (0 if not routed or dropped)
    dispatch: Tensor   # [T, N] bool: expert e really processes token t
    indices: Tensor    # [T, kmax] long: experts that process token t, in rank order, padded with -1
    weights: Tensor    # [T, kmax] float: their combine weights, padded with 0
    probs: Tensor      # [T, N] float: the scores the router computed (softmax or sigmoid)
    dropped: Tensor    # [T, N] bool: chosen by the router but cut by expert capacity
    capacity: int | None  # slots per expert, or None for dropless schemes
    aux: dict[str, Tensor] = field(default_factory=dict)  # named loss terms (scalars)
    choices: Tensor | None = None  # [T, kmax] long: the router's choices BEFORE capacity, rank order, -1 padded
    logits: Tensor | None = None   # [T, N] the raw router logits

    combine = _DenseView(lambda r: _combine(r.indices, r.weights, r.n_experts))       # noqa: F811
    dispatch = _DenseView(lambda r: _choice_mask(r.indices, r.n_experts))            # noqa: F811
    dropped = _DenseView(lambda r: _choice_mask(r.choices, r.n_experts) & ~r.dispatch  # noqa: F811
                         if r.choices is not None else torch.zeros_like(r.dispatch))

    @property
    def n_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def n_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def load(self) -> Tensor:
        """Tokens processed by each expert, [N] long."""
        idx = self.indices.reshape(-1)
        return torch.bincount(idx[idx >= 0], minlength=self.n_experts)

    @property
    def top1(self) -> Tensor:
        """The router's first choice per token (before capacity), -1 if none."""
        return self.choices[:, 0]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "Routing":
        """A copy with `fn` applied to every tensor (e.g. detach, cpu)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = fn(v)
            elif isinstance(v, dict):
                v = {name: fn(t) for name, t in v.items()}
            out[f.name] = v
        return Routing(**out)

    def detach(self) -> "Routing":
        return self.apply(lambda t: t.detach())

    @staticmethod
    def cat(parts: list["Routing"]) -> "Routing":
        """Concatenate the routing of consecutive token groups (aux terms averaged)."""
        if len(parts) == 1:
            return parts[0]
        kmax = max(p.indices.shape[1] for p in parts)

        def pad(t: Tensor, value) -> Tensor:
            return F.pad(t, (0, kmax - t.shape[1]), value=value)

        caps = {p.capacity for p in parts}
        return Routing(
            scheme=parts[0].scheme,
            combine=torch.cat([p.combine for p in parts]),
            dispatch=torch.cat([p.dispatch for p in parts]),
            indices=torch.cat([pad(p.indices, -1) for p in parts]),
            weights=torch.cat([pad(p.weights, 0.0) for p in parts]),
            probs=torch.cat([p.probs for p in parts]),
            dropped=torch.cat([p.dropped for p in parts]),
            capacity=caps.pop() if len(caps) == 1 else max(c for c in caps if c is not None),
            aux={k: torch.stack([p.aux[k] for p in parts]).mean() for k in parts[0].aux},
            choices=torch.cat([pad(p.choices, -1) for p in parts]),
            logits=torch.cat([p.logits for p in parts]),
        )


# ----------------------------------------------------------------------------- checks
# Each public argument is checked once, where it enters (the scheme that uses it, `route`, `expert_capacity`),
# by one of the small helpers below: bad input raises ValueError with a sentence saying what was expected.

LOGIT_LIMIT = 1e18        # larger router logits overflow float32 in the z-loss (logsumexp^2 > 3.4e38)
MAX_CAPACITY_FACTOR = 64  # cf * T / N stays a countable number of slots (RoutingRequest uses the same bound)
_MAX_COUNT = 10**15       # token and slot counts: exact in float64 (expert_capacity), and fit a torch long


def _whole(name: str, v, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        within = f">= {lo}" if hi is None else f"from {lo} to {hi:g}"
        raise ValueError(f"{name} must be a whole number {within}, got {v!r}")
    return v


def _number(name: str, v, *, zero_ok: bool = False, hi: float = math.inf) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)
    if not ok or not (v >= 0 if zero_ok else v > 0) or v > hi:
        most = f" (at most {hi:g})" if hi < math.inf else ""
        raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} number{most}, got {v!r}")
    return float(v)


def _flag(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return bool(v)


def _generator(g) -> torch.Generator | None:
    if g is not None and not isinstance(g, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(g).__name__}")
    return g


def _values(name: str, t, shape: tuple | None = None) -> Tensor:
    """`t` if it is a floating-point tensor with values (not a meta tensor) of `shape`, all of them finite and
    at most LOGIT_LIMIT in size; otherwise a ValueError that says which. One pass over t (aminmax)."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.is_meta:
        got = type(t).__name__ if not isinstance(t, Tensor) else "a meta tensor (no values)" if t.is_meta else t.dtype
        raise ValueError(f"{name} must be a floating-point tensor with values, got {got}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.numel():
        lo, hi = torch.aminmax(t.detach())
        size = float(torch.maximum(-lo, hi))               # NaN if any value is NaN
        if not math.isfinite(size):
            raise ValueError(f"{name} contain NaN or infinity: the weights or inputs that made them hold NaN or "
                             f"infinity, or values beyond float32's range (3.4e38)")
        if size > LOGIT_LIMIT:
            raise ValueError(f"{name} reach {size:.3g}: routing computes in float32 and needs them below "
                             f"{LOGIT_LIMIT:g} in size; the weights or inputs that made them are far too large")
    return t


def _check_logits(logits: Tensor) -> Tensor:
    """The router logits [T, N], checked, in float32: every scheme computes in float32 (in float16 a
    sigmoid or softmax of ordinary logits underflows to 0 and the weights become 0 / 0)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"router logits must be a 2-D tensor [tokens, experts], got {shape}")
    T, N = logits.shape
    if N < 1:
        raise ValueError("a mixture of experts needs at least 1 expert (N >= 1), got N = 0")
    if T < 1:
        raise ValueError("there are no tokens to route (T = 0)")
    return _values("router logits", logits).float()


def _check_k(k, n_experts: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"top-k must be a whole number, got {k!r}")
    if k < 1:
        raise ValueError(f"top-k must be at least 1: every token needs at least one expert (got k = {k})")
    if k > n_experts:
        raise ValueError(
            f"top-k = {k} is larger than the number of experts N = {n_experts}: "
            f"a token cannot pick more experts than exist"
        )
    return k


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float = 1.0) -> int:
    """Slots per expert: ceil(capacity_factor * T / N), at least 1.

    With capacity_factor = 1.0 and T divisible by N, each expert can hold exactly
    its fair share of tokens. (fairseq uses int(cf * ceil(T/N)), flaxformer
    round(cf * T/N) with a minimum of 4; we keep the plain ceiling so a student
    can check the number by hand.)
    """
    n_tokens = _whole("the number of tokens", n_tokens, 0, _MAX_COUNT)
    n_experts = _whole("the number of experts", n_experts, 1, _MAX_COUNT)
    capacity_factor = _number("capacity factor", capacity_factor, hi=MAX_CAPACITY_FACTOR)
    # round away float noise first so that e.g. 1.1 * 10 / 1 gives 11, not 12
    return max(1, math.ceil(round(capacity_factor * n_tokens / n_experts, 9)))


def _resolve_capacity(capacity, capacity_factor, n_tokens: int, n_experts: int) -> int:
    if capacity is None:
        return expert_capacity(n_tokens, n_experts, capacity_factor)
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise ValueError(f"capacity must be a whole number of token slots, got {capacity!r}")
    if not 1 <= capacity <= _MAX_COUNT:
        raise ValueError(f"capacity must be at least 1 token slot per expert (and at most {_MAX_COUNT:g}), got {capacity}")
    return capacity


# ----------------------------------------------------------------------------- helpers


def _topk_lowest_index(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim, ties broken towards the lowest index.

    `torch.topk` is fast but its tie order is unspecified. We take its k-th
    value as a threshold, select everything strictly above it plus the
    lowest-indexed entries equal to it, then order the k winners by value with
    a stable sort (so equal values stay in index order).
    """
    R, N = scores.shape
    if k == N:
        sel_idx = torch.arange(N, device=scores.device).expand(R, N)
    else:
        with torch.no_grad():
            top_v, top_i = scores.topk(k + 1, dim=-1)        # k < N here
            if bool((top_v[:, k - 1] > top_v[:, k]).all()):
                # the usual case: in every row the k-th value beats the (k+1)-th, so the k winners
                # are exactly torch.topk's (no pass over the whole [R, N] scores for ties)
                sel_idx = top_i[:, :k].sort(dim=-1).values
            else:
                thr = top_v[:, k - 1 : k]
                above = scores > thr
                tied = scores == thr
                need = k - above.sum(-1, keepdim=True)
                take_tied = tied & (tied.cumsum(-1) <= need)
                sel = above | take_tied
                sel_idx = sel.nonzero()[:, 1].view(R, k)  # ascending expert index in each row
    vals = scores.gather(-1, sel_idx)
    order = torch.sort(vals.detach(), dim=-1, descending=True, stable=True).indices
    return vals.gather(-1, order), sel_idx.gather(-1, order)


def _first_argmax(scores: Tensor) -> Tensor:
    """argmax along the last dim; torch.argmax returns the first maximal index."""
    return scores.argmax(dim=-1)


def _compact(choices: Tensor, keep: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Move kept (choice, value) pairs to the front of each row, keeping rank order.

    Returns (indices, weights) padded with -1 / 0 where a choice was not kept.
    """
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    keep = keep.gather(-1, order)
    idx = torch.where(keep, choices.gather(-1, order), -1)
    w = torch.where(keep, values.gather(-1, order), torch.zeros_like(values))
    return idx, w


def _combine(indices: Tensor, weights: Tensor, n_experts: int) -> Tensor:
    """[T, kmax] (index, weight) pairs -> dense combine weights [T, N].

    Padding is index -1 with weight 0 (Routing's weights are padded with 0): it adds 0 to column 0."""
    combine = torch.zeros(indices.shape[0], n_experts, dtype=weights.dtype, device=weights.device)
    return combine.scatter_add_(1, indices.clamp(min=0), weights)


def _choice_mask(choices: Tensor, n_experts: int) -> Tensor:
    """[T, kmax] choices (-1 padded) -> [T, N] bool mask of chosen experts."""
    if bool((choices >= 0).all()):                        # no padding: scatter straight into [T, N]
        return torch.zeros(choices.shape[0], n_experts, dtype=torch.bool,
                           device=choices.device).scatter_(1, choices, True)
    # padding goes to an extra column that is cut off: one bool scatter, no [T, N] long buffer
    mask = torch.zeros(choices.shape[0], n_experts + 1, dtype=torch.bool, device=choices.device)
    mask.scatter_(1, torch.where(choices >= 0, choices, n_experts), True)
    return mask[:, :n_experts].contiguous()


def load_balance_loss(probs: Tensor, chosen: Tensor) -> Tensor:
    """N * sum_e f_e * P_e  (Switch Transformer eq. 4, Fedus et al. 2021).

    f_e: share of the router's choices (a [T, N] 0/1 mask, any number per token)
    that picked expert e; P_e: mean router score of expert e. Minimised (= 1)
    by a uniform router, equal to N when every token goes to one expert.
    """
    return _load_balance(probs, chosen.sum(0, dtype=probs.dtype))


def _load_balance(probs: Tensor, counts: Tensor) -> Tensor:
    """`load_balance_loss` from the number of choices per expert [N] (cheaper than a [T, N] mask)."""
    N = probs.shape[1]
    f = counts / counts.sum().clamp(min=1.0)
    P = probs.mean(0)
    return N * (f * P).sum()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.

    It keeps router logits small, which makes the softmax numerically stable in
    low precision; computed on the raw logits, not on probabilities.
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def _z_loss_from_top(logits: Tensor, p_top: Tensor, i_top: Tensor) -> Tensor:
    """z_loss(logits) from the softmax the scheme already computed, without a second exp pass.

    p_top [T, 1] = softmax(l_t) at the token's most probable expert i_top [T, 1]:
    p_top = exp(l_top - logsumexp(l_t)), so logsumexp(l_t) = l_top - log p_top. As
    p_top >= 1/N its log is as exact as float32 allows, and the gradient is the same
    (d/dl [l_top - log softmax(l)_top] = softmax(l)).
    """
    lse = logits.float().gather(1, i_top) - p_top.log()
    return lse.square().mean()


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, population variance (tensor2tensor `cv_squared`)."""
    x = x.float()
    if x.numel() <= 1:
        return torch.zeros((), device=x.device)
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


def _finish(scheme, probs, logits, choices, keep, choice_weights, capacity, aux) -> Routing:
    """Build a Routing from rank-ordered choices [T, kmax], which were kept, and their weights.

    The dense views (combine, dispatch, dropped) are left to Routing to build if they are read.
    """
    if bool(keep.all()):                   # nothing dropped (dropless schemes, or capacity to spare)
        indices, weights = choices, torch.where(choices >= 0, choice_weights, torch.zeros_like(choice_weights))
    else:
        indices, weights = _compact(choices, keep, choice_weights)
    if "z_loss" not in aux:                # (not setdefault: that would compute it every time)
        aux["z_loss"] = z_loss(logits)
    return Routing(
        scheme=scheme, combine=None, dispatch=None, indices=indices, weights=weights,
        probs=probs, dropped=None, capacity=capacity, aux=aux, choices=choices, logits=logits,
    )


def _slots(mask_in_priority_order: Tensor, offset: Tensor | None = None) -> Tensor:
    """Slot position of each assignment: running count per expert, 0-based (GShard `loc`)."""
    loc = mask_in_priority_order.long().cumsum(0) - 1
    if offset is not None:
        loc = loc + offset
    return loc


# ----------------------------------------------------------------------------- schemes


def softmax_topk(logits: Tensor, k: int, *, normalize: bool = True) -> Routing:
    """Softmax top-k routing: each token picks its k most probable experts.

    p_t = softmax(l_t);  S_t = TopK(p_t, k);  w_{t,e} = p_{t,e} / sum_{j in S_t} p_{t,j}

    Mixtral of Experts (Jiang et al. 2024, arXiv:2401.04088) always renormalises
    over the k picks (`normalize=True`); Qwen-MoE / OLMoE (Muennighoff et al.
    2024, arXiv:2409.02060) use the raw probabilities (`norm_topk_prob=False`,
    here `normalize=False`). Dropless: no capacity, nothing is dropped.
    `aux["load_balance"]` counts all k choices (f sums to 1 over the k*T picks).
    """
    logits = _check_logits(logits)
    T, N = logits.shape
    k = _check_k(k, N)
    normalize = _flag("normalize", normalize)
    probs = logits.float().softmax(dim=-1)
    top_p, top_i = _topk_lowest_index(probs, k)
    weights = top_p / top_p.sum(-1, keepdim=True) if normalize else top_p
    counts = torch.bincount(top_i.reshape(-1), minlength=N).to(probs.dtype)
    aux = {"load_balance": _load_balance(probs, counts), "z_loss": _z_loss_from_top(logits, top_p[:, :1], top_i[:, :1])}
    keep = torch.ones_like(top_i, dtype=torch.bool)
    return _finish("softmax_topk", probs, logits, top_i, keep, weights, None, aux)


def noisy_topk(
    logits: Tensor,
    k: int,
    *,
    noise_logits: Tensor | None = None,
    generator: torch.Generator | None = None,
    training: bool = False,
    noise_epsilon: float = 1e-2,
) -> Routing:
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", arXiv:1701.06538).

    H = l + N(0, 1) * softplus(noise_logits)  (noise only while training);
    the k largest H are kept and softmaxed, the rest get weight 0.

    We follow tensor2tensor's `noisy_top_k_gating` (the canonical code):
    sigma = softplus(noise_logits) + 1e-2; the weights are the softmax over the
    top-k noisy logits (= renormalised top-k of softmax(H)); and two CV^2 losses:
    `aux["cv_importance"]` = CV^2(sum_t G_t) and `aux["cv_load"]` = CV^2 of the
    smooth load estimator sum_t Phi((l_te - threshold_te) / sigma_te), where the
    threshold is the k-th largest noisy value among the OTHER experts. Without
    noise (evaluation, or `noise_logits=None`) the load is the plain token count
    and the scheme is exactly softmax top-k. `probs` is softmax(H).
    """
    logits = _check_logits(logits)
    T, N = logits.shape
    k = _check_k(k, N)
    training, noise_epsilon = _flag("training", training), _number("noise_epsilon", noise_epsilon)
    generator = _generator(generator)
    clean = logits.float()
    sigma = None
    if training and noise_logits is not None:
        _values("noise logits", noise_logits, logits.shape)
        sigma = F.softplus(noise_logits.float()) + noise_epsilon
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
        noisy = clean + noise * sigma
    else:
        noisy = clean
    probs = noisy.softmax(dim=-1)
    top_p, top_i = _topk_lowest_index(probs, k)
    weights = top_p / top_p.sum(-1, keepdim=True)
    chosen = _choice_mask(top_i, N)

    importance = torch.zeros(T, N, device=clean.device).scatter(1, top_i, weights).sum(0)
    if sigma is not None and k < N:
        top_noisy = noisy.topk(k + 1, dim=-1).values        # [T, k+1]
        thr_if_in = top_noisy[:, k : k + 1]                 # e in top-k: the (k+1)-th value decides
        thr_if_out = top_noisy[:, k - 1 : k]                # e outside: it must beat the k-th value
        thr = torch.where(chosen, thr_if_in, thr_if_out)
        normal = torch.distributions.Normal(0.0, 1.0)
        load = normal.cdf((clean - thr) / sigma).sum(0)
    else:
        load = chosen.float().sum(0)
    aux = {
        "load_balance": load_balance_loss(probs, chosen),
        "cv_importance": cv_squared(importance),
        "cv_load": cv_squared(load),
    }
    keep = torch.ones_like(top_i, dtype=torch.bool)
    return _finish("noisy_topk", probs, logits, top_i, keep, weights, None, aux)


def switch(logits: Tensor, *, capacity: int | None = None, capacity_factor: float = 1.0) -> Routing:
    """Switch Transformer top-1 routing with expert capacity (Fedus et al. 2021, arXiv:2101.03961).

    Each token goes to its single most probable expert, weighted by that raw
    probability (no renormalisation). Each expert holds `capacity` tokens; the
    tokens beyond it are DROPPED in token order (earlier tokens win, as in HF
    SwitchTransformers and fairseq Top1Gate) and pass through the layer only via
    the residual connection. `aux["load_balance"]` = N * sum_e f_e * P_e with f
    from the pre-capacity choice (the paper's eq. 4 with alpha left to the trainer).
    """
    logits = _check_logits(logits)
    T, N = logits.shape
    C = _resolve_capacity(capacity, capacity_factor, T, N)
    probs = logits.float().softmax(dim=-1)
    e1 = _first_argmax(probs)
    mask1 = F.one_hot(e1, N).bool()
    loc = _slots(mask1).gather(1, e1[:, None])  # [T, 1]
    keep = loc < C
    gate = probs.gather(1, e1[:, None])
    aux = {"load_balance": load_balance_loss(probs, mask1), "z_loss": _z_loss_from_top(logits, gate, e1[:, None])}
    return _finish("switch", probs, logits, e1[:, None], keep, gate, C, aux)


SECOND_POLICIES = ("all", "random", "sampling")


def gshard(
    logits: Tensor,
    *,
    capacity: int | None = None,
    capacity_factor: float = 2.0,
    second_policy: str = "all",
    batch_prioritized: bool = False,
    generator: torch.Generator | None = None,
) -> Routing:
    """GShard top-2 gating (Lepikhin et al. 2020, arXiv:2006.16668), following fairseq `top2gating`.

    - first expert e1 = argmax p; second expert e2 = argmax over the others:
      "all" always dispatches e2; "random" dispatches it with probability 2*p_e2
      (the paper's stochastic second expert); "sampling" picks e2 as the argmax
      of logits + Gumbel noise (fairseq's default policy).
    - Slots: ALL first choices claim expert slots before ANY second choice;
      within a rank, in token order (or, with `batch_prioritized`, in order of
      descending top-1 probability: Riquelme et al. 2021 BPR). Choices beyond
      `capacity` are dropped.
    - Weights are renormalised AFTER dropping (fairseq default): w1 = p1/(p1+p2)
      when both survive, 1.0 for the survivor when one is dropped.
    - `aux["load_balance"]` uses the first choices only, pre-capacity (fairseq
      l_aux = E^2 * mean(me * ce) = N * sum_e f_e P_e).
    Default capacity = ceil(2.0 * T / N) (fairseq: 2 * ceil(T / N)).
    """
    logits = _check_logits(logits)
    T, N = logits.shape
    if N < 2:
        raise ValueError("GShard top-2 routing needs at least 2 experts (N >= 2)")
    if second_policy not in SECOND_POLICIES:
        raise ValueError(f"unknown second_policy {second_policy!r}; choose one of: {', '.join(SECOND_POLICIES)}")
    batch_prioritized, generator = _flag("batch_prioritized", batch_prioritized), _generator(generator)
    C = _resolve_capacity(capacity, capacity_factor, T, N)
    logits32 = logits.float()
    probs = logits32.softmax(dim=-1)
    e1 = _first_argmax(probs)
    mask1 = F.one_hot(e1, N).bool()
    others = logits32.detach().masked_fill(mask1, float("-inf"))
    if second_policy == "sampling":
        u = torch.rand(others.shape, generator=generator, device=others.device).clamp(1e-9, 1 - 1e-9)
        others = others - torch.log(-torch.log(u))  # + Gumbel(0, 1)
    e2 = _first_argmax(others)
    g1 = probs.gather(1, e1[:, None])
    g2 = probs.gather(1, e2[:, None])
    use2 = torch.ones(T, 1, dtype=torch.bool, device=logits.device)
    if second_policy == "random":
        u = torch.rand(T, 1, generator=generator, device=logits.device)
        use2 = (2 * g2.detach()) > u
    mask2 = F.one_hot(e2, N).bool() & use2

    order = torch.arange(T, device=logits.device)
    if batch_prioritized:
        order = torch.sort(-g1.detach().squeeze(1), stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(T, device=logits.device)
    loc1 = _slots(mask1[order])[inverse].gather(1, e1[:, None])
    loc2 = _slots(mask2[order], offset=mask1.sum(0))[inverse].gather(1, e2[:, None])
    keep1 = loc1 < C
    keep2 = (loc2 < C) & use2

    d1 = g1 * keep1
    d2 = g2 * keep2
    denom = (d1 + d2).clamp(min=torch.finfo(torch.float32).eps)
    choices = torch.cat([e1[:, None], torch.where(use2, e2[:, None], -1)], dim=1)
    keep = torch.cat([keep1, keep2], dim=1)
    w = torch.cat([d1 / denom, d2 / denom], dim=1)
    aux = {"load_balance": load_balance_loss(probs, mask1), "z_loss": _z_loss_from_top(logits, g1, e1[:, None])}
    return _finish("gshard", probs, logits, choices, keep, w, C, aux)


def expert_choice(logits: Tensor, *, capacity: int | None = None, capacity_factor: float = 1.0) -> Routing:
    """Expert Choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", arXiv:2202.09368).

    The experts choose: p = softmax over experts for each token, then every
    expert takes the `capacity` tokens with the highest p[:, e] (ties: lower
    token index). Load is perfectly balanced by construction, but a token may
    be taken by several experts or by none (it then passes only through the
    residual). Following flaxformer's ExpertsChooseMaskedRouter the weights are
    the raw probabilities (no per-token renormalisation) and there is no
    balancing loss: `aux["load_balance"]` is reported for comparison and is
    constant (every expert holds exactly C tokens). Default capacity
    ceil(capacity_factor * T / N), so capacity_factor = average experts per
    token; clamped to T. NOT causal: a token's experts depend on all other
    tokens of the group, including later ones.
    """
    logits = _check_logits(logits)
    T, N = logits.shape
    C = min(_resolve_capacity(capacity, capacity_factor, T, N), T)
    probs = logits.float().softmax(dim=-1)
    _, tok = _topk_lowest_index(probs.t(), C)  # [N, C]: each expert's tokens
    dispatch = torch.zeros(N, T, dtype=torch.bool, device=logits.device)
    dispatch = dispatch.scatter(1, tok, True).t()  # [T, N]
    # per-token rank order: experts that took the token, most probable first
    kmax = max(1, int(dispatch.sum(1).max()))
    ranked = probs.detach().masked_fill(~dispatch, -1.0)
    _, choices = _topk_lowest_index(ranked, kmax)
    keep = dispatch.gather(1, choices)
    choices = torch.where(keep, choices, -1)
    w = probs.gather(1, choices.clamp(min=0))
    aux = {
        "load_balance": load_balance_loss(probs, dispatch),
        "unrouted": (~dispatch.any(1)).float().mean(),
    }
    return _finish("expert_choice", probs, logits, choices, keep, w, C, aux)


def _balanced_assignment(scores, lo: int, hi: int):
    """argmax over assignments of sum_t scores[t, e_t], each expert taking lo..hi tokens.

    A transportation problem: its linear-programming relaxation has an integral
    optimum (the constraint matrix is totally unimodular), so scipy's HiGHS
    simplex solves it exactly, in ~0.3 s for 4096 tokens x 8 experts, where a
    token-by-slot `linear_sum_assignment` needs minutes. If the solver ever
    returns a fractional vertex, we fall back to linear_sum_assignment.
    """
    # scipy (about 0.3 s to import) is deferred on purpose: only BASE routing needs it
    from scipy import sparse
    from scipy.optimize import linear_sum_assignment, linprog

    T, N = scores.shape
    per_token = sparse.kron(sparse.identity(T), np.ones((1, N)), format="csr")   # each token: one expert
    per_expert = sparse.kron(np.ones((1, T)), sparse.identity(N), format="csr")  # each expert: lo..hi tokens
    res = linprog(-scores.ravel(), A_eq=per_token, b_eq=np.ones(T),
                  A_ub=sparse.vstack([per_expert, -per_expert]),
                  b_ub=np.concatenate([np.full(N, hi), np.full(N, -lo)]), bounds=(0, 1), method="highs")
    if res.status == 0:
        x = res.x.reshape(T, N)
        if np.abs(x - np.round(x)).max() < 1e-6:
            return x.argmax(axis=1)
    # exact fallback: `lo` mandatory slots per expert, plus an optional one when hi > lo
    slot_expert = np.repeat(np.arange(N), lo)
    mandatory = np.ones(slot_expert.shape[0], dtype=bool)
    if hi > lo:
        slot_expert = np.concatenate([slot_expert, np.arange(N)])
        mandatory = np.concatenate([mandatory, np.zeros(N, dtype=bool)])
    cost = -scores[:, slot_expert]
    n_dummy = len(slot_expert) - T      # dummy rows soak up the unused optional slots
    if n_dummy:
        cost = np.concatenate([cost, np.where(mandatory, np.inf, 0.0)[None, :].repeat(n_dummy, axis=0)], axis=0)
    rows, cols = linear_sum_assignment(cost)
    real = rows < T
    assigned = np.empty(T, dtype=np.int64)
    assigned[rows[real]] = slot_expert[cols[real]]
    return assigned


def base(logits: Tensor) -> Routing:
    """BASE layers: an exactly balanced token-to-expert assignment (Lewis et al. 2021, arXiv:2103.16716).

    Tokens are assigned so that the total router score sum_t l_{t, e_t} is
    maximal subject to every expert receiving the same number of tokens. The
    paper solves this with an auction algorithm; we solve the same assignment
    exactly as a transportation problem with scipy's HiGHS solver
    (`_balanced_assignment`).

    T not divisible by N: every expert gets floor(T/N) or ceil(T/N) tokens and
    the solver decides which experts take the T mod N extra ones (fairseq
    requires divisibility and leaves leftover tokens unassigned). Each token
    gets exactly one expert, weighted by sigmoid(l_{t, e_t}) as in the paper's
    gate; the paper's (1 - sigmoid) * x residual term is left to the
    transformer block's residual connection. fairseq uses this assignment in
    training and a greedy argmax at inference; we always show the balanced
    assignment. `probs` = softmax(logits), so heatmaps compare across schemes.
    """
    logits = _check_logits(logits)
    T, N = logits.shape
    per, extra = divmod(T, N)
    scores = logits.detach().double().cpu().numpy()
    assigned = _balanced_assignment(scores, per, per + (1 if extra else 0))
    e = torch.as_tensor(assigned, device=logits.device)[:, None]
    probs = logits.float().softmax(dim=-1)
    gate = torch.sigmoid(logits.float().gather(1, e))
    keep = torch.ones_like(e, dtype=torch.bool)
    aux = {"load_balance": load_balance_loss(probs, F.one_hot(e[:, 0], N).bool())}
    return _finish("base", probs, logits, e, keep, gate, per + (1 if extra else 0), aux)


def deepseek(
    logits: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    normalize: bool = True,
    scaling: float = 1.0,
) -> Routing:
    """DeepSeek-V3 routing (DeepSeek-AI 2024, arXiv:2412.19437, section 2.1.2).

    s = sigmoid(l). The expert BIAS b is added to the scores for SELECTION
    only: S_t = TopK(s_t + b, k); the weights come from the unbiased scores,
    w = s[S_t] / sum(s[S_t]) * scaling. That is what makes "auxiliary-loss-free"
    balancing work: `update_bias` nudges b between steps so overloaded experts
    are picked less, without a loss term fighting the language-model loss.

    Group-limited routing (node-limited in the paper): experts are split into
    `n_groups` groups, each scored by the sum of its top-2 biased scores, and
    only the best `topk_groups` groups may be chosen from (masked with -inf, as
    the official code and HF 5.x do; older code filled 0.0, which is a bug when
    biased scores are negative). We follow HF/official V3: top-2 group sums
    always, renormalise when `normalize`.

    `aux["load_balance"]` is the paper's complementary sequence-wise balance
    loss shape: N * sum_e f_e * P_e with P from the normalised scores s / sum(s).
    """
    logits = _check_logits(logits)
    T, N = logits.shape
    k = _check_k(k, N)
    n_groups = _whole("n_groups", n_groups)
    if N % n_groups:
        raise ValueError(f"n_groups = {n_groups} must divide the number of experts N = {N}")
    if n_groups > 1 and N // n_groups < 2:
        raise ValueError(f"each expert group needs at least 2 experts (N / n_groups = {N // n_groups}); use fewer groups")
    topk_groups = _whole("topk_groups (at most n_groups)", topk_groups, 1, n_groups)
    if n_groups > 1 and k > topk_groups * (N // n_groups):
        raise ValueError(
            f"top-k = {k} cannot be picked from {topk_groups} group(s) of {N // n_groups} experts; "
            f"raise topk_groups or lower k"
        )
    normalize, scaling = _flag("normalize", normalize), _number("scaling", scaling)
    scores = torch.sigmoid(logits.float())
    choice = scores.detach()
    if bias is not None:
        choice = choice + _values("bias values (one per expert)", bias, (N,)).float().to(choice.device)
    if n_groups > 1:
        grouped = choice.view(T, n_groups, N // n_groups)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)       # [T, G]
        _, keep_groups = _topk_lowest_index(group_scores, topk_groups)
        group_mask = torch.zeros(T, n_groups, dtype=torch.bool, device=choice.device).scatter(1, keep_groups, True)
        choice = grouped.masked_fill(~group_mask[:, :, None], float("-inf")).view(T, N)
    _, top_i = _topk_lowest_index(choice, k)
    w = scores.gather(1, top_i)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scaling
    normalised = scores / (scores.sum(-1, keepdim=True) + 1e-20)   # all scores can underflow to 0
    aux = {"load_balance": load_balance_loss(normalised, _choice_mask(top_i, N))}
    keep = torch.ones_like(top_i, dtype=torch.bool)
    return _finish("deepseek", scores, logits, top_i, keep, w, None, aux)


def update_bias(bias: Tensor, load: Tensor, gamma: float) -> Tensor:
    """DeepSeek-V3 auxiliary-loss-free balancing step (arXiv:2412.19437, sec. 2.1.2).

    b_e <- b_e - gamma if expert e is overloaded (load above the mean),
    b_e <- b_e + gamma if it is underloaded; unchanged at exactly the mean.
    The paper uses gamma = 0.001 for most of pre-training. Returns a new tensor.
    """
    gamma = _number("bias update rate gamma", gamma, zero_ok=True)
    if not isinstance(load, Tensor):
        raise ValueError(f"load must be a tensor of tokens per expert, got {type(load).__name__}")
    load = load.float().to(bias.device)
    if load.shape != bias.shape:
        raise ValueError(f"load {tuple(load.shape)} and bias {tuple(bias.shape)} must have one value per expert")
    return bias + gamma * torch.sign(load.mean() - load)


# ----------------------------------------------------------------------------- trivial routers (baselines)

_PRIME = 2_147_483_647          # 2^31 - 1: Park and Miller's "minimal standard" generator (1988)


def hash_scores(token_ids: Tensor, n_experts: int) -> Tensor:
    """A fixed pseudo-random score per (token id, expert), [T, N] in [0, 1): the same id gets the same
    scores in every call, on every machine. Three rounds of a Park-Miller step (x <- 48271 x mod 2^31 - 1)
    and an xor-shift (which breaks the step's correlation between neighbouring inputs) of id * N + e + 1,
    in int64 (nothing overflows: x stays below 2^31)."""
    e = torch.arange(n_experts, device=token_ids.device)
    x = (token_ids.long()[:, None] * n_experts + e + 1) % _PRIME
    for _ in range(3):
        x = x * 48271 % _PRIME
        x = x ^ (x >> 15)
    return x.double().div(_PRIME).float()


def _uniform_routing(scheme: str, logits: Tensor, k: int, scores: Tensor) -> Routing:
    """Route to the k experts with the highest (non-learned) `scores`, each weighted 1/k.

    There is no router score to show, so `probs` holds the weights themselves (1/k on the chosen experts,
    0 elsewhere); `aux["load_balance"]` is computed from them as for every scheme (1.0 when balanced).
    The router's logits are not used: no gradient reaches the router."""
    T, N = logits.shape
    _, top_i = _topk_lowest_index(scores, k)
    w = torch.full(top_i.shape, 1.0 / k, device=logits.device)
    probs = torch.zeros(T, N, device=logits.device).scatter_(1, top_i, 1.0 / k)
    counts = torch.bincount(top_i.reshape(-1), minlength=N).float()
    aux = {"load_balance": _load_balance(probs, counts), "z_loss": z_loss(logits.detach())}
    return _finish(scheme, probs, logits, top_i, torch.ones_like(top_i, dtype=torch.bool), w, None, aux)


def hash_routing(logits: Tensor, k: int, *, token_ids: Tensor | None = None) -> Routing:
    """Hash routing (Roller et al. 2021, Hash Layers for Large Sparse Models, arXiv:2106.04426).

    No learned router: a fixed hash of the token's ID picks its experts, whatever the context.
    S_t = TopK(hash(id_t, e), k) over experts e, w_{t,e} = 1/k. With k = 1 this is the paper's "random
    hash" (one fixed random expert per vocabulary entry); for k > 1 each id ranks the experts by its own
    hash scores (rendezvous hashing, Thaler and Ravishankar 1998), so the k experts are distinct and
    switching one expert off moves only the ids that used it. The paper's best variant balances the
    buckets by token frequency; this is the plain random hash.
    A token's experts depend on its id alone, so the routing is causal and the load follows how often
    each id occurs.
    """
    logits = _check_logits(logits)
    T, N = logits.shape
    k = _check_k(k, N)
    if token_ids is None:
        raise ValueError("hash routing picks experts from the token ids: call the model with token ids, "
                         "or pass token_ids= (one id per token) to the layer")
    if (not isinstance(token_ids, Tensor) or token_ids.dtype not in (torch.long, torch.int)
            or tuple(token_ids.shape) != (T,) or (T and int(token_ids.min()) < 0)):
        got = (f"a {token_ids.dtype} tensor of shape {tuple(token_ids.shape)}" if isinstance(token_ids, Tensor)
               else type(token_ids).__name__)
        raise ValueError(f"token_ids must be an integer tensor of {T} non-negative token ids (one per routed "
                         f"token), got {got}")
    return _uniform_routing("hash", logits, k, hash_scores(token_ids.to(logits.device), N))


def random_routing(logits: Tensor, k: int, *, generator: torch.Generator | None = None) -> Routing:
    """Random routing: every token gets k distinct experts drawn uniformly at random, each weighted 1/k,
    drawn again at every call (a baseline in Roller et al. 2021, arXiv:2106.04426; Zuo et al. 2022,
    "Taming Sparsely Activated Transformer with Stochastic Experts", arXiv:2110.04260, train with it).

    It ignores both the token and the router, so it balances the load perfectly on average and cannot
    specialise. Draws come from `generator`, or torch's default one (seed it with torch.manual_seed)."""
    logits = _check_logits(logits)
    T, N = logits.shape
    k = _check_k(k, N)
    generator = _generator(generator)
    scores = torch.rand(T, N, generator=generator, device=logits.device)
    return _uniform_routing("random", logits, k, scores)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Scheme:
    """How the app and the CLI present and call a routing scheme."""

    name: str
    label: str
    fn: Callable[..., Routing]
    paper: str
    uses_k: bool            # takes a top-k argument
    fixed_k: int | None     # experts per token when not configurable (Switch 1, GShard 2, BASE 1)
    uses_capacity: bool     # has a capacity / capacity factor
    default_capacity_factor: float | None
    causal: bool            # a token's routing depends only on itself and earlier tokens
    options: tuple[str, ...]  # keyword options the function accepts
    repeatable: bool = True   # the same logits (and token ids) always route the same way


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("softmax_topk", "Softmax top-k (Mixtral)", softmax_topk,
               "Jiang et al. 2024, Mixtral of Experts, arXiv:2401.04088",
               True, None, False, None, True, ("normalize",)),
        Scheme("noisy_topk", "Noisy top-k (Shazeer 2017)", noisy_topk,
               "Shazeer et al. 2017, Outrageously Large Neural Networks, arXiv:1701.06538",
               True, None, False, None, True, ("noise_logits", "generator", "training", "noise_epsilon")),
        Scheme("switch", "Switch top-1 with capacity", switch,
               "Fedus et al. 2021, Switch Transformers, arXiv:2101.03961",
               False, 1, True, 1.0, True, ("capacity", "capacity_factor")),
        Scheme("gshard", "GShard top-2 with capacity", gshard,
               "Lepikhin et al. 2020, GShard, arXiv:2006.16668",
               False, 2, True, 2.0, False,
               ("capacity", "capacity_factor", "second_policy", "batch_prioritized", "generator")),
        Scheme("expert_choice", "Expert Choice", expert_choice,
               "Zhou et al. 2022, Mixture-of-Experts with Expert Choice Routing, arXiv:2202.09368",
               False, None, True, 1.0, False, ("capacity", "capacity_factor")),
        Scheme("base", "BASE layers (balanced assignment)", base,
               "Lewis et al. 2021, BASE Layers, arXiv:2103.16716",
               False, 1, False, None, False, ()),
        Scheme("deepseek", "DeepSeek-V3 (sigmoid + bias)", deepseek,
               "DeepSeek-AI 2024, DeepSeek-V3 Technical Report, arXiv:2412.19437",
               True, None, False, None, True, ("bias", "n_groups", "topk_groups", "normalize", "scaling")),
        Scheme("hash", "Hash of the token id (baseline)", hash_routing,
               "Roller et al. 2021, Hash Layers for Large Sparse Models, arXiv:2106.04426",
               True, None, False, None, True, ("token_ids",)),
        Scheme("random", "Random experts (baseline)", random_routing,
               "Roller et al. 2021, arXiv:2106.04426 (random routing baseline)",
               True, None, False, None, True, ("generator",), repeatable=False),
    ]
}


def get_scheme(name: str) -> Scheme:
    if not isinstance(name, str) or name not in SCHEMES:
        raise ValueError(f"unknown routing scheme {name!r}; choose one of: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def route(logits: Tensor, scheme: str, k: int | None = None, **options) -> Routing:
    """Route `logits` [T, N] with the named scheme.

    `k` is required for schemes that take a top-k (softmax_topk, noisy_topk,
    deepseek). For the others it must be None or equal to the scheme's fixed
    number of experts per token. Unknown options raise ValueError.
    """
    s = get_scheme(scheme)
    unknown = set(options) - set(s.options)
    if unknown:
        allowed = ", ".join(s.options) or "none"
        raise ValueError(f"{scheme} does not take option(s) {', '.join(sorted(unknown))} (it takes: {allowed})")
    if s.uses_k:
        if k is None:
            raise ValueError(f"{scheme} needs a top-k value")
        return s.fn(logits, k, **options)
    if k is not None and s.fixed_k is not None and k != s.fixed_k:
        raise ValueError(f"{s.label} always sends each token to {s.fixed_k} expert(s); k = {k} does not apply")
    if k is not None and s.fixed_k is None and not s.uses_k:
        raise ValueError(f"{s.label} has no top-k: experts pick tokens; set the capacity factor instead")
    return s.fn(logits, **options)
