"""Guided experiments: predict, run, see. Each asks one question about what the experts learned and
answers it with numbers measured on a loaded model and the held-out corpus, never typed in.

    result = run_experiment("domains", load("moe-n8"))
    result["finding"]      # a sentence built from result["numbers"]
    result["answer"]       # which of EXPERIMENTS["domains"].choices the numbers support
    result["figure"]       # what the app draws: {"kind": "bars" | "heatmap" | "table", ...}

The figures follow OLMoE's routing analysis (Muennighoff et al. 2024, arXiv:2409.02060, Figs. 20-23);
the same-token test follows chuk-mlx's `moe-expert` experiments; the trivial routers Roller et al. 2021
(arXiv:2106.04426); pruning and merging REAP (Lasby et al. 2025, arXiv:2510.13999).
"""
from __future__ import annotations

import copy
import unicodedata
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .analysis.metrics import jain, topk_overlap
from .analysis.profiles import PROFILE_TOKENS, heldout_windows
from .data import corpus
from .data.tokenizer import get_tokenizer
from .inference import forward_windows, route_ids
from .model.checkpoint import load
from .model.request import RoutingRequest
from .train.lab import PROBE_EVERY, Recipe, probe_choices, probe_windows
from .train.loop import Trainer

HELDOUT_TOKENS = PROFILE_TOKENS   # held-out tokens an experiment routes: the expert profiles' 64 windows of 256
DOMAIN_TOKENS = 2048         # tokens per domain for the domain test
MIN_OCCURRENCES = 8          # a token id counts for specialisation when it occurs at least this often
SAME_TOKEN = " the"          # the default token of the same-token test (one token in this vocabulary)
EXAMPLES = 8                 # contexts listed in the same-token test
RANDOM_DRAWS = 4             # random choices of experts to prune, averaged
PRUNE_AWAY = 2               # experts the pruning experiment removes from every layer (8 -> 6 in moe-n8)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    question: str                 # the hypothesis the student predicts an answer to
    choices: tuple[str, ...]      # possible predictions; result["answer"] indexes them
    source: str                   # where the experiment comes from
    run: Callable[..., dict]
    needs_training: bool = False  # trains a small model (tens of seconds), so the app runs it in the lab


# ----------------------------------------------------------------------------- measuring


def _net(model):
    return model.model if hasattr(model, "model") else model


def _heldout(model, request: RoutingRequest | None = None, n_tokens: int = HELDOUT_TOKENS):
    """(token ids [T], per-layer router choices [T, k] before capacity, mean next-token loss) on fixed,
    evenly spaced held-out windows."""
    net = _net(model)
    x, y = heldout_windows(n_tokens, net.config.block_size)
    device = next(net.parameters()).device
    routings, loss = forward_windows(net, x.to(device), y.to(device), None, request)
    return x.reshape(-1).numpy(), [r.choices.numpy() for r in routings], loss


def _k_of(choices: np.ndarray) -> int:
    return int((choices >= 0).sum(1).max())


def random_choices(n_tokens: int, n_experts: int, k: int, n_layers: int, seed: int = 0) -> list[np.ndarray]:
    """What random routing decides for n_tokens tokens, per layer: k distinct experts drawn uniformly per token
    (moe_core.model.routing.random_routing ignores the tokens, so no model pass is needed; seeded here)."""
    rng = np.random.default_rng(seed)
    return [np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :k] for _ in range(n_layers)]


def specialisation(ids: np.ndarray, choices: np.ndarray, n_experts: int, min_count: int = MIN_OCCURRENCES) -> float:
    """OLMoE Fig. 23: for each token id seen at least `min_count` times, the share of its occurrences routed
    to its most frequent expert; averaged over occurrences. Routing by chance gives about k/N."""
    counts = np.zeros((int(ids.max()) + 1, n_experts))
    for j in range(choices.shape[1]):
        ok = choices[:, j] >= 0
        np.add.at(counts, (ids[ok], choices[ok, j]), 1)
    seen = np.bincount(ids, minlength=counts.shape[0])
    keep = seen >= min_count
    if not keep.any():
        return float("nan")
    return float(counts[keep].max(1).sum() / seen[keep].sum())


