"""Predict-then-reveal questions, answered by the live model (no Panel or Bokeh imports).

A quiz question is only worth asking if the student can check it against the
real thing. So no answer here is typed in by hand: every `Question` carries a
`solve` function that loads the shipped checkpoint named in its `setup`, routes
a fixed text with `moe_core.inference.route_text` (or counts parameters with
`moe_core.model.params.count_params`), and derives the correct option or number from
what the model actually did. Retrain a checkpoint and the answers follow.

    quiz = QuizState()
    quiz.prompt()                  # the current question, live numbers filled in
    fb = quiz.check(3)             # option index (or label) / a number for numeric questions
    fb.correct, fb.answer, fb.explanation
    quiz.next()

Each question's `setup` ({n_experts, balancing, scheme, top_k, capacity_factor,
text, layer, model}) is what the Router tab needs to show the same thing:
`apply_setup(router_state, setup)` applies it to a `RouterState`.

Routing results are cached per (model, text, routing options): same inputs,
same deterministic forward pass, same answer.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import param
import torch

from moe_core.analysis.metrics import balance_metrics
from moe_core.analysis.profiles import load_profiles
from moe_core.data.categories import COARSE_CATEGORIES, coarse_category
from moe_core.inference import route_text
from moe_core.model.checkpoint import LoadedModel, load
from moe_core.model.layer import MoELayer
from moe_core.model.params import count_params
from moe_core.model.request import RoutingRequest, resolve
from moe_core.model.routing import SCHEMES

from .lessons import fill
from .state import catalog

# ----------------------------------------------------------------------------- fixed texts
# Each question routes one of these fixed texts, so an answer is reproducible in the Router tab.

DIGITS_TEXT = "Invoice 4471, 2023-11-05: 12 boxes at 38.50 each, 462.00 in total. Call 555-0199 before 17:30."
PROSE_TEXT = ("The ferry left the harbour at half past six, later than anyone had promised. Mara stood at the rail "
              "with her brother's old camera, watching the lighthouse shrink until it was only a blink of white "
              "against the grey. Nobody on deck spoke much; the wind took every word away.")
MATHS_PARAGRAPH = ("Theorem 2. For every prime p > 3, the number p^2 - 1 is divisible by 24. Proof: write p = 6m + 1 "
                   "or p = 6m + 5; then p^2 - 1 = 12m(3m + 2) or 12(3m^2 + 5m + 2), and 8 divides it.\n")
BIOLOGY_PARAGRAPH = ("In mitosis a human cell with 46 chromosomes copies its DNA, lines up 92 chromatids on the "
                     "spindle and splits into 2 daughter cells; meiosis halves the count to 23, so each egg "
                     "carries 23 chromosomes.\n")
MIXED_TEXT = MATHS_PARAGRAPH + BIOLOGY_PARAGRAPH


# ----------------------------------------------------------------------------- models and routing


def model_entry(name: str) -> dict:
    """The catalog entry (n_experts, balancing label, scheme, ...) of a shipped checkpoint."""
    for m in catalog():
        if m["name"] == name:
            return m
    raise ValueError(f"the quiz needs the checkpoint {name!r}, which is not in assets/checkpoints")


def make_setup(name: str, text: str, *, layer: int = 0, scheme: str | None = None, top_k: int | None = None,
               capacity_factor: float | None = None) -> dict:
    """A complete, explicit setup: the model's trained routing unless told otherwise."""
    m = model_entry(name)
    scheme = scheme or m["scheme"]
    s = SCHEMES[scheme]
    if s.uses_k:
        top_k = top_k or (m["top_k"] if SCHEMES[m["scheme"]].uses_k else 2)
    else:
        top_k = None
    if s.uses_capacity:
        if capacity_factor is None:
            capacity_factor = m["capacity_factor"] if scheme == m["scheme"] and m["capacity_factor"] else \
                s.default_capacity_factor
        capacity_factor = float(capacity_factor)
    else:
        capacity_factor = None
    return {"model": name, "n_experts": m["n_experts"], "balancing": m["balancing"], "scheme": scheme,
            "top_k": top_k, "capacity_factor": capacity_factor, "text": text, "layer": layer}


def setup_request(setup: dict) -> RoutingRequest:
    """How a setup routes (its model's request for the setup's scheme, k and capacity factor)."""
    return RoutingRequest.make(load(setup["model"]).config, setup["scheme"], setup.get("top_k"),
                               setup.get("capacity_factor"))


