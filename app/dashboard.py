"""The router dashboard: widgets and views around one RouterState.

`Dashboard()` displays in a notebook; `app/main.py` serves it.
Widgets write to the state; the state routes; views redraw from the result.

What a session builds is kept small on purpose: the first screen is one
JSComponent (`RouterScreen`) drawn in the browser from a compact record of the
routing, plus the controls. Every other view (the Router details tab, Compare,
the lab, ...) is built the first time it is opened.
"""
from __future__ import annotations

import asyncio
import html
from contextlib import contextmanager
from types import SimpleNamespace

import panel as pn
import param

from moe_core.analysis.explain import router_walkthrough
from moe_core.model.routing import SCHEMES

from .lessons import LessonState, fill, lesson_numbers, lessons
from .share import MAX_TEXT_IN_URL, apply_to_state, parse_query, share_url, state_query
from .state import RouterState, examples
from .styles import CSS, PAGE_CSS
from .views.guard import refuse_bad_values
from .views.pagecontrol import PageControl
from .views.panels import (
    balance_table,
    counters,
    explainer_parts,
    published_table,
    right_now,
    token_detail,
)
from .views.plots import FlowView, HeatmapView
from .views.published_chart import published_chart
from .views.screen import RouterScreen, per_token_text
from .views.toast import Toast
from .views.walkthrough import routing_table_html, walkthrough_html

TEXT_DEBOUNCE_S = 0.35
SLOW_TEXT_CHARS = 2_000     # longer texts are routed on the next tick, after the busy cue (Dashboard._route)
FOCUS_CSS = ":host(.lesson-focus) { outline: 4px solid #B35806; outline-offset: 2px; border-radius: 6px; }"
INTRO = ("A real mixture-of-experts model routes your text. <b>Type</b>, or <b>click a token</b>, "
         "then <b>change k</b>: watch which experts light up.")
# the views on the first screen (inside RouterScreen); every other lesson highlight is a card
SCREEN_VIEWS = ("decide", "tokens", "load", "counters")


def _html(*args, css: str = CSS, **kw):
    """An HTML pane with the app's CSS (panes live in shadow roots: page CSS does not reach them).
    The first screen's panes pass the small PAGE_CSS: each pane carries its stylesheet in the document."""
    return pn.pane.HTML(*args, stylesheets=[css], **kw)


def _md(*args, css: str = CSS, **kw):
    return pn.pane.Markdown(*args, stylesheets=[css], **kw)


def _explainer(topic: str) -> list:
    """An explainer as panes: Markdown for the text, KaTeX (already on the page) for each display formula."""
    return [pn.pane.LaTeX(f"$${text}$$", renderer="katex", sizing_mode="stretch_width", margin=(4, 10),
                          css_classes=["formula"], styles={"font-size": "calc(var(--moe-fs, 14px) * 1.3)"})
            if kind == "math" else
            _md(text, sizing_mode="stretch_width", disable_math=True)
            for kind, text in explainer_parts(topic)]


def _wrapping_row(*objs, align_items: str = "flex-end", **kw):
    """A row whose items wrap onto the next line on a narrow screen (a Bokeh Row cannot: its layout sets
    its minimum width to the sum of its children's)."""
    kw.setdefault("margin", 0)
    return pn.FlexBox(*objs, sizing_mode="stretch_width", align_items=align_items, gap="2px 6px", **kw)


def _card(*objs, title: str, width: int | None = None, name: str = "", **kw):
    """A card that keeps its content's height inside a scrolling column (fixed unless collapsible=True).

    `name` becomes a CSS class `view-NAME`, so lessons can highlight and scroll to it."""
    size = {"width": width} if width else {"sizing_mode": "stretch_width"}
    kw.setdefault("collapsible", False)
    classes = [f"view-{name}"] if name else []
    return pn.Card(*objs, title=title, margin=(6, 6), css_classes=classes, stylesheets=[FOCUS_CSS], **size, **kw)