def coactivation(choices: np.ndarray, n_experts: int) -> np.ndarray:
    """OLMoE Fig. 21: C[i, j] = share of the tokens routed to expert i that were also routed to j (i != j)."""
    chosen = np.zeros((len(choices), n_experts))
    for j in range(choices.shape[1]):
        ok = choices[:, j] >= 0
        chosen[np.nonzero(ok)[0], choices[ok, j]] = 1
    both = chosen.T @ chosen
    c = both / np.maximum(np.diag(both)[:, None], 1)
    np.fill_diagonal(c, 0.0)
    return c


def shares(choices: np.ndarray, n_experts: int) -> np.ndarray:
    """Share of all routings (every one of a token's k choices) that went to each expert: sums to 1."""
    c = choices[choices >= 0]
    return np.bincount(c, minlength=n_experts) / max(len(c), 1)


def _pct(x: float) -> str:
    """A share as a percentage: whole numbers, with one decimal below 20% when it is not whole (1/8 = 12.5%)."""
    whole = abs(100 * x - round(100 * x)) < 0.05
    return f"{100 * x:.0f}%" if x >= 0.2 or whole else f"{100 * x:.1f}%"


# ----------------------------------------------------------------------------- (a) same token, other contexts


def same_token(model, token: str = SAME_TOKEN) -> dict:
    tok = get_tokenizer()
    ids_of = tok.encode(token)
    if not token:
        raise ValueError("type a token to follow first (for example ' the', with its leading space)")
    if len(ids_of) != 1:
        pieces = " + ".join(repr(tok.token_str(i)) for i in ids_of) or "nothing"
        raise ValueError(f"{token!r} is {len(ids_of)} tokens ({pieces}), not one: pick a word that is one token")
    target = ids_of[0]
    ids, choices, _ = _heldout(model)
    where = np.nonzero(ids == target)[0]
    if len(where) < MIN_OCCURRENCES:
        raise ValueError(f"{token!r} occurs {len(where)} time(s) in the held-out slice, fewer than {MIN_OCCURRENCES}: "
                         f"pick a more common token (a leading space is part of a word's token: ' the', not 'the')")
    net = _net(model)
    n = net.config.n_experts

    def agree(chs):          # per layer: the share of the occurrences whose first expert is the most common one
        return [float(np.bincount(ch[where, 0], minlength=n).max() / len(where)) for ch in chs]

    agreement = agree(choices)
    distinct = [len({tuple(sorted(c[c >= 0])) for c in ch[where]}) for ch in choices]
    chance = agree(random_choices(len(ids), n, _k_of(choices[0]), len(choices)))
    block = net.config.block_size
    shown = where[np.linspace(0, len(where) - 1, min(EXAMPLES, len(where))).astype(int)]
    rows = []
    for p in shown:
        start = max(p - 6, (p // block) * block)          # the context the model saw (same window)
        rows.append({"context": tok.decode(ids[start:p].tolist()), "token": tok.token_str(target),
                     "experts": [[int(e) for e in ch[p] if e >= 0] for ch in choices]})
    always = all(a == 1.0 for a in agreement)
    mostly = min(agreement) >= 0.5
    worst = int(np.argmin(agreement))
    finding = (f"{tok.token_str(target)!r} occurs {len(where)} times in the held-out slice. "
               + ("Every layer sends it to the same first expert every time: its routing depends on the token "
                  "alone." if always else
                  f"Its first expert is the same in {', '.join(_pct(a) for a in agreement)} of the contexts "
                  f"(layers 0 to {len(agreement) - 1}); layer {worst} gives it {distinct[worst]} different "
                  f"expert sets (random routing would agree in about {_pct(float(np.mean(chance)))}). The router sees "
                  f"the token after attention has mixed in its context."))
    return {"numbers": {"token": tok.token_str(target), "token_id": int(target), "occurrences": int(len(where)),
                        "first_expert_agreement": agreement, "distinct_expert_sets": distinct,
                        "random_routing_agreement": chance},
            "answer": 0 if always else 1 if mostly else 2, "finding": finding,
            "figure": {"kind": "table", "columns": [f"layer {i}" for i in range(len(choices))], "rows": rows,
                       "bars": {"categories": [f"layer {i}" for i in range(len(choices))],
                                "series": {"same first expert": agreement, "random routing": chance},
                                "unit": "share"}}}


# ----------------------------------------------------------------------------- (b) domain experts


def _latin(text: str) -> bool:
    letters = [c for c in text[:2000] if c.isalpha()]
    return sum(unicodedata.name(c, "").startswith("LATIN") for c in letters) > 0.5 * max(len(letters), 1)


def domain_texts() -> dict[str, str]:
    """The held-out documents grouped into domains: English prose, code, numbers, Spanish (the largest
    language), other languages in Latin script, languages in other scripts."""
    groups: dict[str, list[str]] = {}
    for doc in corpus.load_documents("eval"):
        if doc["kind"] != "multilingual":
            name = {"prose": "English prose"}.get(doc["kind"], doc["kind"])
        elif doc["lang"] == "es":
            name = "Spanish"
        else:
            name = "other Latin-script languages" if _latin(doc["text"]) else "other scripts"
        groups.setdefault(name, []).append(doc["text"])
    order = ["English prose", "code", "numbers", "Spanish", "other Latin-script languages", "other scripts"]
    return {g: "\n\n".join(groups[g]) for g in order if g in groups}


def domains(model, n_tokens: int = DOMAIN_TOKENS) -> dict:
    tok, net = get_tokenizer(), _net(model)
    n = net.config.n_experts
    table, code_routes = {}, None                           # domain -> [layer][expert] share of routings
    for name, text in domain_texts().items():
        ids = tok.encode(text)[:n_tokens]
        routings, _ = route_ids(net, ids)
        table[name] = [shares(r.choices.numpy(), n) for r in routings]
        if name == "code":
            code_routes = (np.array(ids), [r.choices.numpy() for r in routings])
    names, layers = list(table), len(next(iter(table.values())))
    ratio = np.array([[table[d][i] * n for d in names] for i in range(layers)])     # [layer, domain, expert]
    code = names.index("code")
    others = np.delete(ratio, code, axis=1).max(1)                                  # [layer, expert]
    lead = ratio[:, code] - others                    # how far code's share beats the expert's best other domain
    layer, e = np.unravel_index(np.argmax(lead), lead.shape)
    c, o = ratio[layer, code, e], others[layer, e]
    specific = c >= 2 and c >= 2 * o
    ids, ch = code_routes
    mine = ids[(ch[layer] == e).any(1)]
    top = [tok.token_str(int(i)) for i in np.argsort(-np.bincount(mine), kind="stable")[:5] if np.any(mine == i)]
    finding = (f"The expert most bound to code is layer {layer}'s expert {e}: it takes {_pct(c / n)} of code's routings "
               f"({c:.1f}x an even share of {_pct(1 / n)}) and up to {_pct(o / n)} of another domain's. Its most "
               f"frequent code tokens: {', '.join(repr(t) for t in top)}. " +
               ("That is a code expert, at least in part." if specific else
                "That is a preference, not a code expert: code spreads over all the experts, as every domain "
                "does, the same experts in different proportions."))
    heat = {"kind": "heatmap", "x": [f"E{j}" for j in range(n)], "y": names, "layer_values":
            [[[float(v) for v in ratio[i, di]] for di in range(len(names))] for i in range(layers)],
            "baseline": 1.0, "unit": "x an even share", "layer": int(layer)}
    return {"numbers": {"domains": names, "share": {dn: [s.tolist() for s in table[dn]] for dn in names},
                        "uniform": 1 / n, "code_expert": {"layer": int(layer), "expert": int(e), "code_share": float(c / n),
                                                          "best_other_share": float(o / n), "top_tokens": top}},
            "answer": 0 if specific else 1, "finding": finding, "figure": heat}


# ----------------------------------------------------------------------------- (c) token-id specialisation


def token_ids(model) -> dict:
    net = _net(model)
    n = net.config.n_experts
    ids, choices, _ = _heldout(model)
    k = _k_of(choices[0])
    measured = [specialisation(ids, ch, n) for ch in choices]
    chance = [specialisation(ids, ch, n) for ch in random_choices(len(ids), n, k, len(choices))]
    above = min(m / c for m, c in zip(measured, chance))
    finding = (f"On average a token id goes to its favourite expert in {', '.join(_pct(m) for m in measured)} of its "
               f"occurrences (layers 0 to {len(measured) - 1}). Random routing of the same tokens gives "
               f"{_pct(float(np.mean(chance)))} (k/N = {k}/{n} = {_pct(k / n)}, a little more because each id's "
               f"favourite is the luckiest expert). " +
               ("So the router learned which tokens go where: it routes largely by token identity."
                if above >= 1.5 else "That is close to chance: routing does not follow the token's identity."))
    return {"numbers": {"specialisation": measured, "random_routing": chance, "k_over_n": k / n,
                        "min_occurrences": MIN_OCCURRENCES},
            "answer": 1 if above >= 1.5 else 0, "finding": finding,
            "figure": {"kind": "bars", "categories": [f"layer {i}" for i in range(len(measured))],
                       "series": {"this model": measured, "random routing": chance},
                       "baseline": k / n, "baseline_label": "k/N", "unit": "share"}}


# ----------------------------------------------------------------------------- (d) co-activation


def coactivations(model) -> dict:
    net = _net(model)
    n = net.config.n_experts
    _, choices, _ = _heldout(model)
    k = _k_of(choices[0])
    if k < 2:
        raise ValueError("co-activation needs at least 2 experts per token; this model routes each token to 1")
    mats = [coactivation(ch, n) for ch in choices]
    chance = (k - 1) / (n - 1)
    layer, i, j = np.unravel_index(np.argmax(np.stack(mats)), (len(mats), n, n))
    top = mats[layer][i, j]
    pairs = top >= 2 * chance
    finding = (f"If the second expert were picked at random, each other expert would join {_pct(chance)} of the "
               f"time ((k-1)/(N-1) = {k - 1}/{n - 1}). The strongest pair: in layer {layer}, {_pct(top)} of the "
               f"tokens sent to expert {i} also go to expert {j}. " +
               ("Some experts work in pairs far more than chance." if pairs else
                "No pair stands out much: experts combine almost freely."))
    return {"numbers": {"coactivation": [m.tolist() for m in mats], "chance": chance,
                        "strongest": {"layer": int(layer), "from": int(i), "to": int(j), "share": float(top)}},
            "answer": 1 if pairs else 0, "finding": finding,
            "figure": {"kind": "heatmap", "x": [f"E{j}" for j in range(n)], "y": [f"E{j}" for j in range(n)],
                       "layer_values": [m.tolist() for m in mats], "baseline": chance,
                       "unit": "share also routed to", "layer": int(layer)}}


# ----------------------------------------------------------------------------- (e) router saturation


SATURATION_STEPS = 300       # the Training lab's default run (the lab plots the same curve for any run, live)


def saturation_curve(probes: list[list[np.ndarray]]) -> list[list[float]]:
    """OLMoE Fig. 20: for each probe (the router's top-k on fixed held-out tokens at one checkpoint), per
    layer the share of the final probe's top-k choices it already makes. [probe][layer]; the last is 1."""
    final = probes[-1]
    return [[topk_overlap(p, f) for p, f in zip(probe, final)] for probe in probes]


def saturation(model=None, steps: int = SATURATION_STEPS, run: tuple | None = None) -> dict:
    """A Training-lab run (the lab's small model, load-balancing loss) with its router probed every PROBE_EVERY
    steps, as the lab's Router saturation plot shows it live. `run`: (steps probed at, probes, top-k) of a run
    made elsewhere (the app passes the session's Training-lab run) instead of training one here."""
    if run is not None:
        return saturation_result(*run)
    recipe = Recipe(balancing="load_balance", steps=steps).validate()
    model_cfg = recipe.model_config()
    trainer = Trainer(model_cfg, recipe.train_config())
    x = probe_windows(model_cfg.block_size)
    probes, at = [], []
    while not trainer.done:
        trainer.step()
        if trainer.step_count % PROBE_EVERY == 0 or trainer.done:
            probes.append(probe_choices(trainer.model, x))
            at.append(trainer.step_count)
    return saturation_result(at, probes, model_cfg.top_k)


def saturation_result(at: list[int], probes: list[list[np.ndarray]], top_k: int) -> dict:
    """The saturation experiment's result for a finished run probed at steps `at` (the CLI's own run, or the
    Training lab's: the Experiments tab reads the session's latest lab run)."""
    if len(probes) < 2:
        raise ValueError("router saturation needs a run probed at least twice (20 steps or more)")
    steps = at[-1]
    curve = saturation_curve(probes)
    mean = [float(np.mean(c)) for c in curve]
    layers = range(len(curve[0]))
    # per layer, the step from which the router keeps making at least 90% of its final choices
    settle = [next(at[j] for j in range(len(at)) if all(c[i] >= 0.9 for c in curve[j:])) for i in layers]
    settled = max(settle) <= steps // 2
    finding = (f"After {at[0]} of {steps} steps the router already makes {_pct(mean[0])} of its final "
               f"top-{top_k} choices (mean over layers), {_pct(mean[len(mean) // 2])} at step {at[len(at) // 2]}. "
               f"Each layer keeps at least 90% of them from then on: " +
               ", ".join(f"layer {i} from step {s}" for i, s in enumerate(settle)) + ". " +
               ("Every layer settles in the first half, and the experts keep learning under a fixed routing, "
                "as OLMoE found." if settled else "Not every layer has settled by half-way: routing keeps "
                "changing late into this run."))
    return {"numbers": {"steps": at, "overlap_with_final": curve, "mean": mean, "settled_from": settle},
            "answer": 0 if settled else 1, "finding": finding,
            "figure": {"kind": "lines", "x": at, "x_label": "training step", "mark": steps / 2, "mark_label": "half-way",
                       "series": {f"layer {i}": [c[i] for c in curve] for i in range(len(curve[0]))},
                       "unit": "share of final top-k"}}


# ----------------------------------------------------------------------------- (f) learned vs hash


def learned_vs_hash(model=None) -> dict:
    """moe-n8 and moe-n8-nobalance (learned routers, with and without balancing losses) against moe-n8-hash:
    the same size, data, steps and seed, routed by a fixed hash of the token id; and moe-n8 routed by the
    hash without being trained for it."""
    runs = {"learned (moe-n8)": ("moe-n8", None), "learned, no balancing loss (moe-n8-nobalance)": ("moe-n8-nobalance", None),
            "hash (moe-n8-hash)": ("moe-n8-hash", None), "moe-n8 routed by the hash, untrained for it": ("moe-n8", "hash")}
    rows = {}
    for label, (name, scheme) in runs.items():
        m = load(name)
        request = None if scheme is None else RoutingRequest.make(m.config, scheme)
        ids, choices, loss = _heldout(m, request)
        n = m.config.n_experts
        rows[label] = {"model": name, "scheme": scheme or m.config.scheme, "loss": loss,
                       "jain": float(np.mean([jain(shares(c, n)) for c in choices]))}
    labels = list(rows)
    learned = min(labels[:2], key=lambda k: rows[k]["loss"])
    hashed, swapped = rows[labels[2]], rows[labels[3]]
    better = "learned" if rows[learned]["loss"] < hashed["loss"] else "hash"
    losses = ", ".join(f"{k} {v['loss']:.3f}" for k, v in list(rows.items())[:3])
    finding = (f"Held-out loss, nats per token: {losses}. "
               f"The better learned router is {'ahead' if better == 'learned' else 'behind'} by "
               f"{abs(rows[learned]['loss'] - hashed['loss']):.3f}: at this size and training, {better} routing wins. "
               f"Balance (Jain's index, 1 = even): learned {rows[labels[0]]['jain']:.3f}, hash {hashed['jain']:.3f}. "
               f"Routing moe-n8 by the hash instead of its own router costs {swapped['loss'] - rows[labels[0]]['loss']:+.3f}: "
               f"its experts learned from the tokens its router sent them.")
    return {"numbers": rows, "answer": 0 if better == "learned" else 1, "finding": finding,
            "figure": {"kind": "bars", "scale": "row",
                       "categories": ["held-out loss (nats, lower is better)", "Jain's balance index (1 = even)"],
                       "series": {k: [v["loss"], v["jain"]] for k, v in rows.items()}, "unit": "value"}}


# ----------------------------------------------------------------------------- (g) fewer experts


@torch.no_grad()
def reap_saliency(model) -> tuple[np.ndarray, np.ndarray, float]:
    """REAP (Lasby et al. 2025, arXiv:2510.13999): per layer and expert, the mean over the held-out tokens
    routed to it of (router weight x norm of the expert's output). Returns (saliency [layer, expert], tokens
    per expert [layer, expert], held-out loss), all from one pass; an expert no token reached scores 0."""
    net = _net(model)
    inputs = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, (args[0], out[1])))
             for i, layer in enumerate(net.moe_layers)]
    try:
        x, y = heldout_windows(HELDOUT_TOKENS, net.config.block_size)
        device = next(net.parameters()).device
        _, loss = forward_windows(net, x.to(device), y.to(device), None)
    finally:
        for h in hooks:
            h.remove()
    saliency = np.zeros((len(net.moe_layers), net.config.n_experts))
    counts = np.zeros_like(saliency)
    for i, layer in enumerate(net.moe_layers):
        h, r = inputs[i]
        h = h.reshape(-1, layer.d_model).to(layer.experts.w_in.dtype)
        for e in range(layer.n_experts):
            rows, slot = torch.where(r.indices == e)
            counts[i, e] = len(rows)
            if len(rows):
                norms = layer.experts.expert(e, h[rows]).float().norm(dim=-1)
                saliency[i, e] = float((r.weights[rows, slot].float() * norms).mean())
    return saliency, counts, loss


