"""The router dashboard: widgets and views around one RouterState.

`Dashboard()` displays in a notebook; `app/main.py` serves it with a template.
Widgets write to the state; the state routes; views redraw from the result.
"""
from __future__ import annotations

import asyncio
import html
import json
from contextlib import contextmanager
from pathlib import Path

import panel as pn
import param

from moe_core.checkpoint import ASSETS
from moe_core.explain import router_walkthrough
from moe_core.routing import SCHEMES

from .lessons import LessonState, fill, lesson_numbers, lessons
from .share import MAX_TEXT_IN_URL, apply_to_state, parse_query, share_url, state_query
from .state import RouterState, examples
from .views.panels import (
    balance_table, counter_strip, counters, explainer_markdown, published_table, right_now, token_detail,
)
from .views.plots import FlowView, HeatmapView, LoadView
from .views.published_chart import published_chart
from .views.pagecontrol import PageControl
from .views.tokens import TokenText, token_view_data
from .views.walkthrough import routing_table_html, walkthrough_html

TEXT_DEBOUNCE_S = 0.35
CSS = (Path(ASSETS) / "app.css").read_text(encoding="utf-8")
# the view a lesson step points at: a thick amber frame (3.0:1 against white, WCAG 1.4.11 for UI parts)
# the lesson's text floats at the bottom right, so it stays in view while the page scrolls to the view it is about
LESSON_BAR_CSS = (":host { position: fixed; right: 18px; bottom: 18px; width: min(560px, 46vw); max-height: 60vh; "
                  "overflow-y: auto; z-index: 1000; box-shadow: 0 8px 28px rgba(0, 0, 0, .28); }")
FOCUS_CSS = ":host(.lesson-focus) { outline: 4px solid #B35806; outline-offset: 2px; border-radius: 6px; }"


def _html(*args, **kw):
    """An HTML pane styled by assets/app.css (panes live in shadow roots: page CSS does not reach them)."""
    return pn.pane.HTML(*args, stylesheets=[CSS], **kw)


def _md(*args, **kw):
    return pn.pane.Markdown(*args, stylesheets=[CSS], **kw)


def _card(*objs, title: str, width: int | None = None, name: str = "", **kw):
    """A card that keeps its content's height inside a scrolling column (fixed unless collapsible=True).

    `name` becomes a CSS class `view-NAME`, so lessons can highlight and scroll to it."""
    size = {"width": width} if width else {"sizing_mode": "stretch_width"}
    kw.setdefault("collapsible", False)
    classes = [f"view-{name}"] if name else []
    return pn.Card(*objs, title=title, margin=(6, 6), css_classes=classes, stylesheets=[FOCUS_CSS], **size, **kw)


