"""The router dashboard: widgets and views around one RouterState.

`Dashboard()` displays in a notebook; `app/main.py` serves it with a template.
Widgets write to the state; the state routes; views redraw from the result.
"""
from __future__ import annotations

import asyncio
import html
import json
from pathlib import Path

import panel as pn
import param

from moe_core.checkpoint import ASSETS
from moe_core.routing import SCHEMES

from .state import RouterState, examples
from .views.panels import (
    balance_table, counter_strip, counters, explainer_markdown, published_table, right_now, token_detail,
)
from .views.plots import FlowView, HeatmapView, LoadView
from .views.published_chart import published_chart
from .views.tokens import TokenText, token_view_data

TEXT_DEBOUNCE_S = 0.35
CSS = (Path(ASSETS) / "app.css").read_text(encoding="utf-8")


def _html(*args, **kw):
    """An HTML pane styled by assets/app.css (panes live in shadow roots: page CSS does not reach them)."""
    return pn.pane.HTML(*args, stylesheets=[CSS], **kw)


def _md(*args, **kw):
    return pn.pane.Markdown(*args, stylesheets=[CSS], **kw)


def _card(*objs, title: str, width: int | None = None):
    """A fixed (non-collapsible) card that keeps its content's height inside a scrolling column."""
    size = {"width": width} if width else {"sizing_mode": "stretch_width"}
    return pn.Card(*objs, title=title, collapsible=False, margin=(6, 6), **size)


def notify(kind: str, message: str) -> None:
    """A readable notification (message escaped: notifications render HTML)."""
    if pn.state.notifications is not None:
        getattr(pn.state.notifications, kind)(html.escape(message), duration=6000)