def _loss_without(net, off: dict[int, list[int]]) -> float:
    """Held-out loss of `net` with the experts `off` ({layer: [experts]}) switched off."""
    return _heldout(net, RoutingRequest.make(net.config, disabled_experts=off))[2]


def merged(model, off: dict[int, list[int]], counts: np.ndarray):
    """A copy of the model in which each expert of `off` is merged into the kept expert of its layer whose
    router row is most alike (cosine): that expert's weights become the token-count-weighted average of
    the two (frequency-weighted merging, as in M-SMoE, Li et al. 2024, arXiv:2310.01334). The merged-away
    experts are switched off, so their tokens go to the kept experts."""
    net = copy.deepcopy(_net(model))
    counts = counts.copy()
    for i, gone in off.items():
        layer = net.moe_layers[i]
        keep = [e for e in range(layer.n_experts) if e not in gone]
        rows = torch.nn.functional.normalize(layer.router.weight.float(), dim=-1)
        for e in gone:
            into = keep[int((rows[keep] @ rows[e]).argmax())]
            a, b = counts[i, e], counts[i, into]
            wa, wb = a / max(a + b, 1), b / max(a + b, 1)
            for w in (layer.experts.w_in, layer.experts.w_out):
                w.data[into] = wa * w.data[e] + wb * w.data[into]
            counts[i, into] = a + b                      # a second expert merged here weighs against both
    return net


