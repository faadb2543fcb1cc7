"""The dashboard's state: one param.Parameterized, no Panel or Bokeh imports.

Everything the page shows is derived from `RouterState.result`, which is
computed by `moe_core.inference.route_text` from the real model. The state can
be driven from plain Python (tests, notebooks); the views only watch it.
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from functools import lru_cache

import param
import torch

from moe_core.analysis.profiles import cached_profiles
from moe_core.inference import MAX_TOKENS, RouteResult, route_text
from moe_core.model.checkpoint import ASSETS, list_checkpoints, load
from moe_core.model.request import RoutingRequest
from moe_core.model.routing import SCHEMES

RECIPE_LABELS = {
    "load_balance": "balanced (aux loss)",
    "none": "no balancing",
    "deepseek_bias": "DeepSeek bias",
    "hash": "hash routing (nothing to balance)",
    "untrained": "untrained",
}
MAX_TEXT_CHARS = 200_000  # longer pastes are cut before tokenising (the token limit cuts again)
# tokens the live view routes: a page of text (~400 words), ~0.1 s on one core. Routing holds the server's
# event loop, so a longer one would stall every other student's update: two students pasting 4,096-token
# texts (1.2-1.6 s each) raised the others' update p95 from 0.22 to 1.49 s (issue #23). The CLI routes
# up to MAX_TOKENS.
LIVE_TOKENS = 512
ROUTE_CACHE_SIZE = 64     # routings remembered per process (texts up to ROUTE_CACHE_CHARS)
ROUTE_CACHE_CHARS = 4_000
_routes: OrderedDict = OrderedDict()


@lru_cache(maxsize=1)
def examples() -> dict[str, str]:
    """Example texts shown as presets (assets/examples.json)."""
    return json.loads((ASSETS / "examples.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def catalog() -> list[dict]:
    """The shipped checkpoints with the labels the app uses."""
    out = []
    for d in list_checkpoints():
        c, r = d["config"], d["recipe"]
        label = RECIPE_LABELS.get(r.get("balancing"), r.get("balancing", "?"))
        if c["scheme"] == "switch":
            label = "Switch top-1"
        out.append({"name": d["name"], "n_experts": c["n_experts"], "balancing": label, "scheme": c["scheme"],
                    "top_k": c["top_k"], "capacity_factor": c.get("capacity_factor"), "card": d["card"],
                    "recipe": r})
    return out


@lru_cache(maxsize=64)
def _shipped_profile(name: str) -> dict | None:
    return cached_profiles(load(name))


def corpus_profile(model) -> dict | None:
    """The model's held-out profile (per-expert load over the corpus), if computed: cached per checkpoint."""
    if any(m["name"] == model.name for m in catalog()):
        return _shipped_profile(model.name)
    return cached_profiles(model)


def routed(model, text: str, request: RoutingRequest) -> RouteResult:
    """`route_text` for the app, remembered per process for short texts.

    A class opening the page, or following a lesson step, routes the same text with the same model
    and settings: it costs one routing, and every session reads the same result (never changed after
    it is made). The entry holds the model, so its id cannot be reused by another model meanwhile."""
    key = (id(model.model), text, request)
    repeatable = SCHEMES[request.scheme].repeatable     # random routing draws again at every routing
    hit = _routes.get(key) if repeatable else None
    if hit is not None:
        _routes.move_to_end(key)
        return hit[1]
    res = route_text(model, text, request, max_tokens=LIVE_TOKENS, truncate=True)
    if len(text) <= ROUTE_CACHE_CHARS and repeatable:
        _routes[key] = (model.model, res)
        if len(_routes) > ROUTE_CACHE_SIZE:
            _routes.popitem(last=False)
    return res


def preload_models() -> None:
    """Load every shipped checkpoint once (38.5 MB on disk, ~80 MB in memory) so the server's memory
    does not step up later, in the middle of a class, when someone first picks another model."""
    for m in catalog():
        load(m["name"])


ROUTE_THREADS = int(os.environ.get("MOE_LAB_ROUTE_THREADS", "1"))