def describe_setup(setup: dict) -> str:
    """One plain-text line: which model, routing and layer a question uses."""
    s = SCHEMES[setup["scheme"]]
    bits = [f"{setup['model']} (N = {setup['n_experts']}, {setup['balancing']})", s.label]
    if setup.get("top_k") is not None:
        bits.append(f"k = {setup['top_k']}")
    if setup.get("capacity_factor") is not None:
        bits.append(f"capacity factor {setup['capacity_factor']:g}")
    bits.append(f"layer {setup['layer']}")
    return ", ".join(bits)


_ROUTE_CACHE: OrderedDict = OrderedDict()
_ROUTE_CACHE_MAX = 32
_BIAS_FREE: dict = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget cached routings (tests do this after swapping the model or route_text)."""
    with _cache_lock:
        _ROUTE_CACHE.clear()
    with _cache_lock:
        _BIAS_FREE.clear()


def routed(model: LoadedModel, text: str, request: RoutingRequest | None = None, **choices):
    """route_text with a small LRU cache: the forward pass is deterministic in eval mode."""
    request = resolve(model.config, request, **choices)
    key = (model.name, id(model.model), text, request)
    with _cache_lock:
        if key in _ROUTE_CACHE:
            _ROUTE_CACHE.move_to_end(key)
            return _ROUTE_CACHE[key]
    res = route_text(model, text, request)
    with _cache_lock:
        _ROUTE_CACHE[key] = res
        while len(_ROUTE_CACHE) > _ROUTE_CACHE_MAX:
            _ROUTE_CACHE.popitem(last=False)
    return res


def route_setup(setup: dict):
    return routed(load(setup["model"]), setup["text"], setup_request(setup))


def _bias_free(model: LoadedModel) -> LoadedModel:
    """A copy of `model` with every DeepSeek selection bias set to 0 (weights untouched)."""
    key = (model.name, id(model.model))
    with _cache_lock:
        if key not in _BIAS_FREE:
            net = copy.deepcopy(model.model)
            for m in net.modules():
                if isinstance(m, MoELayer):
                    m.expert_bias.zero_()
            _BIAS_FREE[key] = dataclasses.replace(model, name=f"{model.name} (bias set to 0)", model=net)
        return _BIAS_FREE[key]


def _moe_layers(model: LoadedModel) -> list[MoELayer]:
    return [m for m in model.model.modules() if isinstance(m, MoELayer)]


# ----------------------------------------------------------------------------- questions


@dataclass
class Live:
    """What the model really did: the correct answer and the numbers behind it."""

    answer: int | float           # option index (choice) or the true number (number)
    numbers: dict                 # filled into the prompt and the explanation


@dataclass(frozen=True)
class Question:
    id: str
    title: str                    # a few words, shown above the prompt
    prompt: str                   # str.format template; may use Live.numbers that do not give the answer away
    kind: str                     # "choice" | "number"
    predicts: str                 # the lesson the prediction tests
    setup: dict                   # model, routing, text and layer (see make_setup)
    solve: Callable[["Question"], Live] = field(repr=False, compare=False)
    explanation: str = ""         # str.format template over Live.numbers
    options: tuple[str, ...] = ()  # for "choice"
    rel_tolerance: float = 0.0    # for "number": |given - true| <= max(abs, rel * |true|)
    abs_tolerance: float = 0.0
    source: str = "Computed live from the shipped checkpoint."

    def __post_init__(self):
        if self.kind not in ("choice", "number"):
            raise ValueError(f"question kind must be 'choice' or 'number', got {self.kind!r}")
        if self.kind == "choice" and len(self.options) < 2:
            raise ValueError(f"choice question {self.id!r} needs at least 2 options")

    def tolerance_text(self) -> str:
        """How close a numeric prediction must be, in words."""
        parts = []
        if self.rel_tolerance:
            parts.append(f"{self.rel_tolerance:.0%}")
        if self.abs_tolerance:
            parts.append(f"{self.abs_tolerance:g}")
        return "within " + " or ".join(parts) + " counts" if parts else "exact answers only"

    def within(self, given: float, true: float) -> bool:
        return abs(given - true) <= max(self.abs_tolerance, self.rel_tolerance * abs(true)) + 1e-9


def _first_choice(res, layer: int) -> list[int]:
    """The router's first choice per token (before capacity), as in the token view's colours."""
    return res.routings[layer].choices[:, 0].tolist()


def solve_digits_expert(q: Question) -> Live:
    res = route_setup(q.setup)
    layer, N = q.setup["layer"], q.setup["n_experts"]
    top1 = _first_choice(res, layer)
    digits = [e for t, e in zip(res.tokens, top1) if coarse_category(t.text) == "digit"]
    if not digits:
        raise ValueError("the digits question's text has no digit tokens")
    counts = torch.bincount(torch.tensor(digits), minlength=N)
    order = sorted(range(N), key=lambda e: (-int(counts[e]), e))   # ties: lowest expert index
    e, runner = order[0], order[1]
    runner_text = (f"the next one, expert {runner}, took {int(counts[runner])}" if counts[runner]
                   else "no other expert was the first choice for any of them")
    return Live(e, {"expert": e, "n_expert": int(counts[e]), "n_digits": len(digits), "runner_text": runner_text,
                    "share": int(counts[e]) / len(digits), "runner": runner, "n_runner": int(counts[runner]),
                    "n_tokens": len(res.tokens), "n_experts": N, "layer": layer})


def _param_numbers(name: str) -> dict:
    m = load(name)
    k = m.config.top_k
    base = count_params(m.model, top_k=k)
    big = count_params(m.model, top_k=2 * k)
    layers = _moe_layers(m)
    return {"k": k, "k2": 2 * k, "n": m.config.n_experts, "total": base.total, "total_k2": big.total,
            "active": base.active_per_token, "active_k2": big.active_per_token,
            "per_expert": layers[0].experts.params_per_expert(), "n_moe": len(layers), "extra": k,
            "model": name}


def solve_total_k(q: Question) -> Live:
    nums = _param_numbers(q.setup["model"])
    ratio = nums["total_k2"] / nums["total"]
    answer = 2 if nums["total_k2"] == nums["total"] else 0 if ratio > 1.8 else 1 if ratio > 1 else 3
    return Live(answer, {**nums, "ratio": ratio})


def solve_active_k(q: Question) -> Live:
    nums = _param_numbers(q.setup["model"])
    return Live(nums["active_k2"], nums)


def solve_double_n(q: Question) -> Live:
    small, big = load(q.setup["compare_with"]), load(q.setup["model"])
    k = small.config.top_k
    a, b = count_params(small.model, top_k=k), count_params(big.model, top_k=k)
    total_ratio, active_ratio = b.total / a.total, b.active_per_token / a.active_per_token
    grows_total, grows_active = total_ratio >= 1.25, active_ratio >= 1.25
    answer = {(True, False): 0, (True, True): 1, (False, True): 2, (False, False): 3}[(grows_total, grows_active)]
    return Live(answer, {"n_small": small.config.n_experts, "n_big": big.config.n_experts, "k": k,
                         "total_small": a.total, "total_big": b.total, "total_ratio": total_ratio,
                         "active_small": a.active_per_token, "active_big": b.active_per_token,
                         "active_diff": b.active_per_token - a.active_per_token, "active_ratio": active_ratio,
                         "small": small.name, "big": big.name})


SHARE_BINS = (0.2, 0.4, 0.6)


def solve_nobalance_share(q: Question) -> Live:
    layer = q.setup["layer"]
    res = route_setup(q.setup)
    m = balance_metrics(res.routings[layer])
    share = m["top1_max_share"]
    top1 = _first_choice(res, layer)
    busiest = Counter(top1).most_common(1)[0][0]
    answer = sum(share >= b for b in SHARE_BINS)
    balanced = q.setup.get("compare_with")
    nums = {"share": share, "busiest": busiest, "n_tokens": len(res.tokens), "n_experts": q.setup["n_experts"],
            "fair": 1 / q.setup["n_experts"], "layer": layer, "balanced": balanced, "balanced_share": float("nan")}
    if balanced:
        ref = routed(load(balanced), q.setup["text"])
        nums["balanced_share"] = balance_metrics(ref.routings[layer])["top1_max_share"]
        for key, name in (("corpus_share", q.setup["model"]), ("balanced_corpus_share", balanced)):
            experts = load_profiles(load(name))["layers"][layer]["experts"]
            nums[key] = max(e["share_first"] for e in experts)
    return Live(answer, nums)


def solve_switch_drops(q: Question) -> Live:
    layer, N = q.setup["layer"], q.setup["n_experts"]
    res = route_setup(q.setup)
    r = res.routings[layer]
    T = len(res.tokens)
    dropped = int(r.dropped.any(1).sum())
    chosen = torch.bincount(torch.tensor(_first_choice(res, layer)), minlength=N)
    busiest = int(chosen.argmax())
    trained = load(q.setup["model"]).config.capacity_factor
    nums = {"dropped": dropped, "n_tokens": T, "drop_share": dropped / T, "capacity": r.capacity,
            "slots": N * r.capacity, "min_dropped": max(0, T - N * r.capacity), "n_experts": N,
            "busiest": busiest, "busiest_n": int(chosen[busiest]), "cf": q.setup["capacity_factor"],
            "layer": layer, "cf_trained": trained, "dropped_trained": None}
    if trained:
        ref = routed(load(q.setup["model"]), q.setup["text"], scheme=q.setup["scheme"], capacity_factor=trained)
        nums["dropped_trained"] = int(ref.routings[layer].dropped.any(1).sum())
    return Live(dropped, nums)


def solve_ec_zero(q: Question) -> Live:
    layer = q.setup["layer"]
    res = route_setup(q.setup)
    r = res.routings[layer]
    per_token = r.dispatch.sum(1)
    n_zero = int((per_token == 0).sum())
    return Live(0 if n_zero else 1, {
        "n_zero": n_zero, "n_tokens": len(res.tokens), "n_multi": int((per_token >= 2).sum()),
        "max_experts": int(per_token.max()), "capacity": r.capacity, "layer": layer,
        "trained_scheme": SCHEMES[load(q.setup["model"]).config.scheme].label})


def solve_topic_or_kind(q: Question) -> Live:
    """Is the expert that takes most of the maths paragraph a 'maths expert', or a token-kind expert?

    A topic expert would take maths tokens and leave the biology tokens of the SAME kind
    alone; a kind expert takes that kind of token in both paragraphs alike.
    """
    layer = q.setup["layer"]
    res = route_setup(q.setup)
    top1 = _first_choice(res, layer)
    split = len(MATHS_PARAGRAPH)
    para = ["maths" if t.start < split else "biology" for t in res.tokens]
    kinds = [coarse_category(t.text) for t in res.tokens]
    maths_top1 = Counter(e for e, p in zip(top1, para) if p == "maths")
    x = min(maths_top1, key=lambda e: (-maths_top1[e], e))
    mine = [i for i, e in enumerate(top1) if e == x]
    kind = min(COARSE_CATEGORIES, key=lambda c: (-sum(kinds[i] == c for i in mine), COARSE_CATEGORIES.index(c)))

    def rate(paragraph: str, only_kind: bool) -> tuple[int, int]:
        pool = [i for i in range(len(top1)) if para[i] == paragraph and (not only_kind or kinds[i] == kind)]
        return sum(top1[i] == x for i in pool), len(pool)

    (km, kn_m), (kb, kn_b) = rate("maths", True), rate("biology", True)
    (am, an_m), (ab, an_b) = rate("maths", False), rate("biology", False)
    r_km, r_kb = km / max(kn_m, 1), (kb / kn_b if kn_b else 0.0)
    r_am, r_ab = am / max(an_m, 1), ab / max(an_b, 1)
    if kn_b and min(r_km, r_kb) >= 0.5:
        answer = 1                         # takes this kind of token in both paragraphs
    elif r_am >= 2 * r_ab and r_kb < 0.5 * r_km:
        answer = 0                         # takes maths tokens, not the same kind in biology
    else:
        answer = 2
    examples = [res.tokens[i].text for i in mine][:12]
    kind_share = sum(kinds[i] == kind for i in mine) / len(mine)
    return Live(answer, {"expert": x, "kind": kind, "n_mine": len(mine),
                         "kind_share": kind_share,
                         "k_maths": km, "n_kind_maths": kn_m, "k_bio": kb, "n_kind_bio": kn_b,
                         "rate_kind_maths": r_km, "rate_kind_bio": r_kb, "rate_maths": r_am, "rate_bio": r_ab,
                         "n_maths_x": am, "n_maths": an_m, "layer": layer,
                         "examples": " ".join(repr(t) for t in examples)})


def solve_deepseek_bias(q: Question) -> Live:
    """Route with the learned bias and with the bias set to 0; compare layer `layer` (same input there
    only for layer 0: later layers see inputs that already differ)."""
    layer = q.setup["layer"]
    model = load(q.setup["model"])
    req = setup_request(q.setup)
    with_bias = routed(model, q.setup["text"], req).routings[layer]
    without = routed(_bias_free(model), q.setup["text"], req).routings[layer]
    sets_b = [frozenset(e for e in row if e >= 0) for row in with_bias.indices.tolist()]
    sets_0 = [frozenset(e for e in row if e >= 0) for row in without.indices.tolist()]
    changed = sum(a != b for a, b in zip(sets_b, sets_0))
    same = [i for i, (a, b) in enumerate(zip(sets_b, sets_0)) if a == b]
    wdiff = float((with_bias.combine[same] - without.combine[same]).abs().max()) if same else 0.0
    weights_change = wdiff > 1e-5
    answer = {(True, False): 0, (False, True): 1, (True, True): 2, (False, False): 3}[(changed > 0, weights_change)]
    bias = _moe_layers(model)[layer].expert_bias
    return Live(answer, {"n_changed": changed, "n_tokens": len(sets_b), "max_weight_diff": wdiff, "layer": layer,
                         "bias_min": float(bias.min()), "bias_max": float(bias.max())})


def question_bank() -> list[Question]:
    """The questions whose checkpoints are shipped, in teaching order."""
    qs: list[Question] = []

    def add(build):
        try:
            qs.append(build())
        except ValueError:      # its checkpoint is missing: skip the question rather than fake it
            pass

    add(lambda: Question(
        "digits_expert", "Who takes the digits?",
        "Route this invoice line through {model}. In layer {layer}, which expert will be the router's FIRST "
        "choice for most of its digit tokens (0-9, one token each)?",
        "choice", "Experts specialise in kinds of tokens the router learned to tell apart, like digits.",
        make_setup("moe-n8", DIGITS_TEXT), solve_digits_expert,
        "Expert {expert} was the first choice for {n_expert} of the {n_digits} digit tokens ({share:.0%}); "
        "{runner_text}. Nobody told the router what a digit is: it learned to send "
        "this kind of token to the same expert.",
        options=tuple(f"Expert {e}" for e in range(model_entry("moe-n8")["n_experts"])),
    ))
    add(lambda: Question(
        "total_k", "Memory when k doubles",
        "{model} sends each token to k = {k} of its {n} experts per layer, and stores {total:,} parameters. "
        "Raise k to {k2}: what happens to the TOTAL parameters (what must sit in memory)?",
        "choice", "Memory follows N, not k.",
        make_setup("moe-n8", PROSE_TEXT, top_k=4), solve_total_k,
        "Total parameters: {total:,} at k = {k}, {total_k2:,} at k = {k2}. k only decides how many of the "
        "stored experts a token runs; every expert was already in memory.",
        options=("It roughly doubles", "It grows a little", "It stays exactly the same", "It halves"),
    ))
    add(lambda: Question(
        "active_k", "Compute when k doubles",
        "At k = {k}, {active:,} of the {total:,} parameters of {model} are active per token. How many parameters "
        "are active per token if k goes to {k2}?",
        "number", "Active parameters (compute per token) follow k.",
        make_setup("moe-n8", PROSE_TEXT, top_k=4), solve_active_k,
        "{active_k2:,}. Each token now runs {extra} more experts in each of the {n_moe} MoE layers, "
        "{per_expert:,} weights each: {active:,} + {extra} \u00d7 {n_moe} \u00d7 {per_expert:,} = {active_k2:,}. "
        "The total stays {total:,}.",
        rel_tolerance=0.02,
    ))
    add(lambda: Question(
        "double_n", "Twice the experts",
        "moe-n8 and moe-n16 are the same transformer with N = 8 and N = 16 experts per layer, both routing "
        "each token to k = 2 experts. Going from N = 8 to N = 16, what happens?",
        "choice", "Total parameters are not active parameters: memory follows N, compute follows k.",
        {**make_setup("moe-n16", PROSE_TEXT), "compare_with": "moe-n8"}, solve_double_n,
        "Total: {total_small:,} \u2192 {total_big:,} (\u00d7{total_ratio:.2f}; not \u00d72 because attention and "
        "embeddings do not grow with N). Active per token: {active_small:,} \u2192 {active_big:,} "
        "(+{active_diff:,}: only the router's extra columns), because every token still runs k = {k} experts.",
        options=("Total grows a lot; active per token barely moves", "Both total and active grow a lot",
                 "Active grows a lot; total barely moves", "Neither changes much"),
    ))
    add(lambda: Question(
        "nobalance_share", "A router left alone",
        "{model} was trained with NO balancing loss. Route this paragraph: in layer {layer}, what share of the "
        "{n_tokens} tokens have its busiest expert as their FIRST choice? (A perfectly even router: 1/{n_experts} "
        "= {fair:.1%}.)",
        "choice", "A router trained without balancing collapses onto a few experts.",
        {**make_setup("moe-n8-nobalance", PROSE_TEXT), "compare_with": "moe-n8"}, solve_nobalance_share,
        "Expert {busiest} was the first choice of {share:.0%} of the {n_tokens} tokens (fair share {fair:.1%}). "
        "On the same text, {balanced} (trained with the load-balancing loss) gives its busiest expert "
        "{balanced_share:.0%}: one text can be lopsided either way, because balance is trained over mixed batches, "
        "not within one text (Qwen, arXiv:2501.11873). Over the held-out corpus the busiest expert takes "
        "{corpus_share:.0%} without balancing and {balanced_corpus_share:.0%} with it. Without a balancing term, "
        "the experts that get ahead early get more tokens, train faster and get chosen even more (Shazeer et al. "
        "2017, arXiv:1701.06538, \u00a74).",
        options=("Under 20% (close to fair)", "20% to 40%", "40% to 60%", "Over 60%"),
    ))
    add(lambda: Question(
        "switch_drops", "Too few slots",
        "{model} sends each token to ONE expert (Switch). With capacity factor {cf:g}, each of the {n_experts} "
        "experts has ceil({cf:g} \u00d7 {n_tokens} / {n_experts}) = {capacity} slots for this {n_tokens}-token "
        "paragraph. How many tokens are dropped (skip their expert) in layer {layer}?",
        "number", "A capacity factor below what the routing needs drops tokens.",
        make_setup("moe-n8-switch", PROSE_TEXT, capacity_factor=0.5), solve_switch_drops,
        "{dropped} of {n_tokens} tokens ({drop_share:.0%}) were dropped. The {n_experts} experts hold at most "
        "{slots} tokens, so at least {min_dropped} had to go; the rest were dropped because the router's choices "
        "are uneven (expert {busiest} was the first choice of {busiest_n} tokens for {capacity} slots). A dropped "
        "token skips the expert and only passes through the residual connection (Fedus et al. 2021, Switch "
        "Transformers, arXiv:2101.03961). At the trained capacity factor {cf_trained:g}, {dropped_trained} are "
        "dropped.",
        abs_tolerance=0.0, rel_tolerance=0.15,
    ))
    add(lambda: Question(
        "ec_zero", "When experts choose",
        "With Expert Choice routing, each expert picks its favourite tokens instead of each token picking "
        "experts. Routing this paragraph through {model} with capacity factor 1.0: can a token end up with "
        "ZERO experts in layer {layer}?",
        "choice", "Balancing by construction (Expert Choice) trades balance for coverage.",
        make_setup("moe-n8", PROSE_TEXT, scheme="expert_choice", capacity_factor=1.0), solve_ec_zero,
        "In layer {layer}, {n_zero} of the {n_tokens} tokens were picked by no expert (they only pass through "
        "the residual connection), while {n_multi} were picked by two or more (up to {max_experts}). Each expert "
        "takes exactly its {capacity} favourite tokens, so the load is perfectly even but coverage is not (Zhou "
        "et al. 2022, arXiv:2202.09368). The model was trained with {trained_scheme}; Expert Choice is applied "
        "here at inference time.",
        options=("Yes: some tokens get no expert at all", "No: every token gets at least one expert"),
    ))
    add(lambda: Question(
        "topic_or_kind", "A maths expert?",
        "This text is a maths paragraph followed by a biology paragraph. In layer {layer} of {model}, expert "
        "{expert} is the first choice of more maths-paragraph tokens than any other expert ({n_maths_x} of "
        "{n_maths}). What does expert {expert} specialise in?",
        "choice", "Experts specialise in kinds of tokens (syntax, learned surface patterns), not human subjects.",
        make_setup("moe-n8", MIXED_TEXT), solve_topic_or_kind,
        "Most of expert {expert}'s tokens are {kind} tokens ({kind_share:.0%} of its {n_mine}). It takes "
        "{k_maths} of the {n_kind_maths} {kind} tokens of the maths paragraph ({rate_kind_maths:.0%}) and "
        "{k_bio} of the {n_kind_bio} of the biology paragraph ({rate_kind_bio:.0%}). Its tokens: {examples}. "
        "Routers of trained MoE models group tokens by kind and syntax rather than by subject (Mixtral, "
        "Jiang et al. 2024, arXiv:2401.04088, \u00a75; ST-MoE, Zoph et al. 2022, arXiv:2202.08906).",
        options=("A topic: maths (it rarely takes biology tokens)",
                 "A kind of token, in both paragraphs alike (e.g. digits, spaces or punctuation)",
                 "No clear pattern"),
    ))
    add(lambda: Question(
        "deepseek_bias", "What the bias moves",
        "{model} was balanced the DeepSeek-V3 way: a per-expert bias (here between {bias_min:+.2f} and "
        "{bias_max:+.2f} in layer {layer}) is added to the router's scores, with no balancing loss. What does the "
        "bias change?",
        "choice", "Each balancing method fixes collapse differently: the DeepSeek bias steers selection only.",
        make_setup("moe-n8-bias", PROSE_TEXT), solve_deepseek_bias,
        "Routing this paragraph with the learned bias and again with the bias set to 0: {n_changed} of the "
        "{n_tokens} tokens in layer {layer} get a different set of experts, and the tokens that keep the same "
        "experts get the same weights (largest difference {max_weight_diff:.1e}). The bias is added only to pick "
        "the top-k; the weights come from the unbiased sigmoid scores (DeepSeek-V3 technical report 2024, "
        "arXiv:2412.19437, \u00a72.1.2).",
        options=("Which experts are chosen (the weights still come from the unbiased scores)",
                 "Only the weights the chosen experts get", "Both which experts and their weights",
                 "Nothing on this text"),
        source="Checked live (with and without the learned bias); the rule is from the DeepSeek-V3 technical "
               "report 2024, \u00a72.1.2.",
    ))
    return qs


def warm(questions: list[Question] | None = None) -> dict[str, float]:
    """Compute every question's answer once in this process (call it at server start, after preload_models).

    The routings land in the shared cache, so no student waits for a forward pass when a question is
    shown. Returns the milliseconds each question took (a question that fails is reported as NaN).
    """
    import time

    out = {}
    for q in questions if questions is not None else question_bank():
        t0 = time.perf_counter()
        try:
            q.solve(q)
            out[q.id] = (time.perf_counter() - t0) * 1e3
        except ValueError:
            out[q.id] = float("nan")
    return out


# ----------------------------------------------------------------------------- answers


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9}


def parse_number(value) -> float:
    """A student's number: 1414272, "1,414,272", "1.41M", "1 414 272". ValueError with a readable text."""
    if isinstance(value, bool):
        raise ValueError("type a number, e.g. 1,400,000")
    if isinstance(value, (int, float)):
        x = float(value)
    else:
        text = "" if value is None else str(value)
        s = re.sub(r"[\s,_\u00a0\u2009\u202f']", "", text)
        if not s:
            raise ValueError("type a number first, e.g. 1,400,000")
        scale = 1.0
        if s[-1].lower() in _SUFFIX:
            scale, s = _SUFFIX[s[-1].lower()], s[:-1]
        if not _NUMBER.match(s):
            shown = text if len(text) <= 40 else text[:40] + "\u2026"
            raise ValueError(f"{shown!r} is not a number: type digits, e.g. 1,400,000 or 1.4M")
        x = float(s) * scale
    if not math.isfinite(x):
        raise ValueError("the answer must be a finite number")
    if x < 0:
        raise ValueError("the answer cannot be negative here: it counts parameters or tokens")
    return x


