"""Expert profiles and ablation: what each expert takes, and what happens when it is switched off.

Everything shown comes from `moe_core.analysis.profiles`: profiles are computed from the
loaded model on a fixed held-out slice (cached in assets/profiles, checked
against the weights) and the ablation runs the real model twice, with the
expert on and off. The point to see: experts specialise in surface patterns
(digits, whitespace, punctuation, word pieces, a script), not in subjects.

The ablation runs in a worker thread when served (one at a time per server
process, so a class clicking at once queues instead of freezing every page);
a periodic callback picks up the result. In plain Python (tests, notebooks) it
runs at once.
"""
from __future__ import annotations

import html
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import panel as pn
import param
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Legend, LegendItem
from bokeh.plotting import figure
from bokeh.transform import dodge

from moe_core.analysis.profiles import ABLATION_TOKENS, ablate, load_profiles
from moe_core.data.categories import CATEGORIES
from moe_core.inference import MAX_TOKENS
from moe_core.model.routing import SCHEMES

from ..state import RouterState
from ..styles import CSS
from .palette import expert_colors
from .panels import chip, visible

POLL_MS = 200
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablation")  # one ablation at a time per process
esc = html.escape


def _html(*args, **kw):
    return pn.pane.HTML(*args, stylesheets=[CSS], **kw)


def token_table(rows: list, title: str, what: str) -> str:
    """[id, text, count, share] rows as a small escaped table."""
    if not rows:
        return f"<div class='section'>{esc(title)}</div><p class='muted'>none</p>"
    body = "".join(
        f"<tr><td><code class='tok'>{visible(text)}</code></td><td class='num'>{count:,}</td>"
        f"<td class='num'>{share:.0%}</td></tr>" for _, text, count, share in rows)
    return (f"<div class='section'>{esc(title)}</div><table class='mini'><tr><th>token</th><th>count</th>"
            f"<th><abbr title='{esc(what)}'>to this expert</abbr></th></tr>{body}</table>")


def ablation_html(held: dict, text: dict | None, n_experts: int) -> str:
    """The measured ablation: loss with and without the expert, and where its tokens go."""
    def row(label, r, on_key, off_key):
        on, off = r[on_key], r[off_key]
        if on is None or off is None:
            return f"<tr><td>{esc(label)}</td><td class='num'>–</td><td class='num'>–</td><td class='num'>–</td></tr>"
        return (f"<tr><td>{esc(label)}</td><td class='num'>{on:.3f}</td><td class='num'>{off:.3f}</td>"
                f"<td class='num'>{off - on:+.3f}</td></tr>")

    rows = [row(f"held-out slice, all {held['n_tokens']:,} tokens", held, "loss_on", "loss_off"),
            row(f"held-out, its {held['first_choice_tokens']:,} first-choice tokens", held,
                "loss_on_expert_tokens", "loss_off_expert_tokens"),
            row("held-out, all other tokens", held, "loss_on_other_tokens", "loss_off_other_tokens")]
    if text is not None:
        cut = " (first 4,096)" if text["truncated"] else ""
        rows += [row(f"your text, {text['n_tokens']:,} tokens{cut}", text, "loss_on", "loss_off"),
                 row(f"your text, its {text['first_choice_tokens']:,} first-choice tokens", text,
                     "loss_on_expert_tokens", "loss_off_expert_tokens")]
    table = ("<table class='mini'><tr><th>next-token loss (nats)</th><th>on</th><th>off</th><th>change</th></tr>"
             + "".join(rows) + "</table>")

    def goes(r, where):
        total = r["first_choice_tokens"]
        if not total:
            return f"<p class='muted'>On {where} no token picked this expert first.</p>"
        peak = max(max(r["goes_to"]), r["unrouted"], 1)
        cells = "".join(
            f"<tr><td>{chip(e, n_experts)}</td><td class='num'>{c:,}</td><td class='num'>{c / total:.0%}</td>"
            f"<td class='barcell'><span class='pbar' style='width:{round(80 * c / peak)}px'></span></td></tr>"
            for e, c in enumerate(r["goes_to"]) if c)
        if r["unrouted"]:
            cells += (f"<tr><td>no expert</td><td class='num'>{r['unrouted']:,}</td>"
                      f"<td class='num'>{r['unrouted'] / total:.0%}</td><td></td></tr>")
        return (f"<p class='muted'>Where its {total:,} first-choice tokens ({where}) go now: their new first "
                f"choice at this layer.</p><table class='mini'><tr><th>expert</th><th>tokens</th><th>share</th>"
                f"<th></th></tr>{cells}</table>")

    later = held["top1_changed_later"]
    knock = ("; later layers' first choices change for " + ", ".join(
        f"{v:.1%} (layer {held['layer'] + 1 + i})" for i, v in enumerate(later)) + " of the tokens") if later else ""
    ms = held["wall_ms"] + (text["wall_ms"] if text else 0)
    return (f"<div class='section'>Expert {held['expert']} of layer {held['layer']} switched off</div>"
            f"<p class='muted'>The router can never select it (the weights are untouched); the scheme "
            f"({esc(SCHEMES[held['scheme']].label)}) routes over the remaining experts. Measured on the real "
            f"model, twice: expert on and off{esc(knock)}.</p>{table}{goes(held, 'held-out')}"
            + (goes(text, "your text") if text is not None else "")
            + f"<p class='muted'>Computed in {ms / 1e3:.1f} s.</p>")