def prune(model=None, remove: int = PRUNE_AWAY) -> dict:
    model = model or load("moe-n8")
    net = _net(model)
    n = net.config.n_experts
    keep = n - remove
    if not 1 <= keep < n:
        raise ValueError(f"removing {remove} of the model's {n} experts per layer must leave between 1 and {n - 1}")
    saliency, counts, base = reap_saliency(model)
    by_reap = {i: sorted(np.argsort(s, kind="stable")[:remove].tolist()) for i, s in enumerate(saliency)}
    by_count = {i: sorted(np.argsort(c, kind="stable")[:remove].tolist()) for i, c in enumerate(counts)}
    rng = np.random.default_rng(0)
    randoms = [{i: sorted(rng.choice(n, remove, replace=False).tolist()) for i in range(len(saliency))}
               for _ in range(RANDOM_DRAWS)]
    # (the choice of EXPERIMENTS["prune"] each method answers, its label, its held-out loss)
    methods = [(0, "REAP saliency (prune)", _loss_without(net, by_reap)),
               (3, "fewest tokens (prune)", _loss_without(net, by_count)),
               (1, f"random (prune, mean of {RANDOM_DRAWS})", float(np.mean([_loss_without(net, r) for r in randoms]))),
               (2, "REAP saliency (merge)", _loss_without(merged(net, by_reap, counts), by_reap))]
    change = {label: loss - base for _, label, loss in methods}
    answer, best, _ = min(methods, key=lambda m: m[2])
    finding = (f"With all {n} experts the held-out loss is {base:.3f} nats. Keeping {keep} per layer: " +
               "; ".join(f"{k} {v:+.3f}" for k, v in change.items()) + f". Least harm: {best}.")
    return {"numbers": {"base_loss": base, "loss": {label: loss for _, label, loss in methods}, "change": change,
                        "keep": keep, "experts": n, "removed": {"REAP saliency": by_reap, "fewest tokens": by_count},
                        "saliency": saliency.tolist()},
            "answer": answer, "finding": finding,
            "figure": {"kind": "bars", "categories": list(change),
                       "series": {"loss change (nats)": list(change.values())}, "unit": "nats"}}