def parse_choice(q: Question, value) -> int:
    """An option index (int) or the option's exact label."""
    if value is None or value == "":
        raise ValueError("choose one of the options first")
    if isinstance(value, bool):
        raise ValueError("choose one of the options")
    if isinstance(value, int):
        if 0 <= value < len(q.options):
            return value
        raise ValueError(f"choose one of the {len(q.options)} options (0 to {len(q.options) - 1}), got {value}")
    if isinstance(value, str) and value in q.options:
        return q.options.index(value)
    raise ValueError(f"choose one of the {len(q.options)} options")


def format_number(x: float) -> str:
    return f"{int(round(x)):,}" if abs(x - round(x)) < 1e-9 else f"{x:,.2f}"


@dataclass(frozen=True)
class Feedback:
    question_id: str
    correct: bool
    given: str            # the student's answer, as shown
    answer: str           # the live answer, as shown
    explanation: str      # filled with the real numbers
    lesson: str           # the idea the prediction tested (Question.predicts)
    numbers: dict
    source: str
    setup: dict


class QuizState(param.Parameterized):
    """Which question is shown, what the student answered, and the score (no widgets)."""

    index = param.Integer(default=0, bounds=(0, None), doc="Index of the question shown.")
    answers = param.Dict(default={}, doc="Question id -> Feedback of the student's latest answer to it.")
    score = param.Integer(default=0, doc="Questions answered correctly (latest answer to each).")
    answered = param.Integer(default=0, doc="Questions answered so far.")
    feedback = param.Parameter(default=None, doc="Feedback for the question shown, or None before checking.")

    def __init__(self, questions: list[Question] | None = None, **params):
        super().__init__(**params)
        self.questions = list(questions) if questions is not None else question_bank()
        if not self.questions:
            raise ValueError("the quiz has no questions: no shipped checkpoints were found")
        self.param.index.bounds = (0, len(self.questions) - 1)
        self._live: dict[str, Live] = {}

    @property
    def current(self) -> Question:
        return self.questions[self.index]

    def live(self, q: Question | None = None) -> Live:
        """The model's answer to `q` (computed once per quiz; routings are cached across quizzes too)."""
        q = q or self.current
        if q.id not in self._live:
            self._live[q.id] = q.solve(q)
        return self._live[q.id]

    def prompt(self, q: Question | None = None) -> str:
        q = q or self.current
        return fill(q.prompt, {**q.setup, **self.live(q).numbers})

    def answer_text(self, q: Question, live: Live) -> str:
        return q.options[int(live.answer)] if q.kind == "choice" else format_number(live.answer)

    def check(self, answer) -> Feedback:
        """Score `answer` to the current question against the live model. ValueError on bad input."""
        q = self.current
        if q.kind == "choice":
            given = parse_choice(q, answer)
            live = self.live(q)
            correct, given_text = given == int(live.answer), q.options[given]
        else:
            given = parse_number(answer)
            live = self.live(q)
            correct, given_text = q.within(given, float(live.answer)), format_number(given)
        fb = Feedback(q.id, correct, given_text, self.answer_text(q, live),
                      fill(q.explanation, {**q.setup, **live.numbers}), q.predicts, dict(live.numbers), q.source,
                      dict(q.setup))
        answers = {**self.answers, q.id: fb}
        self.param.update(answers=answers, feedback=fb, answered=len(answers),
                          score=sum(f.correct for f in answers.values()))
        return fb

    def go(self, index: int) -> None:
        if not 0 <= index < len(self.questions):
            raise ValueError(f"there are {len(self.questions)} questions; question {index + 1} does not exist")
        self.param.update(index=index, feedback=self.answers.get(self.questions[index].id))

    def next(self) -> None:
        self.go(min(self.index + 1, len(self.questions) - 1))

    def previous(self) -> None:
        self.go(max(self.index - 1, 0))

    @property
    def finished(self) -> bool:
        return self.answered == len(self.questions)

    def score_text(self) -> str:
        return f"{self.score} / {self.answered}"

    def reset(self) -> None:
        """Start again (the live answers stay cached: the model has not changed)."""
        self.param.update(index=0, answers={}, score=0, answered=0, feedback=None)


def apply_setup(state, setup: dict) -> None:
    """Put a question's setup on a RouterState, so the Router tab shows what the answer was computed from.

    Order matters: a new model resets scheme/k/capacity to how it was trained, so the model goes first
    and the routing options after. The dashboard's watchers route the text.
    """
    state.n_experts = setup["n_experts"]
    state.balancing = setup["balancing"]
    update = {"scheme": setup["scheme"], "text": setup["text"]}
    if setup.get("top_k") is not None:
        update["top_k"] = setup["top_k"]
    if setup.get("capacity_factor") is not None:
        update["capacity_factor"] = setup["capacity_factor"]
    if setup.get("layer") in state.param.layer.objects:
        update["layer"] = setup["layer"]
    state.param.update(**update)


__all__ = ["Question", "Live", "Feedback", "QuizState", "question_bank", "apply_setup", "describe_setup",
           "make_setup", "parse_number", "parse_choice", "clear_cache", "route_setup", "warm"]
