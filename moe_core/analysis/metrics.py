"""How balanced is a routing? The numbers of the dashboard's balance panel.

All figures are computed from a `Routing` (tokens per expert = the dispatch
counts after capacity), so they describe what the layer really did.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..model.routing import Routing

# name -> (label, one-line definition shown on hover in the app and in --help)
METRICS: dict[str, tuple[str, str]] = {
    "load_balance": ("Load-balance loss", "N * sum_e f_e * P_e: 1.0 when routing is uniform, N when one expert takes everything (Switch Transformer eq. 4)."),
    "z_loss": ("Router z-loss", "Mean over tokens of logsumexp(router logits)^2: large when router logits grow (ST-MoE)."),
    "cv": ("CV of load", "Standard deviation / mean of tokens per expert: 0 when every expert gets the same number of tokens."),
    "entropy": ("Load entropy", "Entropy (nats) of the share of tokens each expert processes: ln N when perfectly even, 0 when one expert takes all."),
    "entropy_norm": ("Normalised entropy", "Load entropy / ln N: 1.0 when every expert processes the same share, 0 when one takes all; compares layers and models with different N."),
    "jain": ("Jain's fairness", "(sum_e x_e)^2 / (N * sum_e x_e^2) over tokens per expert x_e: 1.0 when all are equal, 1/N when one expert takes all (Jain, Chiu and Hawe 1984)."),
    "n_eff": ("Effective experts", "exp(entropy): how many equally loaded experts would give the same entropy (N at best, 1 at worst)."),
    "gini": ("Gini", "Gini coefficient of tokens per expert: 0 = perfectly equal, towards 1 = one expert takes all."),
    "max_over_mean": ("Max / mean load", "Tokens of the busiest expert divided by the average: 1.0 is perfect balance."),
    "dead_experts": ("Dead experts", "Experts that processed no token at all in this text."),
    "drop_rate": ("Drop rate", "Share of the router's choices cut by expert capacity (those tokens skip the expert)."),
    "top1_max_share": ("Busiest top-1 share", "Largest share of tokens whose FIRST choice is one expert: 1/N is even, 1.0 is collapse."),
}


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of non-negative values (0 = all equal)."""
    x = torch.sort(values.double().flatten()).values
    n = x.numel()
    total = x.sum().item()
    if n == 0 or total == 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float((2 * (ranks * x).sum() / (n * total) - (n + 1) / n).item())


def jain(load) -> float:
    """Jain's fairness index of tokens per expert (a tensor or array): 1.0 when all are equal, 1/N when one
    expert takes all, 0.0 when there is no token."""
    total = float(load.sum())
    return total**2 / (len(load) * float((load**2).sum())) if total else 0.0


def balance_metrics(routing: Routing) -> dict[str, float | int]:
    """Every METRICS figure for one layer's routing."""
    load = routing.dispatch.sum(0).double()
    N = load.numel()
    total = load.sum().item()
    mean = total / N
    share = load / total if total else torch.zeros_like(load)
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum().item()) if total else 0.0
    chosen = (routing.dispatch | routing.dropped).sum().item()
    top1 = routing.choices[:, 0] if routing.choices is not None else routing.indices[:, 0]
    top1 = top1[top1 >= 0]
    top1_share = (torch.bincount(top1, minlength=N).max().item() / top1.numel()) if top1.numel() else 0.0
    return {
        "load_balance": float(routing.aux["load_balance"].detach()),
        "z_loss": float(routing.aux["z_loss"].detach()),
        "cv": float(load.std(unbiased=False).item() / mean) if mean else 0.0,
        "entropy": entropy,
        "entropy_norm": entropy / math.log(N) if N > 1 else 1.0,
        "jain": jain(load),
        "n_eff": math.exp(entropy) if total else 0.0,
        "gini": gini(load),
        "max_over_mean": float(load.max().item() / mean) if mean else 0.0,
        "dead_experts": int((load == 0).sum().item()),
        "drop_rate": float(routing.dropped.sum().item() / chosen) if chosen else 0.0,
        "top1_max_share": float(top1_share),
    }


COVERAGE = ("Expert coverage", "How many of the model's (layer, expert) pairs have processed at least one token, as the "
            "tokens of the text accumulate: it reaches layers x N only when no expert is left idle.")


def coverage_curve(routings: list[Routing]) -> list[int]:
    """After each token t (in text order), the number of (layer, expert) pairs that have processed at least
    one of tokens 0..t: the expert-coverage curve practitioners ask for (dispatch after capacity)."""
    if not routings:
        return []
    # the first token each (layer, expert) processed; never = T
    T = routings[0].dispatch.shape[0]
    first = torch.cat([torch.where(r.dispatch.any(0), r.dispatch.float().argmax(0), T) for r in routings])
    return torch.bincount(first, minlength=T + 1)[:T].cumsum(0).tolist()


def topk_overlap(choices: np.ndarray, reference: np.ndarray) -> float:
    """The share of the reference routing's choices that `choices` also makes, over the same tokens: both
    [T, k] expert numbers (-1 = none). 1.0 when every token picks the reference's experts (in any order);
    OLMoE's router saturation (arXiv:2409.02060, Fig. 20) is this against the final checkpoint."""
    if choices.shape[0] != reference.shape[0]:
        raise ValueError(f"the two routings cover {choices.shape[0]} and {reference.shape[0]} tokens; they must be the same tokens")
    ref = reference >= 0
    hit = ((choices[:, :, None] == reference[:, None, :]) & (choices[:, :, None] >= 0)).any(1) & ref
    return float(hit.sum() / max(int(ref.sum()), 1))
