"""The Mixture-of-Experts layer: a router, N routed experts and optional shared experts.

    y_t = sum_{e chosen for t} w_{t,e} * expert_e(x_t)  +  sum_shared expert_s(x_t)

The routed experts' sum is the plain per-expert loop of DeepSeek-V3's inference
code (`expert_loop`); `forward` runs `moe_core.perf.experts.run_experts`, which
computes exactly that, faster (tests/test_perf_experts.py checks they are equal).
Experts are stored as stacked weight tensors ([N, d_model, ...]) for it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..perf.experts import run_experts
from .request import RoutingRequest
from .routing import SCHEMES, Routing, _whole, get_scheme, route, update_bias

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
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError("MPS (Apple GPU) was requested but is not available on this machine")
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

    def act(self, h: Tensor) -> Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Run expert e alone on x [n, d_model]."""
        return self.act(x @ self.w_in[e]) @ self.w_out[e]


def expert_loop(experts: Experts, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """The routed experts' output for x [n, d_model] as DeepSeek-V3's inference code computes it: each expert
    on the tokens that chose it (indices [n, k], -1 = none), times their weights; `run_experts`'s reference."""
    y = torch.zeros_like(x)
    for i in range(experts.n_experts):
        idx, top = torch.where(indices == i)
        if idx.numel():
            y[idx] += experts.expert(i, x[idx]) * weights[idx, top, None].to(x.dtype)
    return y


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

    x must be a floating-point torch tensor on the layer's device. Input in another floating-point
    precision than the layer's weights (float16, bfloat16, float64 for a float32 layer) is cast to the
    layer's dtype, and y is returned in x's dtype (the router always scores in float32). Anything else
    (integers, bool, complex, NumPy arrays, lists, meta tensors, another device, another shape) raises
    ValueError, as do NaN or infinite values and finite ones so large that the result would not be finite.
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
        self.group_size = _group_size(router_options.pop("group_size", None))
        self.router_options = router_options
        self._check_options(scheme, router_options)
        request = RoutingRequest.make(self)     # the layer's own k and capacity factor must make a request
        if router_options:                      # the scheme checks its options: one dummy token through it now
            with torch.random.fork_rng(devices=[]):         # (GShard's random policies draw: seeds stay as set)
                route(torch.zeros(1, n_experts), scheme, request.top_k, **router_options)
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

    def _check_options(self, scheme: str, options: dict) -> None:
        allowed = set(get_scheme(scheme).options) - {"noise_logits", "generator", "training", "bias", "token_ids"}
        bad = set(options) - allowed
        if bad:
            raise ValueError(f"{scheme} does not take option(s) {', '.join(sorted(bad))} (it takes: {', '.join(sorted(allowed)) or 'none'})")

    @property
    def capacity_factor(self) -> float | None:
        """The capacity factor the layer was built with (for its own scheme), if any."""
        return self.router_options.get("capacity_factor")

    def route(self, x: Tensor, request: RoutingRequest | None = None, *, layer: int = 0,
              token_ids: Tensor | None = None, **overrides) -> Routing:
        """Router decision for x [n, d_model] (one or more groups), without running experts.

        `request` (a RoutingRequest, made once by the caller) says how to route: scheme, top-k, capacity
        factor and the experts switched off in `layer`. `token_ids` [n] (the id of each token of x) is what
        hash routing routes by; the model passes them, other schemes ignore them. Without a request, the
        keyword overrides (`top_k=`, `scheme=`, `capacity_factor=`, `disabled_experts=[...]`) make it, checked
        by the same `RoutingRequest.make`; other keywords are the scheme's own options.

        Switched-off experts (an ablation) can never be selected. They are removed from the routing
        group before the scheme runs, and the scheme routes over the remaining N' experts exactly as it
        would in a model that only had those. For softmax schemes this is the same as setting the
        disabled logits to -inf (their probability is 0 and top-k weights are renormalised over what
        remains, as the scheme does); for DeepSeek the sigmoid score is 0 and the bias cannot bring the
        expert back; Expert Choice and BASE give a disabled expert no tokens (the remaining experts
        share all of them). Capacity follows the scheme's own rule over N' experts (ceil(cf * T / N')).
        The weights are never touched, and the returned Routing still has N columns: zeros for disabled
        experts, whose raw router logits are kept in `logits` for display.
        """
        self._check_input(x, dims=(2,))
        if request is None:
            off = overrides.pop("disabled_experts", None)
            request = RoutingRequest.make(self, overrides.pop("scheme", None), overrides.pop("top_k", None),
                                          overrides.pop("capacity_factor", None),
                                          None if off is None else {layer: off})
        scheme, k = request.scheme, request.top_k
        options = {**self.router_options, **overrides} if scheme == self.scheme else dict(overrides)
        options.pop("capacity_factor", None)
        group_size = _group_size(options.pop("group_size", self.group_size))
        self._check_options(scheme, options)
        if request.capacity_factor is not None:
            options["capacity_factor"] = request.capacity_factor
        off = request.disabled(layer)
        if off and scheme == "deepseek" and options.get("n_groups", 1) != 1:
            raise ValueError("switching experts off is not supported with group-limited DeepSeek routing "
                             "(n_groups > 1): the expert groups would no longer be equal")
        logits = self.router(x)
        if scheme == "noisy_topk" and self.noise is not None:
            options.update(noise_logits=self.noise(x), training=self.training)
        if scheme == "deepseek":
            options.setdefault("bias", self.expert_bias)
        if "token_ids" in get_scheme(scheme).options:
            options["token_ids"] = token_ids.reshape(-1) if isinstance(token_ids, Tensor) else token_ids
        full_logits = logits
        if off:
            keep = torch.tensor([e for e in range(self.n_experts) if e not in off], device=logits.device)
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
                sub = {kk: (v[start : start + group_size] if kk in ("noise_logits", "token_ids") and v is not None
                            else v) for kk, v in options.items()}
                parts.append(route(logits[start : start + group_size], scheme, k=k, **sub))
            routing = Routing.cat(parts)
        if off:
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

    def forward(self, x: Tensor, token_ids: Tensor | None = None, **overrides) -> tuple[Tensor, Routing]:
        """Route, then add up each token's experts as DeepSeek-V3's `MoE.forward` does (`expert_loop`):
            y = zeros_like(x)
            for i in range(N):
                idx, top = torch.where(indices == i)
                y[idx] += expert_i(x[idx]) * weights[idx, top, None]
            y += shared(x)
        `run_experts` computes exactly that, faster (one sort for all experts; threads or a grouped GEMM
        by device): see moe_core/perf/experts.py. `token_ids` (x's shape without d_model): for hash routing."""
        self._check_input(x, dims=(3, 2))
        x2 = x.reshape(-1, self.d_model).to(self.experts.w_in.dtype)   # (B*T, C), in the layer's dtype
        routing = self.route(x2, token_ids=token_ids, **overrides)
        y = run_experts(self.experts, x2, routing.indices, routing.weights)
        if self.shared is not None:
            y = y + self.shared(x2)
        y = y.view(x.shape).to(x.dtype)
        if not _all_finite(y):
            raise ValueError(f"the MoE layer's output overflowed (inf or NaN in {y.dtype}) although its input is "
                             f"finite: the input (largest |x| = {float(x.abs().max()):.3g}) is far too large, or "
                             f"the expert weights are broken; activations of order 1 (after a norm) are expected")
        return y, routing

    def _check_input(self, x, dims: tuple[int, ...]) -> None:
        """x must be a floating-point tensor with values, on the layer's device, of shape [B, T, d_model]
        (dims 3) or [T, d_model] (dims 2); ValueError otherwise. Cheap: nothing here reads x's values."""
        want = " or ".join({3: f"[B, T, {self.d_model}]", 2: f"[T, {self.d_model}]"}[d] for d in dims)
        if not isinstance(x, Tensor):
            hint = " (torch.from_numpy(x) makes one)" if type(x).__module__ == "numpy" else ""
            raise ValueError(f"MoELayer expects a torch tensor {want}, got {type(x).__name__}{hint}")
        if x.dim() not in dims or x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects {want}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoELayer expects floating-point input (float32, float16, bfloat16 or float64), "
                             f"got {x.dtype}")
        device = self.expert_bias.device
        if x.is_meta or device.type == "meta":
            raise ValueError("MoELayer cannot run on meta tensors (a shape without values): give it real input "
                             "and weights")
        if x.device != device:
            raise ValueError(f"the input is on {x.device} but the layer's weights are on {device}: "
                             f"move one to the other (x.to(...) or layer.to(...))")

    @torch.no_grad()
    def update_bias(self, load: Tensor, gamma: float) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing: nudge the selection bias towards balance."""

        self.expert_bias.copy_(update_bias(self.expert_bias, load, gamma))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, top_k={self.top_k}, "
                f"scheme={self.scheme!r}, n_shared={self.n_shared}")


def _group_size(v) -> int | None:
    return None if v is None else _whole("group_size (tokens per routing group, or None for one group)", v)


def _all_finite(t: Tensor) -> bool:
    """No NaN or infinity in t: one sum (finite sum -> finite values), the exact check only if that overflowed."""
    t = t.detach()
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


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


__all__ = ["MoELayer", "Experts", "expert_loop", "SharedExperts", "Router", "DenseFFN", "pick_device", "SCHEMES"]
