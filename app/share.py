"""Share links: the router's whole state in the URL's query string, read back with validation.

A teacher sends `http://server:5006/?model=moe-n8-nobalance&top_k=2&example=Python%20code&tab=router`
and the student's page opens on exactly that view. A lesson link can also hide parts of the page
(`hide=controls,text`), like TensorFlow Playground's `_hide` flags.

Every value in a URL is untrusted: `parse_query` checks each one against what the app offers and
returns the valid settings plus one plain-English message per value it had to ignore. It never
raises, and a bad value never stops the good ones from applying. No Panel imports: the dashboard
reads `pn.state.session_args` and hands them here, so all of this is testable with plain pytest.
"""
from __future__ import annotations

import math
from urllib.parse import urlencode

from moe_core.model.routing import SCHEMES

from .state import RouterState, catalog, examples

TABS = ("router", "details", "compare", "lab", "profiles", "write", "experiments", "params", "scale", "quiz", "learn")
HIDEABLE = ("controls", "text", "tabs", "header")
MAX_TEXT_IN_URL = 2000        # characters of text a link carries (browsers and proxies cut long URLs)
MAX_VALUE_CHARS = 40          # longer values (other than text) are not worth reading
KEYS = ("model", "n", "scheme", "top_k", "capacity_factor", "layer", "text", "example", "token", "tab", "hide",
        "lesson", "step", "presenter")
ALIASES = {"k": "top_k", "cf": "capacity_factor"}   # the names links used before: links already shared keep working


def _first(values) -> str:
    """Tornado gives each argument as a list of bytes; take the last one, decoded leniently."""
    if isinstance(values, (list, tuple)):
        values = values[-1] if values else ""
    if isinstance(values, bytes):
        values = values.decode("utf-8", errors="replace")
    return str(values)


def _shown(value: str) -> str:
    value = value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS] + "\u2026"
    return repr(value)


def _int(name: str, value: str, lo: int, hi: int, msgs: list[str]) -> int | None:
    try:
        v = int(value.strip())
    except ValueError:
        msgs.append(f"Link setting {name}={_shown(value)} is not a whole number, so it was ignored.")
        return None
    if not lo <= v <= hi:
        msgs.append(f"Link setting {name}={_shown(str(v))} is outside {lo}\u2013{hi}, so it was ignored.")
        return None
    return v


def parse_query(args: dict) -> tuple[dict, dict, list[str]]:
    """Validate URL arguments. Returns (state settings, page settings, messages).

    State settings are RouterState parameter values in the order they must be applied (model
    first: choosing a model resets scheme, k and capacity to what it was trained with). Page
    settings are `tab`, `hide`, `lesson`, `step`, `presenter`. Unknown keys are reported too, so a
    mistyped link does not fail silently.
    """
    raw = {str(k): _first(v) for k, v in args.items()}
    for old, new in ALIASES.items():
        if old in raw:
            value = raw.pop(old)
            raw.setdefault(new, value)
    msgs: list[str] = []
    state: dict = {}
    page: dict = {}
    models = {m["name"]: m for m in catalog()}
    by_n = {}
    for m in catalog():
        by_n.setdefault(m["n_experts"], []).append(m)

    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        names = ", ".join(_shown(k) for k in unknown[:5])
        msgs.append(f"The link has settings this app does not know ({names}); they were ignored.")

    n = None
    if "model" in raw:
        name = raw["model"].strip()
        if name in models:
            n = models[name]["n_experts"]
            state["n_experts"] = n
            state["balancing"] = models[name]["balancing"]
        else:
            msgs.append(f"Link setting model={_shown(name)} is not a model here (choose from "
                        f"{', '.join(models)}); the default model is shown.")
    elif "n" in raw:
        v = _int("n", raw["n"], 1, 4096, msgs)
        if v is not None and v not in by_n:
            msgs.append(f"Link setting n={v}: there is no model with {v} experts here (N can be "
                        f"{', '.join(map(str, sorted(by_n)))}).")
        elif v is not None:
            n = v
            state["n_experts"] = v
    n_eff = n if n is not None else RouterState.param.n_experts.default

    if "scheme" in raw:
        sc = raw["scheme"].strip()
        if sc in SCHEMES:
            state["scheme"] = sc
        else:
            msgs.append(f"Link setting scheme={_shown(sc)} is not a routing scheme (choose from "
                        f"{', '.join(SCHEMES)}).")
    if "top_k" in raw:
        v = _int("top_k", raw["top_k"], 1, max(n_eff, 1), msgs)
        if v is not None:
            state["top_k"] = v
    if "capacity_factor" in raw:
        lo, hi = RouterState.param.capacity_factor.bounds
        try:
            v = float(raw["capacity_factor"])
        except ValueError:
            v = None
        if v is None or not math.isfinite(v):
            msgs.append(f"Link setting capacity_factor={_shown(raw['capacity_factor'])} is not a number, so it was "
                        f"ignored.")
        elif not lo <= v <= hi:
            msgs.append(f"Link setting capacity_factor={v:g} is outside {lo:g}\u2013{hi:g}, so it was ignored.")
        else:
            state["capacity_factor"] = round(v, 2)
    if "layer" in raw:
        if raw["layer"].strip() == "all":    # older links showed every layer at once: the screen starts at 0
            state["layer"] = 0
        else:
            v = _int("layer", raw["layer"], 0, 63, msgs)
            if v is not None:
                state["layer"] = v          # checked against the model's depth when applied
    if "example" in raw:
        ex = raw["example"]
        if ex in examples():
            state["text"] = examples()[ex]
        else:
            msgs.append(f"Link setting example={_shown(ex)} is not one of the example texts.")
    if "text" in raw:
        text = raw["text"]
        if "\x00" in text:
            text = text.replace("\x00", "")
            msgs.append("The link's text contained null characters; they were removed.")
        if text.strip():
            state["text"] = text[:MAX_TEXT_IN_URL]
        else:
            msgs.append("The link's text is empty, so the example text is shown.")
    if "token" in raw:
        v = _int("token", raw["token"], 0, 4095, msgs)
        if v is not None:
            state["selected_token"] = v

    if "tab" in raw:
        tab = raw["tab"].strip().lower()
        if tab in TABS:
            page["tab"] = tab
        else:
            msgs.append(f"Link setting tab={_shown(tab)} is not a tab (choose from {', '.join(TABS)}).")
    if "hide" in raw:
        parts = [p.strip().lower() for p in raw["hide"].split(",") if p.strip()]
        bad = [p for p in parts if p not in HIDEABLE]
        if bad:
            msgs.append(f"Link setting hide: {', '.join(_shown(p) for p in bad[:4])} cannot be hidden "
                        f"(choose from {', '.join(HIDEABLE)}).")
        page["hide"] = [p for p in parts if p in HIDEABLE]
    if "lesson" in raw:
        page["lesson"] = raw["lesson"].strip()[:MAX_VALUE_CHARS]
    if "step" in raw:
        v = _int("step", raw["step"], 1, 99, msgs)
        if v is not None:
            page["step"] = v
    if "presenter" in raw:
        page["presenter"] = raw["presenter"].strip().lower() in ("1", "true", "yes", "on")
    return state, page, msgs


