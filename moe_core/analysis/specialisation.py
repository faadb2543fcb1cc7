"""What do the experts learn? Measured, not assumed.

Experts in real MoE language models specialise in token-level, syntactic
patterns (digits, punctuation, indentation, word pieces), not in human topics
like "maths" or "biology" (Mixtral paper, section 5; OLMoE section 5). We
measure that on held-out text: the normalised mutual information between each
token's top-1 expert and its coarse category (moe_core.data.categories: digit,
punctuation, whitespace, capitalised word, Python keyword, other).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from ..data.categories import COARSE_CATEGORIES, coarse_category
from ..data.tokenizer import get_tokenizer
from ..inference import evaluate, route_ids
from .metrics import balance_metrics


def entropy(labels: np.ndarray) -> float:
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(A; B) in nats from paired discrete labels."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("mutual information needs two non-empty label arrays of the same length")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def nmi(a, b) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (scikit-learn's default):
    I(A;B) / ((H(A) + H(B)) / 2); 0 = independent, 1 = one determines the other."""
    ha, hb = entropy(np.asarray(a)), entropy(np.asarray(b))
    if ha == 0 and hb == 0:
        return 1.0
    if ha == 0 or hb == 0:
        return 0.0
    return mutual_information(a, b) / ((ha + hb) / 2)


def specialisation(model, ids: list[int], *, tokenizer=None, top_tokens: int = 8, **route) -> dict:
    """Per layer: NMI(top-1 expert, token category) and each expert's category mix and top tokens."""

    tok = tokenizer or get_tokenizer()
    routings, _ = route_ids(model, ids, **route)
    texts = [tok.token_str(i) for i in ids]
    cats = np.array([coarse_category(t) for t in texts])
    layers = []
    for i, r in enumerate(routings):
        top1 = r.top1.numpy()
        experts = []
        for e in range(r.n_experts):
            sel = top1 == e
            n = int(sel.sum())
            mix = Counter(cats[sel].tolist())
            common = Counter(np.asarray(ids)[sel].tolist()).most_common(top_tokens)
            experts.append({
                "expert": e,
                "top1_tokens": n,
                "share": n / len(ids),
                "categories": {c: mix.get(c, 0) / n if n else 0.0 for c in COARSE_CATEGORIES},
                "top_tokens": [[tok.token_str(t), c] for t, c in common],
            })
        layers.append({"layer": i, "nmi_category": nmi(top1, cats), "experts": experts})
    return {"n_tokens": len(ids), "layers": layers}


def summarise(spec: dict, max_experts: int = 4) -> list[str]:
    """Short human-readable lines: for each layer, the experts with the most distinctive category."""

    lines = []
    for layer in spec["layers"]:
        overall = Counter()
        for e in layer["experts"]:
            for c, s in e["categories"].items():
                overall[c] += s * e["top1_tokens"]
        total = sum(overall.values()) or 1
        base = {c: overall[c] / total for c in COARSE_CATEGORIES}
        notes = []
        for e in layer["experts"]:
            if not e["top1_tokens"]:
                continue
            lift = {c: e["categories"][c] / base[c] for c in COARSE_CATEGORIES if base[c] > 0.01}
            c = max(lift, key=lift.get)
            notes.append((lift[c] * e["categories"][c], e["expert"], c, e["categories"][c]))
        notes.sort(reverse=True)
        parts = [f"expert {e} {share:.0%} {c}" for _, e, c, share in notes[:max_experts]]
        lines.append(f"layer {layer['layer']}: NMI {layer['nmi_category']:.2f}; " + ", ".join(parts))
    return lines


def model_card(model, data, *, eval_tokens: int = 16384) -> dict:
    """Measured figures for a model card: held-out loss, balance and specialisation per layer."""

    ids = data.splits["eval"][:eval_tokens].tolist()
    routings, _ = route_ids(model, ids)
    spec = specialisation(model, ids)
    return {
        "eval_loss": round(evaluate(model, data, batches=8), 4),
        "eval_tokens_for_routing": len(ids),
        "balance": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in balance_metrics(r).items()}
                    for r in routings],
        "nmi_category": [round(layer["nmi_category"], 4) for layer in spec["layers"]],
        "specialisation": summarise(spec),
    }