class Dashboard(pn.viewable.Viewer):
    state = param.ClassSelector(class_=RouterState)

    def __init__(self, **params):
        params.setdefault("state", RouterState())
        super().__init__(**params)
        s = self.state
        s.param.watch(self._route, ["text", "n_experts", "variant", "top_k", "scheme", "capacity_factor"])
        s.param.watch(self._redraw, ["result", "layer"])
        s.param.watch(self._on_select, ["selected_token"])
        s.param.watch(self._on_error, ["error"])
        s.param.watch(self._on_notice, ["notice"])
        self._build_widgets()
        self._build_views()
        s.route()
        self._redraw()

    # -- widgets -----------------------------------------------------------------

    def _build_widgets(self):
        s = self.state
        ex = examples()
        self.preset = pn.widgets.Select(name="Example text", options=["(your text)", *ex], value="(your text)",
                                        sizing_mode="stretch_width")
        self.text = pn.widgets.TextAreaInput(name="Text to route", value=s.text, height=130, max_length=200_000,
                                             sizing_mode="stretch_width", css_classes=["text-input"])
        self.route_btn = pn.widgets.Button(name="Route", button_type="primary", width=90, align="end")
        self.n_experts = pn.widgets.RadioButtonGroup(name="N (experts)", options=list(s.param.n_experts.objects),
                                                     value=s.n_experts, button_type="default")
        self.variant = pn.widgets.Select(name="Model trained with", options=list(s.param.variant.objects),
                                         value=s.variant)
        self.scheme = pn.widgets.Select(name="Routing scheme", options={v.label: k for k, v in SCHEMES.items()},
                                        value=s.scheme)
        self.top_k = pn.widgets.IntSlider(name="k (experts per token)", start=1, end=s.param.top_k.bounds[1],
                                          value=s.top_k, step=1)
        self.capacity = pn.widgets.FloatSlider(name="Capacity factor", start=0.25, end=4.0, step=0.05,
                                               value=s.capacity_factor, format="0.00")
        self.layer = pn.widgets.RadioButtonGroup(name="Layer", options=self._layer_options(), value=s.layer)
        self.numbers = pn.widgets.Checkbox(name="Show expert numbers on tokens", value=True)
        self.badge = _html(sizing_mode="stretch_width", css_classes=["badge"])

        self.preset.param.watch(self._on_preset, "value")
        self.text.param.watch(self._on_typing, "value_input")
        self.text.param.watch(self._on_text_commit, "value")
        self.route_btn.on_click(lambda e: self._commit_text(self.text.value_input or self.text.value, force=True))
        self.n_experts.param.watch(lambda e: setattr(s, "n_experts", e.new), "value")
        self.variant.param.watch(lambda e: setattr(s, "variant", e.new), "value")
        self.scheme.param.watch(lambda e: setattr(s, "scheme", e.new), "value")
        self.top_k.param.watch(lambda e: setattr(s, "top_k", e.new), "value_throttled")
        self.capacity.param.watch(lambda e: setattr(s, "capacity_factor", e.new), "value_throttled")
        self.layer.param.watch(lambda e: setattr(s, "layer", e.new), "value")
        self.numbers.param.watch(lambda e: self._redraw_tokens(), "value")
        s.param.watch(self._sync_widgets, ["n_experts", "variant", "top_k", "scheme", "capacity_factor", "layer"])
        self._typing_token = None

    def _layer_options(self) -> dict:
        return {"all": "all", **{f"layer {i}": i for i in self.state.param.layer.objects if i != "all"}}

    def _sync_widgets(self, *events):
        s = self.state
        self.n_experts.options = list(s.param.n_experts.objects)
        self.variant.options = list(s.param.variant.objects)
        self.variant.value = s.variant
        self.n_experts.value = s.n_experts
        self.top_k.end = s.param.top_k.bounds[1]
        self.top_k.value = s.top_k
        self.top_k.disabled = not s.scheme_info.uses_k
        self.capacity.value = s.capacity_factor
        self.capacity.disabled = not s.scheme_info.uses_capacity
        self.scheme.value = s.scheme
        self.layer.options = self._layer_options()
        self.layer.value = s.layer

    def _on_preset(self, event):
        if event.new in examples():
            self.text.value = examples()[event.new]
            self._commit_text(self.text.value)

    async def _on_typing(self, event):
        # debounce: route once the user pauses typing
        token = object()
        self._typing_token = token
        await asyncio.sleep(TEXT_DEBOUNCE_S)
        if self._typing_token is token:
            self._commit_text(event.new)

    def _on_text_commit(self, event):
        self._commit_text(event.new)

    def _commit_text(self, text: str, force: bool = False):
        if text is None:
            return
        if text != self.state.text:
            self.state.text = text
        elif force:
            self.state.route()

    # -- views -------------------------------------------------------------------

    def _build_views(self):
        self.tokens = TokenText(sizing_mode="stretch_width", min_height=120, name="token_text")
        self.tokens.param.watch(lambda e: setattr(self.state, "selected_token", e.new), "selected")
        self.detail = _html(sizing_mode="stretch_width", css_classes=["detail-pane"])
        self.heatmap = HeatmapView(n_layer_max=len(self.state.param.layer.objects) - 1)
        for src in self.heatmap.cells:
            src.selected.on_change("indices", self._make_tap_handler(src))
        self.flow = FlowView()
        self.load = LoadView(n_layer_max=len(self.state.param.layer.objects) - 1)
        self.balance = _html(sizing_mode="stretch_width")
        self.counters = _html(sizing_mode="stretch_width")
        self.strip = _html(sizing_mode="stretch_width", css_classes=["counter-strip"])
        self.right_now = _md(sizing_mode="stretch_width", css_classes=["right-now"])
        self.loss = _html(css_classes=["loss-readout"])
        self.explainer = _md(sizing_mode="stretch_width", css_classes=["explainer"])
        self.status = _html(css_classes=["status-line"], sizing_mode="stretch_width")

    def _make_tap_handler(self, src):
        def handler(attr, old, new):
            if new:
                t = int(src.data["t"][new[0]])
                src.selected.indices = []
                self.state.selected_token = t
        return handler

    def _on_select(self, *events):
        s = self.state
        with pn.io.hold():
            self.tokens.selected = s.selected_token
            self.detail.object = token_detail(s.result, s.layers_shown(), s.selected_token)
            self.heatmap.select(s.selected_token)
            self.flow.update(s.result, self._flow_layer(), s.selected_token)

    def _flow_layer(self) -> int:
        return 0 if self.state.layer == "all" else int(self.state.layer)

    def _on_error(self, event):
        if event.new:
            notify("error", event.new)

    def _on_notice(self, event):
        if event.new:
            notify("warning", event.new)

    def _route(self, *events):
        self.state.route()

    def _redraw_tokens(self):
        s = self.state
        self.tokens.data = json.dumps(token_view_data(s.result, s.layers_shown(), self.numbers.value))

    def _redraw(self, *events):
        s = self.state
        res = s.result
        if res is None:
            return
        layers = s.layers_shown()
        info = s.model_info
        with pn.io.hold():
            self._redraw_tokens()
            self.tokens.selected = s.selected_token
            self.detail.object = token_detail(res, layers, s.selected_token)
            self.heatmap.update(res, layers, s.selected_token)
            self.flow.update(res, self._flow_layer(), s.selected_token)
            self.load.update(res, layers)
            self.balance.object = balance_table(res, layers)
            self.counters.object = counters(res, s.model.config)
            self.strip.object = counter_strip(res)
            self.right_now.object = right_now(res, layers, info)
            loss = "needs 2+ tokens" if res.loss is None else f"{res.loss:.3f}"
            self.loss.object = (f"<div class='label'>Next-token loss on your text</div><div class='big'>{loss}</div>"
                                f"<div class='muted'>nats; lower is better. Change k or the scheme to see "
                                f"what it costs.</div>")
            self.explainer.object = explainer_markdown(s.scheme)
            badge = s.badge()
            self.badge.object = (f"<div class='badge-{badge['level']}'>"
                                 + "<br>".join(html.escape(x) for x in badge["lines"]) + "</div>")
            trunc = " (truncated)" if res.truncated else ""
            self.status.object = (f"<span class='muted'>{len(res.tokens):,} tokens{trunc} routed through "
                                  f"{len(res.routings)} layers in {s.route_ms:.0f} ms on the server.</span>")

    # -- layout ------------------------------------------------------------------

    def controls(self) -> list:
        return [
            _html("<div class='section'>Model</div>"),
            self.n_experts, self.variant, self.badge, self.strip,
            _html("<div class='section'>Routing</div>"),
            self.scheme, self.top_k, self.capacity,
            _html("<div class='section'>View</div>"),
            self.layer, self.numbers,
        ]

    def input_row(self):
        return pn.Column(
            pn.Row(self.preset, self.route_btn, sizing_mode="stretch_width"),
            self.text, self.status, sizing_mode="stretch_width", css_classes=["input-card"],
        )

    def router_tab(self):
        return pn.Column(
            self.input_row(),
            pn.Row(
                _card(self.tokens, title="Your tokens, coloured by top-1 expert (underline: 2nd choice)"),
                _card(self.detail, title="Selected token", width=400),
                sizing_mode="stretch_width",
            ),
            _card(*[pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in self.heatmap.figs],
                  pn.pane.Bokeh(self.heatmap.legend),
                  title="Heatmap: router probability, tokens \u00d7 experts (drag sideways to pan)"),
            pn.Row(
                _card(pn.pane.Bokeh(self.flow.fig, sizing_mode="stretch_width"),
                      _html("<div class='muted'>Tokens around the selected one, left; experts, right. Line width "
                            "= combine weight; a dashed grey line = chosen but dropped (expert full).</div>"),
                      title="Flow: which experts each token goes to"),
                _card(self.loss, self.right_now, title="Quality and what to notice", width=400),
                sizing_mode="stretch_width",
            ),
            _card(pn.GridBox(*[pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in self.load.figs], ncols=2,
                             sizing_mode="stretch_width"),
                  _html("<div class='muted'>Dotted line: the fair share (tokens \u00d7 experts per token / N). "
                        "Dashed orange line: expert capacity, for schemes that have one.</div>"),
                  self.balance,
                  title="Load: tokens per expert, and how balanced it is"),
            _card(self.explainer, title="About this routing scheme"),
            sizing_mode="stretch_width",
        )

    def params_tab(self):
        return pn.Column(
            _card(self.counters, title="Total vs active parameters of the loaded model"),
            _card(_html(published_table(), sizing_mode="stretch_width"),
                  pn.pane.Bokeh(published_chart(), sizing_mode="stretch_width"),
                  title="Published MoE models: total vs active"),
            sizing_mode="stretch_width",
        )

    def learn_tab(self):
        topics = [("What is a mixture of experts?", "intro"),
                  *[(v.label, k) for k, v in SCHEMES.items()],
                  ("Load-balancing loss", "load_balance"), ("Router z-loss", "z_loss"),
                  ("DeepSeekMoE: fine-grained and shared experts", "shared_experts")]
        acc = pn.Accordion(*[(title, _md(explainer_markdown(t), sizing_mode="stretch_width"))
                             for title, t in topics], active=[0], sizing_mode="stretch_width")
        return pn.Column(acc, sizing_mode="stretch_width")

    def main(self):
        from .lab import TrainingLab

        self.lab = TrainingLab(notify=notify, css=CSS, router_state=self.state)
        return pn.Tabs(("Router", self.router_tab()), ("Training lab", self.lab), ("Parameters", self.params_tab()),
                       ("Learn", self.learn_tab()), sizing_mode="stretch_width", dynamic=True)

    def __panel__(self):
        return pn.Row(pn.Column(*self.controls(), width=300), self.main(), sizing_mode="stretch_width")
