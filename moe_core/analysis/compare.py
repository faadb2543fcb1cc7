"""How two routings of the same text differ, layer by layer (the dashboard's compare mode).

Both results must route the same tokens. Expert numbers only mean the same
thing when both sides use the same weights (one model, two routing settings):
then we report how often the first choice agrees and the total-variation
distance between the two combine-weight distributions. Across two different
models expert 3 of one is not expert 3 of the other, so the number-free
measure is the one to read: the normalised mutual information between the two
first-choice partitions of the tokens (1 = both group the tokens the same
way, whatever the numbering; 0 = unrelated). Load figures are compared as
sorted shares, which also need no matching of expert numbers.
"""
from __future__ import annotations

import torch

from .metrics import balance_metrics
from .specialisation import nmi


def compare_results(a, b, *, same_weights: bool) -> list[dict]:
    """Per-layer divergence between two RouteResults of the same text."""
    if [t.id for t in a.tokens] != [t.id for t in b.tokens]:
        raise ValueError("the two results route different tokens: compare them on the same text")
    if len(a.routings) != len(b.routings):
        raise ValueError("the two models have a different number of layers")
    out = []
    for li, (ra, rb) in enumerate(zip(a.routings, b.routings)):
        ma, mb = balance_metrics(ra), balance_metrics(rb)
        ta, tb = ra.choices[:, 0], rb.choices[:, 0]
        row = {
            "layer": li,
            "a": ma, "b": mb,
            "partition_nmi": nmi(ta.numpy(), tb.numpy()),
            "sorted_share_a": _sorted_share(ra), "sorted_share_b": _sorted_share(rb),
        }
        if same_weights:
            n = ta.numel()
            row["top1_agree"] = float((ta == tb).float().mean()) if n else 1.0
            row["tv_distance"] = float(0.5 * (ra.combine.float() - rb.combine.float()).abs().sum(1).mean())
            row["changed_tokens"] = (ta != tb).nonzero().flatten().tolist()
        out.append(row)
    return out


def _sorted_share(r) -> list[float]:
    load = r.dispatch.sum(0).double()
    total = load.sum()
    share = load / total if total else torch.zeros_like(load)
    return sorted(share.tolist(), reverse=True)


__all__ = ["compare_results"]