def apply_to_state(state: RouterState, settings: dict) -> list[str]:
    """Apply parsed settings in a safe order; returns messages for values the model cannot take."""
    msgs = []
    if "n_experts" in settings:
        state.n_experts = settings["n_experts"]
    if "balancing" in settings:
        state.balancing = settings["balancing"]
    if "scheme" in settings:
        state.scheme = settings["scheme"]
    if "top_k" in settings:
        if state.scheme_info.uses_k:
            state.top_k = min(settings["top_k"], state.n_experts)
        else:
            msgs.append(f"k does not apply to {state.scheme_info.label}; the link's k was ignored.")
    if "capacity_factor" in settings:
        state.capacity_factor = settings["capacity_factor"]
    if "layer" in settings:
        if settings["layer"] in state.param.layer.objects:
            state.layer = settings["layer"]
        else:
            msgs.append(f"This model has layers 0\u2013{len(state.param.layer.objects) - 1}; "
                        f"the link's layer {settings['layer']} was ignored.")
    if "text" in settings:
        state.text = settings["text"]
    if "selected_token" in settings:
        state.selected_token = settings["selected_token"]
    return msgs


def state_query(state: RouterState, *, tab: str = "router", hide=(), lesson: str | None = None,
                step: int | None = None, presenter: bool = False) -> dict[str, str]:
    """The query arguments that reproduce the current view (inverse of parse_query + apply_to_state)."""
    q: dict[str, str] = {}
    if state.balancing == RouterState.LAB_BALANCING:
        q["n"] = str(state.n_experts)       # a lab model lives only in its session: share the nearest shipped one
    else:
        q["model"] = state.model_info["name"]
    q["scheme"] = state.scheme
    if state.scheme_info.uses_k:
        q["top_k"] = str(state.top_k)
    if state.scheme_info.uses_capacity:
        q["capacity_factor"] = f"{state.capacity_factor:g}"
    q["layer"] = str(state.layer)
    ex = {v: k for k, v in examples().items()}
    if state.text in ex:
        q["example"] = ex[state.text]
    else:
        q["text"] = state.text[:MAX_TEXT_IN_URL]
    if state.selected_token:
        q["token"] = str(state.selected_token)
    if tab and tab != "router":
        q["tab"] = tab
    if hide:
        q["hide"] = ",".join(hide)
    if lesson:
        q["lesson"] = lesson
        if step:
            q["step"] = str(step)
    if presenter:
        q["presenter"] = "1"
    return q


def share_url(base: str, query: dict[str, str]) -> str:
    """`base` (scheme://host/path) with the query attached, percent-encoded."""
    return base.split("?", 1)[0] + "?" + urlencode(query)


__all__ = ["TABS", "HIDEABLE", "MAX_TEXT_IN_URL", "parse_query", "apply_to_state", "state_query", "share_url"]