def k_fixed_text(state: RouterState) -> str:
    """What k is under a scheme that does not take one (shown in place of the k slider)."""
    s = state.scheme_info
    if s.fixed_k:
        return f"k = {s.fixed_k}: {s.fixed_k} expert{'s' if s.fixed_k > 1 else ''} per token (fixed by the scheme)"
    res = state.result
    if res is not None and res.scheme == state.scheme:
        return f"k: {per_token_text(res)}"
    return "k: experts choose tokens"


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
        self.details = None
        self._details_stale = True
        self.toast = Toast(name="toast", margin=0)
        s.param.watch(self._route, ["text", "n_experts", "balancing", "top_k", "scheme", "capacity_factor"])
        s.param.watch(self._redraw, ["result"])
        s.param.watch(self._on_view, ["selected_token", "layer"])
        s.param.watch(self._on_error, ["error"])
        s.param.watch(self._on_notice, ["notice"])
        self._build_widgets()
        self._build_views()
        s.route()                 # draws through the `result` watcher
        if url_messages:
            pn.state.onload(lambda: [self.notify("warning", m) for m in url_messages])

    def notify(self, kind: str, message: str) -> None:
        """A message at the bottom of the page for a few seconds (plain text, never HTML)."""
        self.toast.show(kind, message)

    # -- widgets -----------------------------------------------------------------

    def _build_widgets(self):
        s = self.state
        ex = examples()
        shown = {v: k for k, v in ex.items()}.get(s.text, "(your text)")
        self.preset = pn.widgets.Select(name="Example text", options=["(your text)", *ex], value=shown, width=190)
        self.text = pn.widgets.TextAreaInput(name="Text to route", value=s.text, height=64, max_length=200_000,
                                             sizing_mode="stretch_width", css_classes=["text-input"],
                                             styles={"flex": "1 1 300px", "min-width": "0"})
        self.route_btn = pn.widgets.Button(name="Route", button_type="primary", width=80, align="end")
        # the routing controls are bound to the state's parameters (both ways, options and bounds too);
        # the sliders set the state when released
        self.n_experts = pn.widgets.RadioButtonGroup.from_param(s.param.n_experts, name="N (experts)",
                                                                button_type="default", margin=(0, 10, 5, 10))
        self.balancing = pn.widgets.Select.from_param(s.param.balancing, name="Model trained with", width=170)
        self.scheme = pn.widgets.Select.from_param(s.param.scheme, name="Routing scheme", width=220,
                                                   options={v.label: k for k, v in SCHEMES.items()})
        self.top_k = pn.widgets.IntSlider.from_param(s.param.top_k, name="k (experts per token)", throttled=True,
                                                     width=250, visible=s.scheme_info.uses_k)
        # a scheme without a top-k says what it does instead, where the slider was
        self.k_fixed = _html(css=PAGE_CSS, width=250, css_classes=["k-fixed"], visible=not s.scheme_info.uses_k, align="end")
        self.capacity = pn.widgets.FloatSlider.from_param(s.param.capacity_factor, name="Capacity factor", throttled=True,
                                                          format="0.00", width=170,
                                                          disabled=not s.scheme_info.uses_capacity)
        self.badge = _html(css=PAGE_CSS, sizing_mode="stretch_width", css_classes=["badge"], margin=(0, 6))

        self.preset.param.watch(self._on_preset, "value")
        self.text.param.watch(self._on_typing, "value_input")
        self.text.param.watch(self._on_text_commit, "value")
        self.route_btn.on_click(lambda e: self._commit_text(self.text.value_input or self.text.value, force=True))
        s.param.watch(self._on_scheme, ["scheme"])
        s.param.watch(self._sync_text, ["text"])
        self._typing_token = None

        # classroom: lessons, presenter mode, share links (in the page's header)
        self.lesson_pick = pn.widgets.Select(options={"Guided lesson\u2026": "", **{l.title: k for k, l in lessons().items()}},
                                             value="", width=240, css_classes=["lesson-pick"])
        self.presenter = pn.widgets.Toggle(name="Presenter mode", value=bool(self.page.get("presenter")), width=130)
        self.share_btn = pn.widgets.Button(name="Link to this view", width=130)
        self.page_control = PageControl(presenter=self.presenter.value)
        self.lesson_pick.param.watch(self._on_lesson_pick, "value")
        self.presenter.param.watch(self._on_presenter, "value")
        self.share_btn.on_click(self._make_link)
        self.page_control.param.watch(lambda e: self._lesson_move(+1), "next_presses")
        self.page_control.param.watch(lambda e: self._lesson_move(-1), "prev_presses")
        for w, bound in ((self.n_experts, s.param.n_experts), (self.balancing, s.param.balancing),
                         (self.scheme, s.param.scheme), (self.top_k, s.param.top_k),
                         (self.capacity, s.param.capacity_factor), (self.preset, None), (self.text, None),
                         (self.lesson_pick, None), (self.presenter, None)):
            refuse_bad_values(w, self._warn, bound)

    def _warn(self, message: str) -> None:
        self.notify("warning", message)

    def _on_presenter(self, event):
        self.page_control.presenter = event.new

    def _on_scheme(self, event):
        """A scheme without a top-k shows what it does instead of the slider; one without a capacity greys it."""
        info = self.state.scheme_info
        self.top_k.visible, self.k_fixed.visible = info.uses_k, not info.uses_k
        self.capacity.disabled = not info.uses_capacity

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
        s = self.state
        self.screen = refuse_bad_values(RouterScreen(name="router_screen", sizing_mode="stretch_width",
                                                     margin=(4, 6)).follow(s), self._warn)
        # the page asks again when a routing it asked for is not back after 1.5 s: the load test saw a scheduled
        # routing never run about once in 1,400 updates with 40 students busy (no error logged)
        self.screen.param.watch(lambda e: self._scheduled_route(), "nudge")
        self.status = _html(css=PAGE_CSS, css_classes=["status-line"], sizing_mode="stretch_width", margin=(0, 6))
        self.lesson_bar = self.share_row = None       # built the first time a lesson opens or a link is made

    def _on_view(self, *events):
        self._redraw_details()
        self._refresh_lesson_text()

    def _walkthrough(self, model, text, token, layer, request):
        """router_walkthrough, remembered for the last request (the lesson text and the walkthrough
        card both quote it, and a redraw should not run the model twice)."""
        key = (id(model), text, token, layer, request)
        if self._walk_cache is None or self._walk_cache[0] != key:
            self._walk_cache = (key, router_walkthrough(model, text, token, layer, request))
        return self._walk_cache[1]

    def _on_error(self, event):
        if event.new:
            self.notify("error", event.new)

    def _on_notice(self, event):
        if event.new:
            self.notify("warning", event.new)

    def _route(self, *events):
        """Route again. A routing that may take over 200 ms (a long text, BASE's balanced assignment) runs on
        the next tick, once the count of routings asked for (the browser's busy cue) has gone out; the
        first scheduled routing to run routes for all changes so far, the rest find nothing left to do.
        Others run at once, in the change's own callback (tens of ms: no cue to show): with every routing
        scheduled, the load test saw a session stop answering about once in 1,000 updates."""
        if self._hold_routing:
            self._route_pending = True
            return
        self.screen.asked += 1            # answered in the same message when routed at once: every routing
        doc = pn.state.curdoc             # ends with a change the page sees, even one that draws the same picture
        if doc is None or doc.session_context is None or not self._slow():
            self._route_now()
            return
        pn.state.execute(self._scheduled_route, schedule=True)

    def _slow(self) -> bool:
        """Whether this routing may take over 200 ms on a 2-core server (measured: ~20 ms for 200 tokens,
        ~300 ms for 1,000; BASE solves a linear program, 0.6 s)."""
        return len(self.state.text) > SLOW_TEXT_CHARS or self.state.scheme == "base"

    def _scheduled_route(self):
        if self.screen.answered < self.screen.asked:
            self._route_now()

    def _route_now(self):
        with pn.io.hold():
            self.state.route()
            self.screen.answered = self.screen.asked      # also when the routing drew exactly the old picture

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

    def _redraw(self, *events):
        s = self.state
        res = s.result
        if res is None:
            return
        with pn.io.hold():
            self.k_fixed.object = f"<div class='k-fixed'>{html.escape(k_fixed_text(s))}</div>"
            badge = s.badge()
            self.badge.object = (f"<div class='badge-{badge['level']}'>"
                                 + " ".join(html.escape(x) for x in badge["lines"]) + "</div>")
            trunc = " (truncated)" if res.truncated else ""
            self.status.object = (f"<span class='muted'>{len(res.tokens):,} tokens{trunc} routed through "
                                  f"{len(res.routings)} layers of {html.escape(s.model_info['name'])} in "
                                  f"{s.route_ms:.0f} ms on the server.</span>")
            self._redraw_details()
            self._refresh_lesson_text()

    # -- the Router details tab (built when first opened) ------------------------

    def details_tab(self):
        n_layer = len(self.state.param.layer.objects)
        d = self.details = SimpleNamespace()
        d.detail = _html(sizing_mode="stretch_width", css_classes=["detail-pane"])
        d.heatmap = HeatmapView(n_layer_max=n_layer)
        for src in d.heatmap.cells:
            src.selected.on_change("indices", self._make_tap_handler(src))
        d.flow = FlowView()
        d.balance = _html(sizing_mode="stretch_width")
        d.right_now = _md(sizing_mode="stretch_width", css_classes=["right-now"])
        d.loss = _html(css_classes=["loss-readout"])
        d.explainer = pn.Column(sizing_mode="stretch_width", css_classes=["explainer"], margin=0)
        d.walk = _html(sizing_mode="stretch_width", css_classes=["walkthrough"])
        d.as_table = pn.widgets.Checkbox(name="Show the heatmap as a table too", value=False)
        d.table_view = _html(sizing_mode="stretch_width", visible=False)
        d.as_table.param.watch(lambda e: self._redraw_details(), "value")
        c = self._named
        from .views.export import ExportPanel

        self.export = ExportPanel(state=self.state, css=CSS)
        view = pn.Column(
            _html("<div class='muted'>The same routing as the Router tab, every number of it. The selected token "
                  "and layer follow the Router tab.</div>", sizing_mode="stretch_width"),
            pn.Row(c("walkthrough", _card(d.walk, title="Inside the router: the selected token, step by step",
                                          name="walkthrough")),
                   c("detail", _card(d.detail, title="Selected token, every layer", width=420, name="detail")),
                   sizing_mode="stretch_width"),
            c("heatmap", _card(*[pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in d.heatmap.figs],
                               pn.pane.Bokeh(d.heatmap.legend), d.as_table, d.table_view,
                               title="Heatmap: router probability, tokens \u00d7 experts (drag sideways to pan)",
                               name="heatmap")),
            pn.Row(
                c("flow", _card(pn.pane.Bokeh(d.flow.fig, sizing_mode="stretch_width"),
                                _html("<div class='muted'>Tokens around the selected one, left; experts, right. Line "
                                      "width = combine weight; a dashed grey line = chosen but dropped (expert full)."
                                      "</div>"),
                                title="Flow: which experts each token goes to (selected layer)", name="flow")),
                _card(d.loss, d.right_now, title="Quality and what to notice", width=420),
                sizing_mode="stretch_width",
            ),
            c("balance", _card(d.balance, title="How balanced the load is, per layer", name="balance")),
            c("explainer", _card(d.explainer, title="About this routing scheme", name="explainer")),
            c("export", _card(self.export, title="Take it home: routing trace, code, plots", name="export")),
            sizing_mode="stretch_width",
        )
        self._redraw_details()
        return view

    def _make_tap_handler(self, src):
        def handler(attr, old, new):
            if new:
                t = int(src.data["t"][new[0]])
                src.selected.indices = []
                self.state.selected_token = t
        return handler

    def _redraw_details(self):
        """Redraw the Router details tab if it is shown; else mark it stale (drawn when next opened)."""
        s, d = self.state, self.details
        res = s.result
        shown = hasattr(self, "tabs") and self.tabs.value == "details"
        self._details_stale = not shown
        if d is None or res is None or not shown:
            return
        layers = s.layers_shown()
        with pn.io.hold():
            d.detail.object = token_detail(res, layers, s.selected_token)
            d.heatmap.update(res, layers, s.selected_token)
            d.flow.update(res, s.layer, s.selected_token)
            d.balance.object = balance_table(res, layers)
            d.right_now.object = right_now(res, layers, s.model_info)
            loss = "needs 2+ tokens" if res.loss is None else f"{res.loss:.3f}"
            d.loss.object = (f"<div class='label'>Next-token loss on your text</div><div class='big'>{loss}</div>"
                             f"<div class='muted'>nats; lower is better. Change k or the scheme to see "
                             f"what it costs.</div>")
            if getattr(d, "explainer_topic", None) != s.scheme:     # the scheme's explainer, made when it changes
                d.explainer.objects, d.explainer_topic = _explainer(s.scheme), s.scheme
            t = min(s.selected_token, len(res.tokens) - 1)
            try:
                w = self._walkthrough(s.model, s.text, t, s.layer, s.request())
                d.walk.object = walkthrough_html(w)
            except ValueError as e:
                d.walk.object = f"<div class='muted'>{html.escape(str(e))}</div>"
            d.table_view.visible = d.as_table.value
            if d.as_table.value:
                d.table_view.object = routing_table_html(res, layers)

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
            self.notify("error", str(e))
            return
        if self.lesson_pick.value != slug:
            self.lesson_pick.value = slug
        self._show_step()

    def _build_lesson_bar(self):
        """The lesson card: in the page's flow above the tabs, so it never covers the view it is about."""
        self.lesson_head = _html(css=PAGE_CSS, sizing_mode="stretch_width", css_classes=["lesson-head"], margin=0)
        self.lesson_body = _md(css=PAGE_CSS, sizing_mode="stretch_width", css_classes=["lesson-body"], margin=0)
        self.lesson_prev = pn.widgets.Button(name="\u25c0 Back", width=90, margin=(0, 4))
        self.lesson_next = pn.widgets.Button(name="Next \u25b6", button_type="primary", width=100, margin=(0, 4))
        self.lesson_exit = pn.widgets.Button(name="Close lesson", width=110, margin=(0, 4))
        self.lesson_prev.on_click(lambda e: self._lesson_move(-1))
        self.lesson_next.on_click(lambda e: self._lesson_move(+1) if not self._lesson_at_end() else self._stop_lesson())
        self.lesson_exit.on_click(lambda e: self._stop_lesson())
        self.lesson_bar = pn.Column(
            pn.Row(self.lesson_head, self.lesson_prev, self.lesson_next, self.lesson_exit, sizing_mode="stretch_width",
                   margin=0),
            self.lesson_body, css_classes=["lesson-bar"], name="lesson_bar", sizing_mode="stretch_width",
            stylesheets=[PAGE_CSS])
        self.layout.insert(1, self.lesson_bar)

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
        if self.lesson_bar is None:
            self._build_lesson_bar()
        self.show_tab(step.tab)
        self._highlight(step.highlight)
        i, n = self.lessons.step, len(lesson.steps)
        self.lesson_head.object = (f"<div class='lesson-title'>{html.escape(step.title)} <span class='label'>"
                                   f"{html.escape(lesson.title)} \u00b7 step {i + 1} of {n}</span></div>")
        self.lesson_prev.disabled = i == 0
        self.lesson_next.name = "Finish \u2713" if i == n - 1 else "Next \u25b6"
        self.lesson_bar.visible = True
        self.intro.visible = self.input.visible = False
        self._refresh_lesson_text()
        scroll = "" if step.highlight in SCREEN_VIEWS or not step.highlight else f"view-{step.highlight}"
        self.page_control.param.update(lesson_active=True, scroll_to=scroll,
                                       scroll_seq=self.page_control.scroll_seq + 1)

    def _highlight(self, name: str | None):
        self.screen.focus = name if name in SCREEN_VIEWS else ""
        for view, card in self._cards.items():
            classes = [c for c in card.css_classes if c != "lesson-focus"]
            card.css_classes = classes + (["lesson-focus"] if view == name else [])

    def _refresh_lesson_text(self):
        step = self.lessons.current_step
        if step is not None and self.state.result is not None and self.lesson_bar is not None:
            self.lesson_body.object = fill(step.body, lesson_numbers(self.state, self._walkthrough))

    def _stop_lesson(self):
        self.lessons.stop()
        if self.lesson_bar is not None:
            self.lesson_bar.visible = False
        self.intro.visible = True
        self.input.visible = "text" not in self.page.get("hide", [])
        self._highlight(None)
        self.page_control.lesson_active = False
        if self.lesson_pick.value:
            self.lesson_pick.value = ""

    def _make_link(self, event=None):
        loc = pn.state.location
        base = loc.href if loc is not None and loc.href else "http://localhost:5006/"
        if self.share_row is None:
            self.share_url = pn.widgets.TextInput(name="Link (copy it)", value="", sizing_mode="stretch_width",
                                                  css_classes=["share-url"])
            self.share_hide = pn.widgets.Checkbox(name="Lesson link: hide the controls", value=False)
            self.share_hide.param.watch(self._make_link, "value")
            self.share_row = pn.Row(self.share_url, self.share_hide, sizing_mode="stretch_width")
            self.layout.insert(1, self.share_row)
        tab = self.tabs.value
        lesson = self.lessons.lesson or None
        query = state_query(self.state, tab=tab, hide=["controls"] if self.share_hide.value else [],
                            lesson=lesson, step=self.lessons.step + 1 if lesson else None,
                            presenter=self.presenter.value)
        self.share_url.value = share_url(base, query)
        self.share_row.visible = True
        if len(self.state.text) > MAX_TEXT_IN_URL:
            self.notify("warning", f"The link carries only the first {MAX_TEXT_IN_URL:,} characters of your text.")

    # -- layout ------------------------------------------------------------------

    def header(self):
        """The page's header bar: the title and the classroom tools."""
        title = _html("<div class='app-title'>MoE Router Lab</div>", css=PAGE_CSS, margin=(0, 10), align="center",
                      styles={"margin-right": "auto"})          # the title left, the tools right
        return _wrapping_row(title, self.lesson_pick, self.presenter, self.share_btn, css_classes=["app-header"],
                             stylesheets=[PAGE_CSS], align_items="center")

    def controls(self):
        n = pn.Column(_html("<div class='n-label'>N (experts)</div>", css=PAGE_CSS, margin=(0, 10)), self.n_experts,
                      margin=0)                 # a button group has no title of its own
        return _wrapping_row(n, self.balancing, self.scheme, self.top_k, self.k_fixed, self.capacity,
                             css_classes=["controls"], margin=(0, 4))

    def input_row(self):
        return _wrapping_row(self.preset, self.text, self.route_btn, css_classes=["input-row"])

    def _named(self, name: str, card):
        self._cards[name] = card
        return card

    def router_tab(self):
        hide = self.page.get("hide", [])
        self.intro = _html(f"<div class='intro'>{INTRO}</div>", css=PAGE_CSS, sizing_mode="stretch_width", margin=(2, 8))
        self.input = self.input_row()
        self.input.visible = "text" not in hide
        self.control_row = self.controls()
        self.control_row.visible = "controls" not in hide
        return pn.Column(self.intro, self.input, self.control_row, self.screen, self.badge, self.status,
                         sizing_mode="stretch_width", margin=0)

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
        self.param_counters = _html(counters(self.state.result, self.state.model.config), sizing_mode="stretch_width")
        self.state.param.watch(lambda e: setattr(self.param_counters, "object", counters(e.new, self.state.model.config)),
                               "result")
        return pn.Column(
            c("params", _card(self.param_counters, title="Total vs active parameters of the loaded model",
                              name="params")),
            c("published", _card(_html(published_table(), sizing_mode="stretch_width"),
                                 pn.pane.Bokeh(published_chart(), sizing_mode="stretch_width"),
                                 title="Published MoE models: total vs active", name="published")),
            sizing_mode="stretch_width",
        )

    def compare_tab(self):
        from .views.compare import CompareView

        self.compare = CompareView(state=self.state, css=CSS, notify=self.notify)
        return self._named("compare", _card(
            _html("<div class='muted'>A is the Router tab's configuration; B is set here. Both route your text "
                  "through real models; change one thing at a time to see what it does.</div>"),
            self.compare, title="Compare two routing configurations on the same text", name="compare"))

    def learn_tab(self):
        topics = [("What is a mixture of experts?", "intro"),
                  *[(v.label, k) for k, v in SCHEMES.items()],
                  ("Load-balancing loss", "load_balance"), ("Router z-loss", "z_loss"),
                  ("DeepSeekMoE: fine-grained and shared experts", "shared_experts")]
        acc = pn.Accordion(*[(title, pn.Column(*_explainer(t), sizing_mode="stretch_width"))
                             for title, t in topics], active=[0], sizing_mode="stretch_width")
        return pn.Column(acc, sizing_mode="stretch_width")

    def main(self):
        """The tab bar and the views. Only the Router view is built with the session; every other view is built
        the first time it is opened (a lesson step or a link opens it too), and stays in the document after
        (Panel re-renders a pane updated while out of the document with stylesheets from its CDN, and a
        classroom may have no internet)."""
        tabs = {"Router": "router", "Router details": "details", "Compare": "compare", "Expert profiles": "profiles",
                "Watch it write": "write", "Experiments": "experiments", "Training lab": "lab", "Parameters": "params",
                "Scale": "scale", "Quiz": "quiz", "Learn": "learn"}
        self._builders = {"details": self.details_tab, "compare": self.compare_tab, "profiles": self.profiles_tab,
                          "write": self.write_tab, "experiments": self.experiments_tab, "lab": self.lab_tab,
                          "params": self.params_tab, "scale": self.scale_tab, "quiz": self.quiz_tab,
                          "learn": self.learn_tab}
        self.tab_names = list(tabs.values())
        self._views = {"router": self.router_tab()}
        self.tabs = pn.widgets.RadioButtonGroup(options=tabs, value="router", button_style="outline",
                                                button_type="primary", name="main_tabs", css_classes=["tab-bar"],
                                                margin=(4, 6), stylesheets=[".bk-btn-group { flex-wrap: wrap; }"],
                                                visible="tabs" not in self.page.get("hide", []))
        self.tab_views = pn.Column(self._views["router"], sizing_mode="stretch_width", margin=0)
        refuse_bad_values(self.tabs, self._warn).param.watch(self._on_tab, "value")
        if self.page.get("tab") in self.tab_names:
            self.show_tab(self.page["tab"])
        if self.page.get("lesson"):
            step = self.page.get("step", 1) - 1
            pn.state.onload(lambda: self._start_lesson(self.page["lesson"], step))
        return [self.tabs, self.tab_views]

    def show_tab(self, name: str):
        """Open a tab (building its views the first time)."""
        if name in self.tab_names:
            self.tabs.value = name

    def build_tab(self, name: str):
        """Build a tab's views now (first opening); later calls do nothing."""
        builder = self._builders.pop(name, None)
        if builder is not None:
            with pn.io.hold():
                self._views[name] = builder()
                self.tab_views.append(self._views[name])

    @property
    def lab(self):
        self.build_tab("lab")
        return self._lab

    def lab_tab(self):
        from .lab import TrainingLab

        self._lab = TrainingLab(notify=self.notify, css=CSS, router_state=self.state)
        return self._named("lab", pn.Column(self._lab, css_classes=["view-lab"], stylesheets=[FOCUS_CSS],
                                            sizing_mode="stretch_width"))

    def profiles_tab(self):
        from .views.profiles import ExpertProfiles

        self.profiles = ExpertProfiles(state=self.state, notify=self.notify)
        return self._named("profiles", _card(self.profiles, name="profiles",
                                             title="What each expert learned (held-out corpus), and switching one off"))

    def write_tab(self):
        from .views.write import WriteView

        self.writer = WriteView(state=self.state, notify=self.notify)
        return self._named("write", pn.Column(self.writer, css_classes=["view-write"], sizing_mode="stretch_width"))

    def experiments_tab(self):
        from .views.experiments import ExperimentsView

        self.experiments = ExperimentsView(state=self.state, notify=self.notify, open_tab=self.show_tab,
                                           lab_run=lambda: self._lab.saturation_run() if hasattr(self, "_lab") else None)
        return self._named("experiments", pn.Column(self.experiments, css_classes=["view-experiments"],
                                                    sizing_mode="stretch_width"))

    def quiz_tab(self):
        from .views.quiz import QuizView

        self.quiz = QuizView(state=self.state, on_show=self._show_quiz_setup, notify=self.notify)
        return self._named("quiz", _card(self.quiz, title="Predict, then check against the live model", name="quiz"))

    def _show_quiz_setup(self, setup: dict):
        from .quiz import apply_setup

        with self._one_route():
            apply_setup(self.state, setup)
        self.show_tab("router")

    def _on_tab(self, event):
        self.build_tab(event.new)
        for name, view in self._views.items():
            view.visible = name == event.new
        if event.new == "details" and self._details_stale:
            self._redraw_details()
        if hasattr(self, "compare"):
            if event.new == "compare":
                self.compare.show()
            else:
                self.compare.shown = False

    def page_layout(self):
        """The whole page: header, lesson card, tabs."""
        header = self.header()
        header.visible = "header" not in self.page.get("hide", [])
        self.layout = pn.Column(header, *self.main(), self.page_control, self.toast, sizing_mode="stretch_width",
                                margin=0, css_classes=["app-page"])
        return self.layout

    def __panel__(self):
        return self.page_layout()