@contextmanager
def reindex_once():
    """Bokeh re-indexes the whole document (every model, ~570 here) each time a property that holds
    models changes; inside this block it does so at most once, at the end, and only if something asked.

    `doc.models.freeze()` defers the same work but always re-indexes when it ends. Panel 1.9 swaps an
    HTML pane's stylesheet models on its first `object` update of a session, and again on some later
    ones (seen for 3 panes: balance, quality, what to notice), each swap one re-index of the document.
    Outside a served document (a notebook, tests without a server) it does nothing."""
    doc = pn.state.curdoc
    models = getattr(doc, "models", None)
    if models is None or "invalidate" in vars(models):         # no document, or already inside one
        yield
        return
    asked = []
    models.invalidate = lambda: asked.append(True)            # Bokeh calls doc.models.invalidate()
    try:
        yield
    finally:
        del models.invalidate
        if asked:
            models.invalidate()


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
        # a share link's settings apply before anything is routed or drawn (validated in app/share.py)
        settings, self.page, url_messages = parse_query(pn.state.session_args)
        url_messages += apply_to_state(s, settings)
        self.lessons = LessonState(s)
        self._cards: dict[str, pn.Card] = {}
        self._hold_routing = self._route_pending = False
        self._walk_cache = None
        s.param.watch(self._route, ["text", "n_experts", "variant", "top_k", "scheme", "capacity_factor"])
        s.param.watch(self._redraw, ["result", "layer"])
        s.param.watch(self._on_select, ["selected_token"])
        s.param.watch(self._on_error, ["error"])
        s.param.watch(self._on_notice, ["notice"])
        self._build_widgets()
        self._build_views()
        s.route()                 # draws through the `result` watcher
        if url_messages:
            pn.state.onload(lambda: [notify("warning", m) for m in url_messages])

    # -- widgets -----------------------------------------------------------------

    def _build_widgets(self):
        s = self.state
        ex = examples()
        shown = {v: k for k, v in ex.items()}.get(s.text, "(your text)")
        self.preset = pn.widgets.Select(name="Example text", options=["(your text)", *ex], value=shown,
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
        s.param.watch(self._sync_text, ["text"])
        self._typing_token = None

        # classroom: lessons, presenter mode, share links, accessible table
        self.lesson_pick = pn.widgets.Select(name="Guided lesson",
                                             options={"(choose a lesson)": "", **{l.title: k for k, l in lessons().items()}},
                                             value="", sizing_mode="stretch_width")
        self.presenter = pn.widgets.Toggle(name="Presenter mode (large type)", value=bool(self.page.get("presenter")),
                                           button_type="default", sizing_mode="stretch_width")
        self.share_btn = pn.widgets.Button(name="Make a link to this view", button_type="default",
                                           sizing_mode="stretch_width")
        self.share_hide = pn.widgets.Checkbox(name="Lesson link: hide the controls", value=False)
        self.share_url = pn.widgets.TextInput(name="Link (copy it)", value="", visible=False,
                                              sizing_mode="stretch_width", css_classes=["share-url"])
        self.as_table = pn.widgets.Checkbox(name="Show the heatmap as a table too", value=False)
        self.page_control = PageControl(presenter=self.presenter.value)
        self.lesson_pick.param.watch(self._on_lesson_pick, "value")
        self.presenter.param.watch(lambda e: setattr(self.page_control, "presenter", e.new), "value")
        self.share_btn.on_click(self._make_link)
        self.as_table.param.watch(lambda e: self._redraw_table(), "value")
        self.page_control.param.watch(lambda e: self._lesson_move(+1), "next_presses")
        self.page_control.param.watch(lambda e: self._lesson_move(-1), "prev_presses")

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

    def _sync_text(self, event):
        """Text set by a lesson or a link shows in the text box (typing sets it the other way round)."""
        if self.text.value_input != event.new and self.text.value != event.new:
            self.text.value = event.new
        name = {v: k for k, v in examples().items()}.get(event.new, "(your text)")
        if self.preset.value != name:
            self.preset.value = name

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
            self._route_now()

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
        self.walk = _html(sizing_mode="stretch_width", css_classes=["walkthrough"])
        self.walk_card = _card(self.walk, title="Inside the router: the selected token, step by step", name="walkthrough",
                               collapsible=True, collapsed=True)
        self.walk_card.param.watch(lambda e: self._redraw_walk(), "collapsed")
        self.table_view = _html(sizing_mode="stretch_width", visible=False)
        self.lesson_head = _html(sizing_mode="stretch_width", css_classes=["lesson-head"])
        self.lesson_body = _md(sizing_mode="stretch_width", css_classes=["lesson-body"])
        self.lesson_prev = pn.widgets.Button(name="\u25c0 Back", width=100)
        self.lesson_next = pn.widgets.Button(name="Next \u25b6", button_type="primary", width=100)
        self.lesson_exit = pn.widgets.Button(name="Close lesson", width=120)
        self.lesson_prev.on_click(lambda e: self._lesson_move(-1))
        self.lesson_next.on_click(lambda e: self._lesson_move(+1) if not self._lesson_at_end() else self._stop_lesson())
        self.lesson_exit.on_click(lambda e: self._stop_lesson())
        self.lesson_bar = pn.Column(
            self.lesson_head, self.lesson_body,
            pn.Row(self.lesson_prev, self.lesson_next, self.lesson_exit,
                   _html("<span class='muted'>Keys: \u2192 next, \u2190 back</span>", align="center")),
            visible=False, css_classes=["lesson-bar"], name="lesson_bar", stylesheets=[LESSON_BAR_CSS])

    def _make_tap_handler(self, src):
        def handler(attr, old, new):
            if new:
                t = int(src.data["t"][new[0]])
                src.selected.indices = []
                self.state.selected_token = t
        return handler

    def _on_select(self, *events):
        s = self.state
        with reindex_once(), pn.io.hold():
            self.tokens.selected = s.selected_token
            self.detail.object = token_detail(s.result, s.layers_shown(), s.selected_token)
            self.heatmap.select(s.selected_token)
            self.flow.update(s.result, self._flow_layer(), s.selected_token)
            self._redraw_walk()
            self._refresh_lesson_text()

    def _redraw_walk(self):
        """The step-by-step walkthrough costs one more forward pass: only while its card is open."""
        s = self.state
        if self.walk_card.collapsed or s.result is None:
            return
        t = min(s.selected_token, len(s.result.tokens) - 1)
        try:
            d = self._walkthrough(s.model, s.text, t, self._flow_layer(), **s.request())
        except ValueError as e:
            self.walk.object = f"<div class='muted'>{html.escape(str(e))}</div>"
            return
        self.walk.object = walkthrough_html(d)

    def _redraw_table(self):
        s = self.state
        self.table_view.visible = self.as_table.value
        if self.as_table.value:
            self.table_view.object = routing_table_html(s.result, s.layers_shown())

    def _flow_layer(self) -> int:
        return 0 if self.state.layer == "all" else int(self.state.layer)

    def _on_error(self, event):
        if event.new:
            notify("error", event.new)

    def _on_notice(self, event):
        if event.new:
            notify("warning", event.new)

    def _route(self, *events):
        if self._hold_routing:
            self._route_pending = True
            return
        self._route_now()

    def _route_now(self):
        """Route, and let the views follow, with at most one re-index of the document (`reindex_once`).

        Panel 1.9 renders an HTML pane with its Card's design modifiers (margin, stylesheets) but
        re-derives them without the Card on an `object` update, so the first update of each pane
        swaps its stylesheet models, and Bokeh would re-index the whole document once per such pane
        (measured: 0.41 s for a session's first routing). (Re-sending every pane once at page load
        settles them, but cost each browser ~3 s of re-rendering after the page loaded: tried,
        measured, not kept.)
        """
        with reindex_once():
            self.state.route()

    @contextmanager
    def _one_route(self):
        """Several settings change at once (a lesson step): route once at the end, not per setting."""
        self._hold_routing, self._route_pending = True, False
        try:
            with pn.io.hold():
                yield
        finally:
            self._hold_routing = False
            if self._route_pending:
                self._route_pending = False
                self._route_now()

    def _walkthrough(self, model, text, token, layer, **request):
        """router_walkthrough, remembered for the last request (the lesson text and the walkthrough
        card both quote it, and a redraw should not run the model twice)."""
        key = (id(model), text, token, layer, tuple(sorted(request.items())))
        if self._walk_cache is None or self._walk_cache[0] != key:
            self._walk_cache = (key, router_walkthrough(model, text, token, layer, **request))
        return self._walk_cache[1]

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
        with reindex_once(), pn.io.hold():
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
            self._redraw_walk()
            self._redraw_table()
            self._refresh_lesson_text()

    # -- lessons and share links -----------------------------------------------------

    def _on_lesson_pick(self, event):
        if event.new == self.lessons.lesson:
            return
        if event.new:
            self._start_lesson(event.new, 0)
        elif self.lessons.lesson:
            self._stop_lesson()

    def _start_lesson(self, slug: str, step: int = 0):
        try:
            with self._one_route():
                self.lessons.start(slug, step)
        except ValueError as e:
            notify("error", str(e))
            return
        if self.lesson_pick.value != slug:
            self.lesson_pick.value = slug
        self._show_step()

    def _lesson_at_end(self) -> bool:
        lesson = self.lessons.current
        return lesson is None or self.lessons.step >= len(lesson.steps) - 1

    def _lesson_move(self, delta: int):
        if not self.lessons.lesson:
            return
        with self._one_route():
            step = self.lessons.next() if delta > 0 else self.lessons.prev()
        if step is not None:
            self._show_step()

    def _show_step(self):
        lesson, step = self.lessons.current, self.lessons.current_step
        if step is None:
            return
        if step.tab in self.tab_names:
            self.tabs.active = self.tab_names.index(step.tab)
        if step.highlight == "walkthrough":
            self.walk_card.collapsed = False
        for name, card in self._cards.items():
            classes = [c for c in card.css_classes if c != "lesson-focus"]
            card.css_classes = classes + (["lesson-focus"] if name == step.highlight else [])
        i, n = self.lessons.step, len(lesson.steps)
        self.lesson_head.object = (f"<div class='label'>Lesson: {html.escape(lesson.title)} \u00b7 step {i + 1} of {n}"
                                   f"</div><div class='lesson-title'>{html.escape(step.title)}</div>")
        self.lesson_prev.disabled = i == 0
        self.lesson_next.name = "Finish \u2713" if i == n - 1 else "Next \u25b6"
        self.lesson_bar.visible = True
        self._refresh_lesson_text()
        self.page_control.param.update(lesson_active=True, scroll_to=f"view-{step.highlight}" if step.highlight else "",
                                       scroll_seq=self.page_control.scroll_seq + 1)

    def _refresh_lesson_text(self):
        step = self.lessons.current_step
        if step is not None and self.state.result is not None:
            self.lesson_body.object = fill(step.body, lesson_numbers(self.state, self._walkthrough))

    def _stop_lesson(self):
        self.lessons.stop()
        self.lesson_bar.visible = False
        for card in self._cards.values():
            card.css_classes = [c for c in card.css_classes if c != "lesson-focus"]
        self.page_control.lesson_active = False
        if self.lesson_pick.value:
            self.lesson_pick.value = ""

    def _make_link(self, event=None):
        loc = pn.state.location
        base = loc.href if loc is not None and loc.href else "http://localhost:5006/"
        tab = self.tab_names[self.tabs.active] if hasattr(self, "tabs") else "router"
        lesson = self.lessons.lesson or None
        query = state_query(self.state, tab=tab, hide=["controls"] if self.share_hide.value else [],
                            lesson=lesson, step=self.lessons.step + 1 if lesson else None,
                            presenter=self.presenter.value)
        self.share_url.param.update(value=share_url(base, query), visible=True)
        if len(self.state.text) > MAX_TEXT_IN_URL:
            notify("warning", f"The link carries only the first {MAX_TEXT_IN_URL:,} characters of your text.")

    # -- layout ------------------------------------------------------------------

    def controls(self) -> list:
        return [
            _html("<div class='section'>Model</div>"),
            self.n_experts, self.variant, self.badge, self.strip,
            _html("<div class='section'>Routing</div>"),
            self.scheme, self.top_k, self.capacity,
            _html("<div class='section'>View</div>"),
            self.layer, self.numbers, self.as_table,
            _html("<div class='section'>Classroom</div>"),
            self.lesson_pick, self.presenter, self.share_btn, self.share_hide, self.share_url,
        ]

    def sidebar(self):
        return pn.Column(*self.controls(), sizing_mode="stretch_width", name="controls")

    def input_row(self):
        return pn.Column(
            pn.Row(self.preset, self.route_btn, sizing_mode="stretch_width"),
            self.text, self.status, sizing_mode="stretch_width", css_classes=["input-card"],
        )

    def _named(self, name: str, card: pn.Card) -> pn.Card:
        self._cards[name] = card
        return card

    def router_tab(self):
        c = self._named
        self.input = self.input_row()
        if "text" in self.page.get("hide", []):
            self.input.visible = False
        return pn.Column(
            self.input,
            pn.Row(
                c("tokens", _card(self.tokens, title="Your tokens, coloured by top-1 expert (underline: 2nd choice)",
                                  name="tokens")),
                c("detail", _card(self.detail, title="Selected token", width=400, name="detail")),
                sizing_mode="stretch_width",
            ),
            c("walkthrough", self.walk_card),
            c("heatmap", _card(*[pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in self.heatmap.figs],
                               pn.pane.Bokeh(self.heatmap.legend), self.table_view,
                               title="Heatmap: router probability, tokens \u00d7 experts (drag sideways to pan)",
                               name="heatmap")),
            pn.Row(
                c("flow", _card(pn.pane.Bokeh(self.flow.fig, sizing_mode="stretch_width"),
                                _html("<div class='muted'>Tokens around the selected one, left; experts, right. Line "
                                      "width = combine weight; a dashed grey line = chosen but dropped (expert full)."
                                      "</div>"),
                                title="Flow: which experts each token goes to", name="flow")),
                _card(self.loss, self.right_now, title="Quality and what to notice", width=400),
                sizing_mode="stretch_width",
            ),
            c("load", _card(pn.GridBox(*[pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in self.load.figs],
                                       ncols=2, sizing_mode="stretch_width"),
                            _html("<div class='muted'>Dotted line: the fair share (tokens \u00d7 experts per token / "
                                  "N). Dashed orange line: expert capacity, for schemes that have one.</div>"),
                            self.balance,
                            title="Load: tokens per expert, and how balanced it is", name="load")),
            _card(self.explainer, title="About this routing scheme"),
            self._named("export", _card(self._export_panel(), title="Take it home: routing trace, code, plots",
                                        name="export")),
            sizing_mode="stretch_width",
        )

    def _export_panel(self):
        from .views.export import ExportPanel

        self.export = ExportPanel(state=self.state, css=CSS)
        return self.export

    def _show_quiz_setup(self, setup: dict):
        from .quiz import apply_setup

        with self._one_route():
            apply_setup(self.state, setup)
        self.tabs.active = self.tab_names.index("router")

    def scale_tab(self):
        from .views.parallel import parallel_view
        from .views.scale import ScaleView

        self.scale = ScaleView(css=CSS)    # starts this server's (background, once per process) measurement
        return self._named("scale", pn.Column(
            _card(self.scale, title="Scale it up: compute stays flat while memory grows with N", name="scale-view"),
            _card(parallel_view(), title="Expert parallelism: experts spread over devices, tokens travel (measured runs)",
                  name="parallel"),
            css_classes=["view-scale"], stylesheets=[FOCUS_CSS], sizing_mode="stretch_width"))

    def params_tab(self):
        c = self._named
        return pn.Column(
            c("counters", _card(self.counters, title="Total vs active parameters of the loaded model",
                                name="counters")),
            c("published", _card(_html(published_table(), sizing_mode="stretch_width"),
                                 pn.pane.Bokeh(published_chart(), sizing_mode="stretch_width"),
                                 title="Published MoE models: total vs active", name="published")),
            sizing_mode="stretch_width",
        )

    def compare_tab(self):
        from .views.compare import CompareView

        self.compare = CompareView(state=self.state, css=CSS, notify=notify)
        return self._named("compare", _card(
            _html("<div class='muted'>A is the Router tab's configuration; B is set here. Both route your text "
                  "through real models; change one thing at a time to see what it does.</div>"),
            self.compare, title="Compare two routing configurations on the same text", name="compare"))

    def learn_tab(self):
        topics = [("What is a mixture of experts?", "intro"),
                  *[(v.label, k) for k, v in SCHEMES.items()],
                  ("Load-balancing loss", "load_balance"), ("Router z-loss", "z_loss"),
                  ("DeepSeekMoE: fine-grained and shared experts", "shared_experts")]
        acc = pn.Accordion(*[(title, _md(explainer_markdown(t), sizing_mode="stretch_width"))
                             for title, t in topics], active=[0], sizing_mode="stretch_width")
        return pn.Column(acc, sizing_mode="stretch_width")

    def main(self):
        # Only the Router tab is built with the session; every other tab is built the first time it is
        # opened (a lesson step or a link opens it too). A session costs a fraction of the CPU this way,
        # which is what lets 60 students open the page at once on a small server.
        tabs = [("router", "Router"), ("compare", "Compare"), ("profiles", "Expert profiles"),
                ("lab", "Training lab"), ("params", "Parameters"), ("scale", "Scale"), ("quiz", "Quiz"),
                ("learn", "Learn")]
        self._builders = {"compare": self.compare_tab, "profiles": self.profiles_tab, "lab": self.lab_tab,
                          "params": self.params_tab, "scale": self.scale_tab, "quiz": self.quiz_tab,
                          "learn": self.learn_tab}
        self._holders = {name: pn.Column(sizing_mode="stretch_width") for name in self._builders}
        self.tab_names = [name for name, _ in tabs]
        views = [self.router_tab() if name == "router" else self._holders[name] for name, _ in tabs]
        hide_css = [".bk-header { display: none; }"] if "tabs" in self.page.get("hide", []) else []
        self.tabs = pn.Tabs(*[(label, view) for (_, label), view in zip(tabs, views)], sizing_mode="stretch_width",
                            dynamic=True, stylesheets=hide_css, name="main_tabs")
        self.tabs.param.watch(self._on_tab, "active")
        if self.page.get("tab") in self.tab_names:
            self.tabs.active = self.tab_names.index(self.page["tab"])
        if self.page.get("lesson"):
            step = self.page.get("step", 1) - 1
            pn.state.onload(lambda: self._start_lesson(self.page["lesson"], step))
        return pn.Column(self.lesson_bar, self.tabs, self.page_control, sizing_mode="stretch_width")

    def build_tab(self, name: str):
        """Build a tab's views now (first opening); later calls do nothing."""
        builder = self._builders.pop(name, None)
        if builder is not None:
            with pn.io.hold(freeze=True):       # a whole tab of new models: re-index the document once
                self._holders[name].objects = [builder()]

    @property
    def lab(self):
        self.build_tab("lab")
        return self._lab

    def lab_tab(self):
        from .lab import TrainingLab

        self._lab = TrainingLab(notify=notify, css=CSS, router_state=self.state)
        return self._named("lab", pn.Column(self._lab, css_classes=["view-lab"], stylesheets=[FOCUS_CSS],
                                            sizing_mode="stretch_width"))

    def profiles_tab(self):
        from .views.profiles import ExpertProfiles

        self.profiles = ExpertProfiles(state=self.state)
        return self._named("profiles", _card(self.profiles, name="profiles",
                                             title="What each expert learned (held-out corpus), and switching one off"))

    def quiz_tab(self):
        from .views.quiz import QuizView

        self.quiz = QuizView(state=self.state, on_show=self._show_quiz_setup)
        return self._named("quiz", _card(self.quiz, title="Predict, then check against the live model", name="quiz"))

    def _on_tab(self, event):
        self.build_tab(self.tab_names[event.new])
        if hasattr(self, "compare"):
            if self.tab_names[event.new] == "compare":
                self.compare.show()
            else:
                self.compare.shown = False

    def __panel__(self):
        return pn.Row(pn.Column(self.sidebar(), width=300), self.main(), sizing_mode="stretch_width")