class ExpertProfiles(pn.viewable.Viewer):
    """Per-expert profile (top tokens, category mix vs the corpus, summary) and an ablation switch."""

    state = param.ClassSelector(class_=RouterState)
    notify = param.Callable(default=None, allow_None=True, doc="notify(kind, message): shows a message to the user.")

    def __init__(self, **params):
        super().__init__(**params)
        self.profiles: dict | None = None
        self.ablation: dict | None = None    # {"held": ..., "text": ...} of the last finished ablation
        self._jobs = itertools.count()
        self._job = None
        self._future = None
        self._poll_cb = None
        self.layer = pn.widgets.Select(name="Layer", options=[0], value=0, width=120)
        self.expert = pn.widgets.Select(name="Expert", options={"expert 0": 0}, value=0, width=260)
        self.header = _html(sizing_mode="stretch_width", css_classes=["muted"])
        self.summary = _html(sizing_mode="stretch_width", css_classes=["badge-ok"])
        self.tokens = _html(sizing_mode="stretch_width")
        self.switch = pn.widgets.Toggle(name="Switch this expert off", value=False, button_type="warning", width=220)
        self.result = _html(sizing_mode="stretch_width")
        self._build_chart()
        self.layer.param.watch(self._on_pick, "value")
        self.expert.param.watch(self._on_pick, "value")
        self.switch.param.watch(self._on_switch, "value")
        self.state.param.watch(self._on_model, ["n_experts", "balancing", "lab_model"])
        self.state.param.watch(self._on_state_layer, ["layer"])
        self.state.param.watch(self._on_text, ["text", "scheme", "top_k", "capacity_factor"])
        self._on_model()

    # -- chart -------------------------------------------------------------------

    def _build_chart(self):
        cats = list(reversed(CATEGORIES))
        self.bars = ColumnDataSource({"cat": cats, "expert": [0.0] * len(cats), "corpus": [0.0] * len(cats),
                                      "lift": [""] * len(cats)}, name="profile_bars")
        self.y_range = FactorRange(factors=cats)
        f = figure(height=470, sizing_mode="stretch_width", y_range=self.y_range, x_range=(0, 1),
                   toolbar_location="right", tools="save", name="profile_chart",
                   title="Category mix of the expert's first-choice tokens vs the held-out corpus")
        self.expert_bars = f.hbar(y=dodge("cat", 0.17, range=self.y_range), right="expert", height=0.32,
                                  source=self.bars, color=expert_colors(8)[0])
        corpus = f.hbar(y=dodge("cat", -0.17, range=self.y_range), right="corpus", height=0.32, source=self.bars,
                        color="#9aa5b1")
        f.add_tools(HoverTool(renderers=[self.expert_bars, corpus],
                              tooltips=[("category", "@cat"), ("this expert", "@expert{0.0%}"),
                                        ("corpus", "@corpus{0.0%}"), ("ratio", "@lift")]))
        self.legend_items = [LegendItem(label="this expert", renderers=[self.expert_bars]),
                             LegendItem(label="corpus (baseline)", renderers=[corpus])]
        f.add_layout(Legend(items=self.legend_items, location="bottom_right"))
        f.xaxis.axis_label = "share of tokens"
        f.xaxis.formatter.use_scientific = False
        f.ygrid.visible = False
        self.chart = f

    # -- reactions ---------------------------------------------------------------

    def _on_model(self, *events):
        m = self.state.model
        t0 = time.perf_counter()
        self.profiles = load_profiles(m)
        self._load_s = time.perf_counter() - t0
        n_layer = self.profiles["n_layer"]
        layer = self.state.layer
        layer = layer if isinstance(layer, int) and layer < n_layer else 0
        with pn.io.hold():
            self.layer.options = list(range(n_layer))
            self.layer.value = layer
            self._set_expert_options()
            self._show()

    def _on_state_layer(self, event):
        if event.new in self.layer.options:
            self.layer.value = event.new

    def _set_expert_options(self):
        L = self.profiles["layers"][self.layer.value]
        opts = {f"expert {e['expert']} ({e['share_first']:.0%} of first choices)": e["expert"] for e in L["experts"]}
        value = self.expert.value if self.expert.value in opts.values() else 0
        self.expert.options = opts
        self.expert.value = value

    def _on_pick(self, event):
        if event.obj is self.layer:
            self._set_expert_options()
        self._show()

    def _on_text(self, *events):
        # a finished ablation describes the old text/routing: switch it off rather than show stale numbers
        # (_show does), and say again whether the current routing is the one the profiles used
        self._show()

    def _show(self):
        p = self.profiles
        L = p["layers"][self.layer.value]
        e = L["experts"][self.expert.value]
        n = p["n_experts"]
        self._cancel()
        self.switch.value = False
        self.result.object = ""
        base = dict(zip(p["categories"], p["corpus_categories"]))
        mine = dict(zip(p["categories"], e["categories"]))
        cats = list(reversed(CATEGORIES))
        lift = [f"{mine.get(c, 0) / base[c]:.1f}x" if base.get(c) else "–" for c in cats]
        peak = max(max(mine.values(), default=0), max(base.values(), default=0), 0.05)
        self.bars.data = {"cat": cats, "expert": [mine.get(c, 0.0) for c in cats],
                          "corpus": [base.get(c, 0.0) for c in cats], "lift": lift}
        self.chart.x_range.end = min(1.0, peak * 1.1)
        self.expert_bars.glyph.fill_color = self.expert_bars.glyph.line_color = expert_colors(n)[e["expert"]]
        self.legend_items[0].label = {"value": f"expert {e['expert']}"}
        sl = p["slice"]
        s = self.state
        routed = ", ".join(f"{k} = {v}" for k, v in p["route"].items() if k != "scheme")
        src = ("from the cache (checked against the weights)" if p["source"] == "cache"
               else f"computed now from the loaded model ({p['wall_s']} s)")
        note = ""
        if s.request().as_dict() != p["route"]:
            note = (" Profiles use the routing the model was trained with; your current routing differs "
                    "(the switch below uses yours).")
        self.header.object = (
            f"{esc(p['model'])}: profiles {esc(src)}, on {sl['n_tokens']:,} held-out tokens "
            f"({sl['windows']} evenly spaced windows, slice sha256 {esc(sl['sha256'])}), routed with "
            f"{esc(SCHEMES[p['route']['scheme']].label)}{', ' + esc(routed) if routed else ''}. "
            f"Layer {L['layer']}: NMI(first-choice expert, category) = {L['nmi_category']:.2f} "
            f"(0 = unrelated, 1 = the category decides the expert).{esc(note)} Categories are our own "
            f"surface-level classes, made for explanation (digits, whitespace, word pieces, scripts); "
            f"the model never saw them.")
        self.summary.object = (f"{chip(e['expert'], n)} <b>Expert {e['expert']}, layer {L['layer']}</b>: "
                               f"{esc(e['summary'])}. First choice of {e['first_choice']:,} tokens "
                               f"({e['share_first']:.1%}); picked {e['all_choices']:,} times in all "
                               f"({e['share_all']:.1%} of all picks); processed {e['processed']:,}.")
        what = "share of this token's occurrences in the slice whose first choice is this expert"
        self.tokens.object = (
            "<div style='display:flex;gap:18px;flex-wrap:wrap'><div style='flex:1 1 220px'>"
            + token_table(e["top_tokens"], "Most frequent tokens", what) + "</div><div style='flex:1 1 220px'>"
            + token_table(e["distinctive_tokens"], "Most faithful tokens (seen 5+ times)", what) + "</div></div>")

    # -- ablation ----------------------------------------------------------------

    def _job_args(self) -> dict:
        s = self.state
        return {"model": s.model, "layer": self.layer.value, "expert": self.expert.value, "text": s.text,
                "request": s.request().as_dict()}

    @staticmethod
    def compute_ablation(model, layer: int, expert: int, text: str, request: dict) -> dict:
        """Both ablations: on the held-out slice and (when there is one) on the user's text."""
        opts = {k: v for k, v in request.items() if k in ("scheme", "top_k", "capacity_factor")}
        held = ablate(model, layer, expert, n_tokens=ABLATION_TOKENS, **opts)
        txt = None
        if text and text.strip():
            try:
                txt = ablate(model, layer, expert, text=text[: MAX_TOKENS * 64], **opts)
            except ValueError:
                txt = None  # e.g. a one-token text: there is no next-token loss to compare
        return {"held": held, "text": txt}

    def _on_switch(self, event):
        if not event.new:
            self._cancel()
            self.result.object = ""
            return
        args = self._job_args()
        job = next(self._jobs)
        self._job = job
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:      # plain Python: run now
            self._finish(job, self._run(args))
            return
        self.result.object = "<p class='muted'>Running the model with the expert switched off…</p>"
        self._future = _POOL.submit(self._run, args)
        self._poll_cb = pn.state.add_periodic_callback(lambda: self._poll(job), period=POLL_MS)

    def _run(self, args: dict):
        try:
            return self.compute_ablation(**args)
        except ValueError as e:
            return e

    def _poll(self, job: int):
        f = self._future
        if f is None or not f.done():
            return
        self._stop_poll()
        self._finish(job, f.result())

    def _finish(self, job: int, res):
        if job != self._job:
            return                  # the user picked another expert meanwhile
        if isinstance(res, Exception):
            self.result.object = f"<p class='badge-warn'>{esc(str(res))}</p>"
            if self.notify is not None:
                self.notify("error", str(res))
            return
        self.ablation = res
        self.result.object = ablation_html(res["held"], res["text"], self.profiles["n_experts"])

    def _stop_poll(self):
        if self._poll_cb is not None:
            self._poll_cb.stop()
            self._poll_cb = None

    def _cancel(self):
        self._job = None
        self._future = None
        self._stop_poll()

    def __panel__(self):
        return pn.Column(
            pn.Row(self.layer, self.expert, self.switch, align="end"),
            self.summary,
            pn.Row(pn.Column(self.tokens, sizing_mode="stretch_width"),
                   pn.pane.Bokeh(self.chart, sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            self.result,
            self.header,
            sizing_mode="stretch_width",
        )


__all__ = ["ExpertProfiles", "ablation_html", "token_table", "visible"]