# ----------------------------------------------------------------------------- the list


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment("same_token", "Same token, different contexts",
               "One token (the one to follow; ' the' to start) appears in many sentences of the held-out text. Does "
               "the router send it to the same first expert every time?",
               ("Yes, always the same", "Mostly the same, but not always", "No, it changes with the context"),
               "chuk-mlx moe-expert: one token in several contexts", same_token),
    Experiment("domains", "Is there a code expert?",
               "Code, English, numbers and other languages are routed through the same experts. Is one of them a "
               "code expert: twice its even share of code's routings, and twice what it takes of any other domain?",
               ("Yes, there is a code expert", "No, code spreads over the experts like every domain"),
               "OLMoE (arXiv:2409.02060) Fig. 22: domain specialisation", domains),
    Experiment("token_ids", "Does routing follow the token?",
               "Count where each token id goes, over its occurrences. Is a token id's favourite expert chosen "
               "more often than chance?", ("About as often as chance (k/N)", "Far more often than chance"),
               "OLMoE (arXiv:2409.02060) Fig. 23: token-ID specialisation", token_ids),
    Experiment("coactivation", "Which experts work together?",
               "Each token uses k experts. Are the pairs random, or do some experts go together?",
               ("The pairs look random", "Some experts pair up far more than chance"),
               "OLMoE (arXiv:2409.02060) Fig. 21: expert co-activation", coactivations),
    Experiment("saturation", "When does routing settle?",
               "During training, does the router decide early which expert gets which token, or does it keep "
               "changing until the end?", ("Every layer settles in the first half", "Some layer settles only after half-way"),
               "OLMoE (arXiv:2409.02060) Fig. 20: router saturation", saturation, needs_training=True),
    Experiment("learned_vs_hash", "Learned router or a hash?",
               "moe-n8-hash has the same size and training as moe-n8, but a fixed hash of the token id picks its "
               "experts: no learned router. Which reaches the lower held-out loss?", ("The learned router", "The hash"),
               "Roller et al. 2021, Hash Layers (arXiv:2106.04426)", learned_vs_hash),
    Experiment("prune", "Fewer experts after training",
               f"Remove {PRUNE_AWAY} experts from every layer of the model, without retraining. Which choice hurts "
               f"the held-out loss least?",
               ("Prune the least salient (REAP)", "Prune at random", "Merge the least salient into a neighbour",
                "Prune the least used"),
               "Lasby et al. 2025, REAP (arXiv:2510.13999)", prune),
]}


OWN_MODELS = {"learned_vs_hash": "moe-n8, moe-n8-nobalance and moe-n8-hash",
              "saturation": "a Training-lab run"}


def run_experiment(name: str, model=None, **options) -> dict:
    """Run one experiment on `model` (a LoadedModel; default moe-n8): its result with the name, title, question,
    choices and source added. The learned-vs-hash, prune and saturation experiments use their own models."""
    if not isinstance(name, str) or name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    e = EXPERIMENTS[name]
    model = model if model is not None or name in OWN_MODELS else load("moe-n8")
    result = e.run(model, **options)
    return {"name": e.name, "title": e.title, "question": e.question, "choices": list(e.choices),
            "source": e.source, "model": getattr(model, "name", None), **result}