def bound_route_threads(threads: int = ROUTE_THREADS) -> None:
    """PyTorch threads for the server's routings (env MOE_LAB_ROUTE_THREADS, default 1). Idempotent.

    A student's text is tens to hundreds of tokens: its matrices are too small to gain from a
    second core, and with a class connected the other core is busy, so every small matmul's
    OpenMP team waited for it (py-spy, 60 sessions: the experts' matmuls were 16 % of the busy
    server's time, 20 ms per routing of ~50 tokens). One thread per routing also keeps one
    session from taking every core from the others (issue #7).
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class RouterState(param.Parameterized):
    """What the student has chosen, and the routing result for it."""

    text = param.String(default="", doc="The text to route (the user's exact text, never rendered as HTML).")
    n_experts = param.Selector(default=8, objects=[8], doc="N: routed experts per layer (one shipped model per N).")
    balancing = param.Selector(default="balanced (aux loss)", objects=["balanced (aux loss)"],
                               doc="How the loaded model was trained: with a balancing loss, with none (watch it "
                                   "collapse), with DeepSeek's bias, as a Switch model, or not at all.")
    top_k = param.Integer(default=2, bounds=(1, 8), doc="k: experts per token, for top-k schemes.")
    scheme = param.Selector(default="softmax_topk", objects=list(SCHEMES),
                            doc="How the router picks each token's experts, at inference time, with the same weights "
                                "(Router details explains each scheme).")
    capacity_factor = param.Number(default=1.0, bounds=(0.25, 4.0), step=0.05,
                                   doc="Slots per expert = ceil(factor x tokens / N), for capacity schemes.")
    layer = param.Selector(default=0, objects=[0, 1, 2, 3], doc="Which MoE layer the screen shows.")
    selected_token = param.Integer(default=0, bounds=(0, None), doc="Index of the token shown in detail.")

    result = param.Parameter(default=None, doc="The latest RouteResult (None until routed).")
    error = param.String(default="", doc="Why the last request failed (shown as a notification).")
    notice = param.String(default="", doc="Something the user should know about the result, e.g. truncation.")
    route_ms = param.Number(default=0.0, doc="Server-side time of the last routing, in ms.")
    lab_model = param.Parameter(default=None, doc="A model this session trained in the lab (LoadedModel) or None.")

    LAB_BALANCING = "trained in the lab"

    def __init__(self, **params):
        models = catalog()
        if not models:
            raise ValueError("no trained checkpoints in assets/checkpoints; run: moe-lab train --preset moe-n8")
        ns = sorted({m["n_experts"] for m in models})
        self.param.n_experts.objects = ns
        default_n = 8 if 8 in ns else ns[0]
        self.param.n_experts.default = default_n
        params.setdefault("n_experts", default_n)
        params.setdefault("text", next(iter(examples().values())))
        super().__init__(**params)
        self._sync_balancing()
        self._apply_model_defaults()

    # -- derived -----------------------------------------------------------------

    def models(self) -> list[dict]:
        """The shipped checkpoints, plus this session's lab model when there is one."""
        out = list(catalog())
        lm = self.lab_model
        if lm is not None:
            c = lm.config
            out.append({"name": lm.name, "n_experts": c.n_experts, "balancing": self.LAB_BALANCING, "scheme": c.scheme,
                        "top_k": c.top_k, "capacity_factor": c.capacity_factor, "card": lm.card, "recipe": lm.recipe})
        return out

    @property
    def model_info(self) -> dict:
        for m in self.models():
            if m["n_experts"] == self.n_experts and m["balancing"] == self.balancing:
                return m
        raise ValueError(f"no model with N = {self.n_experts} and balancing {self.balancing!r}")

    @property
    def model(self):
        if self.balancing == self.LAB_BALANCING and self.lab_model is not None:
            return self.lab_model
        return load(self.model_info["name"])

    def use_lab_model(self, loaded) -> None:
        """Route with a model trained in this session's lab (it replaces any earlier lab model)."""
        self.lab_model = loaded
        ns = sorted({m["n_experts"] for m in self.models()})
        self.param.n_experts.objects = ns
        with param.parameterized.batch_call_watchers(self):
            self.n_experts = loaded.config.n_experts
            self._sync_balancing()
            self.balancing = self.LAB_BALANCING
        self._apply_model_defaults()

    @property
    def scheme_info(self):
        return SCHEMES[self.scheme]

    def badge(self) -> dict:
        """An honest description of the loaded model and how it is being used."""
        m = self.model_info
        trained = m["balancing"] != "untrained"
        lines = [f"{m['name']}: N = {m['n_experts']}, {m['balancing']}"]
        if m["balancing"] == self.LAB_BALANCING:
            lines.append(f"Trained in this session's lab ({m['card'].get('steps', '?')} steps, smaller model).")
        level = "ok" if trained else "warn"
        if not trained:
            lines.append("Untrained: random router weights, so routing is by chance.")
        elif m["balancing"] == "no balancing":
            lines.append("Trained with no balancing at all: expect overloaded experts.")
        differs = []
        if self.scheme != m["scheme"]:
            differs.append(f"scheme {SCHEMES[self.scheme].label} (trained with {SCHEMES[m['scheme']].label})")
        if self.scheme_info.uses_k and self.top_k != m["top_k"] and SCHEMES[m["scheme"]].uses_k:
            differs.append(f"k = {self.top_k} (trained with k = {m['top_k']})")
        if differs:
            level = "warn"
            lines.append("Differs from training: " + "; ".join(differs) + ". The model never saw this routing.")
        return {"level": level, "lines": lines, "trained": trained}

    # -- reactions ---------------------------------------------------------------

    @param.depends("n_experts", watch=True)
    def _sync_balancing(self):
        balancings = [m["balancing"] for m in self.models() if m["n_experts"] == self.n_experts]
        self.param.balancing.objects = balancings
        if self.balancing not in balancings:
            preferred = [v for v in balancings if v.startswith("balanced")]
            self.balancing = preferred[0] if preferred else balancings[0]
        self._sync_layers()
        self.param.top_k.bounds = (1, self.n_experts)
        if self.top_k > self.n_experts:
            self.top_k = self.n_experts

    def _sync_layers(self):
        n_layer = self.model.config.n_layer
        self.param.layer.objects = list(range(n_layer))
        if self.layer not in self.param.layer.objects:
            self.layer = 0

    @param.depends("balancing", watch=True)
    def _apply_model_defaults(self):
        """A newly loaded model starts with the routing it was trained with."""
        m = self.model_info
        self._sync_layers()
        with param.parameterized.batch_call_watchers(self):
            self.scheme = m["scheme"]
            if SCHEMES[m["scheme"]].uses_k:
                self.top_k = min(m["top_k"], self.n_experts)
            if m.get("capacity_factor"):
                self.capacity_factor = m["capacity_factor"]

    # -- routing -----------------------------------------------------------------

    def request(self) -> RoutingRequest:
        """How the current choices route (k and capacity factor only where the scheme has them)."""
        s = self.scheme_info
        return RoutingRequest.make(self.model.config, self.scheme, self.top_k if s.uses_k else None,
                                   float(self.capacity_factor) if s.uses_capacity else None)

    def route(self) -> RouteResult | None:
        """Route the current text; on bad input keep the last good result and set `error`."""
        text = self.text
        notice = ""
        if len(text) > MAX_TEXT_CHARS:
            text = text[:MAX_TEXT_CHARS]
            notice = f"The text is very long: only its first {MAX_TEXT_CHARS:,} characters are routed."
        if not text:
            return self._fail("The text is empty: type or paste something to route.")
        t0 = time.perf_counter()
        try:
            res = routed(self.model, text, self.request())
        except ValueError as e:
            return self._fail(str(e))
        ms = (time.perf_counter() - t0) * 1e3
        if res.truncated:
            notice = (f"The text has {res.n_tokens_in_text:,} tokens; the live view routes the first {LIVE_TOKENS:,} "
                      f"(moe-lab route takes up to {MAX_TOKENS:,}).")
        sel = min(self.selected_token, len(res.tokens) - 1)
        self.param.update(result=res, error="", notice=notice, route_ms=ms, selected_token=max(sel, 0))
        return res

    def _fail(self, message: str) -> None:
        """Say why this request failed, every time (the same message again still notifies)."""
        if self.error == message:
            self.param.trigger("error")
        else:
            self.error = message
        return None

    def layers_shown(self) -> list[int]:
        """Every layer of the result (the detail views show them all; the screen shows `layer`)."""
        return [] if self.result is None else list(range(len(self.result.routings)))


__all__ = ["RouterState", "examples", "catalog", "corpus_profile", "routed", "preload_models", "MAX_TEXT_CHARS", "LIVE_TOKENS",
           "bound_route_threads"]
