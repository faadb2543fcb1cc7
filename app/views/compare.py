"""Compare mode: the router's current configuration (A) next to a second one (B) on the same text.

A is whatever the Router tab shows; B has its own model, scheme, k and
capacity controls here. Both are real routings of the user's text
(`moe_core.inference.route_text`); the divergence figures come from
`moe_core.analysis.compare.compare_results`.
"""
from __future__ import annotations

import html

import panel as pn
import param
from bokeh.models import ColumnDataSource, FactorRange
from bokeh.plotting import figure

from moe_core.analysis.compare import compare_results
from moe_core.inference import route_text
from moe_core.model.checkpoint import load
from moe_core.model.request import RoutingRequest
from moe_core.model.routing import SCHEMES

from ..state import LIVE_TOKENS, MAX_TEXT_CHARS, RouterState, catalog
from .panels import chip, visible

MAX_CHANGED_LISTED = 40


def _pct(x: float) -> str:
    return f"{x:.0%}"


class CompareView(pn.viewable.Viewer):
    state = param.ClassSelector(class_=RouterState)
    error = param.String(default="", doc="Why configuration B could not be routed.")

    def __init__(self, css: str = "", notify=None, **params):
        super().__init__(**params)
        self._notify = notify
        names = [m["name"] for m in catalog()]
        default = "moe-n8-nobalance" if "moe-n8-nobalance" in names else names[0]
        self.model_b = pn.widgets.Select(name="B: model", options=names, value=default, width=200)
        self.scheme_b = pn.widgets.Select(name="B: routing scheme", options={v.label: k for k, v in SCHEMES.items()},
                                          value="softmax_topk", width=220)
        self.k_b = pn.widgets.IntSlider(name="B: k", start=1, end=8, value=2, width=180)
        self.cf_b = pn.widgets.FloatSlider(name="B: capacity factor", start=0.25, end=4.0, step=0.05, value=1.0,
                                           width=200, format="0.00")
        self.same_as_a = pn.widgets.Button(name="B = A, then change one thing", button_type="default", width=260)
        self.summary = pn.pane.HTML(stylesheets=[css], sizing_mode="stretch_width", css_classes=["compare-summary"])
        self.table = pn.pane.HTML(stylesheets=[css], sizing_mode="stretch_width")
        self.changed = pn.pane.HTML(stylesheets=[css], sizing_mode="stretch_width")
        self.src = ColumnDataSource({"x": [], "share": [], "side": [], "color": []}, name="compare_load")
        self.fig = figure(height=240, sizing_mode="stretch_width", x_range=FactorRange(), tools="save",
                          toolbar_location="right", name="compare_fig",
                          title="Share of token slots per expert, busiest first (A blue, B orange)")
        self.fig.vbar(x="x", top="share", width=0.9, color="color", source=self.src)
        self.fig.yaxis.axis_label = "share of slots"
        self.fig.xaxis.axis_label = "layer / rank of expert by load (1 = busiest)"
        self.fig.xaxis.major_label_text_font_size = "0pt"     # ranks are implied by the sort; layers stay labelled
        self.fig.xgrid.grid_line_color = None
        self.fig.y_range.start = 0
        for w in (self.model_b, self.scheme_b, self.k_b, self.cf_b):
            w.param.watch(self._on_b, "value" if w not in (self.k_b, self.cf_b) else "value_throttled")
        self.same_as_a.on_click(self._copy_a)
        self.state.param.watch(self._on_a, ["result"])
        self.shown = False        # the dashboard sets this when the Compare tab is open
        self._stale = True
        self._sync_b_widgets()

    # -- B configuration -----------------------------------------------------------

    def _copy_a(self, event=None):
        s = self.state
        name = s.model_info["name"] if s.balancing != RouterState.LAB_BALANCING else self.model_b.value
        self.model_b.value = name
        self.scheme_b.value = s.scheme
        self.k_b.value = s.top_k
        self.cf_b.value = s.capacity_factor
        self._sync_b_widgets()
        self.update()

    def _sync_b_widgets(self):
        m = load(self.model_b.value)
        self.k_b.end = m.config.n_experts
        s = SCHEMES[self.scheme_b.value]
        self.k_b.disabled = not s.uses_k
        self.cf_b.disabled = not s.uses_capacity

    def _on_b(self, *events):
        self._sync_b_widgets()
        self.update()

    def _on_a(self, *events):
        # routing B costs as much as routing A: only do it while someone looks at it
        if self.shown:
            self.update()
        else:
            self._stale = True

    def show(self):
        """Called when the Compare tab opens: bring B up to date with A's text."""
        self.shown = True
        if self._stale:
            self.update()

    def request_b(self) -> RoutingRequest:
        s, config = SCHEMES[self.scheme_b.value], load(self.model_b.value).config
        return RoutingRequest.make(config, self.scheme_b.value,
                                   min(self.k_b.value, config.n_experts) if s.uses_k else None,
                                   float(self.cf_b.value) if s.uses_capacity else None)

    # -- computing and drawing -----------------------------------------------------

    def update(self):
        s = self.state
        a = s.result
        if a is None:
            return
        model_b = load(self.model_b.value)
        try:
            b = route_text(model_b, s.text[:MAX_TEXT_CHARS], self.request_b(), max_tokens=LIVE_TOKENS, truncate=True)
        except ValueError as e:
            self.error = str(e)
            if self._notify:
                self._notify("error", f"Configuration B: {e}")
            return
        self.error = ""
        self._stale = False
        same = s.model is model_b
        rows = compare_results(a, b, same_weights=same)
        self._draw(a, b, rows, same, model_b)

    def _label(self, res, name) -> str:
        parts = [name, SCHEMES[res.scheme].label]
        if res.top_k:
            parts.append(f"k = {res.top_k}")
        if res.capacity_factor:
            parts.append(f"capacity factor {res.capacity_factor:g}")
        return html.escape(", ".join(parts))

    def _draw(self, a, b, rows, same, model_b):
        s = self.state
        name_a = s.model_info["name"]
        la = "n/a" if a.loss is None else f"{a.loss:.3f}"
        lb = "n/a" if b.loss is None else f"{b.loss:.3f}"
        how = ("Same weights on both sides: expert numbers match, so agreement is counted token by token."
               if same else "Two different models: expert k of one is not expert k of the other, so read the "
               "number-free figures (partition NMI, sorted loads).")
        self.summary.object = (
            "<div class='stats'>"
            f"<div class='stat'><div class='label'>A</div>{self._label(a, name_a)}<br>loss <b>{la}</b>, active "
            f"params <b>{a.params.active_per_token:,}</b> of {a.params.total:,}</div>"
            f"<div class='stat'><div class='label'>B</div>{self._label(b, model_b.name)}<br>loss <b>{lb}</b>, "
            f"active params <b>{b.params.active_per_token:,}</b> of {b.params.total:,}</div></div>"
            f"<div class='muted'>{how}</div>")
        head = ("<tr><th>layer</th><th class='num'>busiest top-1 A / B</th><th class='num'>drop rate A / B</th>"
                "<th class='num'>effective experts A / B</th>"
                + ("<th class='num'>same first choice</th><th class='num'>weight change (TV)</th>" if same else "")
                + "<th class='num'>partition NMI</th></tr>")
        body = ""
        for r in rows:
            body += (f"<tr><td>{r['layer']}</td><td class='num'>{_pct(r['a']['top1_max_share'])} / "
                     f"{_pct(r['b']['top1_max_share'])}</td><td class='num'>{_pct(r['a']['drop_rate'])} / "
                     f"{_pct(r['b']['drop_rate'])}</td><td class='num'>{r['a']['n_eff']:.2f} / {r['b']['n_eff']:.2f}</td>"
                     + (f"<td class='num'>{_pct(r['top1_agree'])}</td><td class='num'>{r['tv_distance']:.3f}</td>"
                        if same else "")
                     + f"<td class='num'>{r['partition_nmi']:.2f}</td></tr>")
        self.table.object = (
            f"<table class='metrics'><caption>Per-layer divergence between A and B</caption><thead>{head}</thead>"
            f"<tbody>{body}</tbody></table><div class='muted'>Same first choice: share of tokens whose top-1 expert "
            "is the same. Weight change: total-variation distance between the two combine-weight rows, averaged over "
            "tokens (0 = identical, 1 = disjoint). Partition NMI: how alike the two groupings of tokens by first "
            "choice are, whatever the expert numbers (1 = identical).</div>")
        # grouped bars: for each layer, A then B, experts ranked by load
        xs, shares, sides, colors = [], [], [], []
        for r in rows:
            for side, key, color in (("A", "sorted_share_a", "#0072B2"), ("B", "sorted_share_b", "#E69F00")):
                for rank, v in enumerate(r[key], 1):
                    xs.append((f"layer {r['layer']}", f"{side}{rank}"))
                    shares.append(v)
                    sides.append(side)
                    colors.append(color)
        with pn.io.hold():
            self.fig.x_range.factors = xs
            self.src.data = {"x": xs, "share": shares, "side": sides, "color": colors}
        self.fig.y_range.end = float(max(shares) * 1.1) if shares else 1.0
        self.changed.object = self._changed_html(a, b, rows, same) if same else ""

    def _changed_html(self, a, b, rows, same) -> str:
        layer = self.state.layer
        r = rows[layer]
        n = a.routings[layer].n_experts
        ids = r["changed_tokens"]
        if not ids:
            return f"<div class='muted'>Layer {layer}: every token keeps its first-choice expert.</div>"
        ia, ib = a.routings[layer].indices.tolist(), b.routings[layer].indices.tolist()
        items = "".join(
            f"<tr><td class='num'>{t}</td><td><code class='tok'>{visible(a.tokens[t].text)}</code></td>"
            f"<td>{' '.join(chip(e, n) for e in ia[t] if e >= 0)}</td>"
            f"<td>{' '.join(chip(e, n) for e in ib[t] if e >= 0)}</td></tr>" for t in ids[:MAX_CHANGED_LISTED])
        more = len(ids) - MAX_CHANGED_LISTED
        return (f"<table class='mini'><caption>Layer {layer}: tokens whose first choice changed ({len(ids)})</caption>"
                f"<thead><tr><th>#</th><th>token</th><th>A experts</th><th>B experts</th></tr></thead>"
                f"<tbody>{items}</tbody></table>"
                + (f"<div class='muted'>{more} more not listed.</div>" if more > 0 else ""))

    def __panel__(self):
        return pn.Column(
            pn.Row(self.model_b, self.scheme_b, self.k_b, self.cf_b, sizing_mode="stretch_width"),
            self.same_as_a,
            self.summary, self.table, pn.pane.Bokeh(self.fig, sizing_mode="stretch_width"), self.changed,
            sizing_mode="stretch_width",
        )


__all__ = ["CompareView"]
