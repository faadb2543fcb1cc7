"""Total vs active parameters, read from a real nn.Module.

The central lesson of a Mixture of Experts: the model STORES every expert
(total parameters, which set the memory bill) but each token only USES the
experts it is routed to (active parameters, which set the compute per token).

Every parameter is filed under one part by the nearest module that declares a
`param_part` attribute (Router -> "router", Experts -> "routed_experts", ...);
nn.Embedding counts as "embeddings" and LayerNorm/RMSNorm as "norms". Shared
tensors (tied input/output embeddings) are counted once.

Active per token = everything except the routed experts a token does not use:
for every MoE layer, only `experts_per_token / N` of its routed-expert weights
(k/N for top-k routing). Embeddings are counted as active, as Mistral and
DeepSeek do in their published "active" figures (the input embedding is a row
lookup, but with tied weights the same matrix is the output head's matmul).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .layer import MoELayer
from .published import BYTES_PER_PARAM, PARTS, memory_bytes  # noqa: F401  (one definition, shared)

_NORMS = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def _part_of(module: nn.Module) -> str | None:
    part = getattr(module, "param_part", None)
    if part is not None:
        return part
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, _NORMS):
        return "norms"
    return None


def params_by_part(model: nn.Module) -> dict[str, int]:
    """Total parameters split by PARTS (unique tensors; tied weights once)."""
    counts = dict.fromkeys(PARTS, 0)
    seen: set[int] = set()

    def visit(module: nn.Module, part: str) -> None:
        part = _part_of(module) or part
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                counts[part] += p.numel()
        for child in module.children():
            visit(child, part)

    visit(model, "other")
    return counts


@dataclass(frozen=True)
class ParamReport:
    total: int
    active_per_token: int
    by_part: dict[str, int]          # total split by part
    active_by_part: dict[str, int]   # active split by part
    experts_per_token: float         # routed experts a token uses (averaged over MoE layers)
    n_experts: int                   # routed experts per MoE layer (max over layers)

    @property
    def active_share(self) -> float:
        """Fraction of all parameters one token uses."""
        return self.active_per_token / self.total if self.total else 0.0

    @property
    def ratio(self) -> float:
        """Total / active: how many times more weights are stored than used."""
        return self.total / self.active_per_token if self.active_per_token else float("inf")

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "active_per_token": self.active_per_token,
            "ratio": round(self.ratio, 4),
            "active_share": round(self.active_share, 6),
            "experts_per_token": self.experts_per_token,
            "n_experts": self.n_experts,
            "by_part": dict(self.by_part),
            "active_by_part": dict(self.active_by_part),
        }


def count_params(model: nn.Module, *, top_k: int | None = None, scheme: str | None = None,
                 capacity_factor: float | None = None) -> ParamReport:
    """Total and active-per-token parameters of `model` under the given routing.

    `top_k` / `scheme` / `capacity_factor` override what the MoE layers were
    built with, exactly as a routing override would at forward time.
    """
    by_part = params_by_part(model)
    active = dict(by_part)
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if top_k is not None and moe_layers:
        n_max = max(m.n_experts for m in moe_layers)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_max:
            raise ValueError(f"top-k must be between 1 and N = {n_max}, got {top_k!r}")
    routed_active = 0.0
    per_token = []
    for m in moe_layers:
        k_eff = m.experts_per_token(top_k=top_k, scheme=scheme, capacity_factor=capacity_factor)
        per_token.append(k_eff)
        routed_active += k_eff * m.experts.params_per_expert()
    active["routed_experts"] = round(routed_active) if moe_layers else by_part["routed_experts"]
    return ParamReport(
        total=sum(by_part.values()),
        active_per_token=sum(active.values()),
        by_part=by_part,
        active_by_part=active,
        experts_per_token=sum(per_token) / len(per_token) if per_token else 0.0,
        n_experts=max((m.n_experts for m in moe_layers), default=0),
    )
