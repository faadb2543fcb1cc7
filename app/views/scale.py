"""Scale it up: time per forward stays nearly flat while weight memory grows with N.

Two Bokeh figures from `moe_core.perf.scale` measurements of the real MoELayer: on
this server (measured once per process in a low-priority background thread,
then cached) or, until that finishes, the reference measurement shipped in
assets/scale/reference.json. The source line always says which one is shown.
Beside them, the published models' total vs active parameters
(`published_chart`, the same chart as the Parameters tab).
"""
from __future__ import annotations

import html
from datetime import datetime

import panel as pn
import param
from bokeh.models import ColumnDataSource, FixedTicker, HoverTool, Legend
from bokeh.plotting import figure

from moe_core.perf.scale import ScaleRunner, default_runner, load_reference, summary

from .published_chart import published_chart

MOE_COLOR, DENSE_COLOR, ACTIVE_COLOR = "#0072B2", "#D55E00", "#E69F00"
POLL_MS = 1000


def _when(iso: str | None) -> str:
    """'14:05 UTC on 2026-11-29' from an ISO timestamp."""
    if not iso:
        return "an unknown time"
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return "an unknown time"
    return f"{t:%H:%M} UTC on {t:%Y-%m-%d}"


def _setup(result: dict) -> str:
    c, m = result["config"], result["machine"]
    threads = m.get("torch_threads")
    return (f"{threads} torch thread{'s' if threads != 1 else ''}, {m.get('processor', 'unknown CPU')}, "
            f"d_model {c['d_model']}, expert d_ff {c['d_ff']}, k = {c['top_k']}, {c['tokens']:,} tokens per "
            f"forward, {c['dtype']}, median of {c['repeats']} rounds, {c.get('clock', 'wall time')}"
            + (f", load average {m['load_avg_1min']:g} on the machine meanwhile" if m.get("load_avg_1min") is not None
               else "")
            + (f", freed memory {m['freed_pages']}" if m.get("freed_pages") else ""))


def source_line(status: dict, reference: dict | None) -> tuple[str, dict | None]:
    """(plain text saying where the numbers come from, the result to plot) for a runner status."""
    res = status.get("result")
    if status.get("state") == "done" and res is not None:
        how = "measured earlier on this server (cached)" if status.get("cached") else "measured on this server"
        return f"{how} at {_when(res.get('measured_at'))}: {_setup(res)}.", res
    if reference is None:
        if status.get("state") == "failed":
            return f"The measurement on this server failed ({status.get('error')}) and no reference is shipped.", None
        return "Measuring on this server; the numbers appear when it is done.", None
    ref = (f"Reference measurement from {_when(reference.get('measured_at'))} on "
           f"{reference.get('label', 'another machine')}: {_setup(reference)}.")
    if status.get("state") == "running":
        done, total = status.get("progress") or (0, 0)
        return f"{ref} This server is measuring itself now ({done} of {total} timing rounds done).", reference
    if status.get("state") == "failed":
        return f"{ref} (The measurement on this server failed: {status.get('error')}.)", reference
    return ref, reference


class ScaleView(pn.viewable.Viewer):
    """Time and weight memory of the MoE layer for growing N at fixed k, plus published models."""

    runner = param.ClassSelector(class_=ScaleRunner, default=None, allow_None=True,
                                 doc="Who measures (default: the process-wide runner shared by all sessions).")
    show_published = param.Boolean(default=True, doc="Show the published models' total vs active chart beside.")
    autostart = param.Boolean(default=True, doc="Start measuring this server if nobody has yet.")
    css = param.String(default="", doc="Stylesheet for the text panes (app.styles.CSS).")

    def __init__(self, **params):
        super().__init__(**params)
        if self.runner is None:
            self.runner = default_runner()
        self.reference = load_reference()
        self.time_src = ColumnDataSource({"n": [], "ms": [], "label": []}, name="scale_time")
        self.dense_src = ColumnDataSource({"n": [], "ms": []}, name="scale_dense")
        self.mem_src = ColumnDataSource({"n": [], "mb": [], "active_mb": [], "total": [], "active": [],
                                         "label": []}, name="scale_memory")
        self.time_fig, self.mem_fig = self._figures()
        kw = {"stylesheets": [self.css]} if self.css else {}
        self.source = pn.pane.HTML(sizing_mode="stretch_width", css_classes=["muted"], name="scale_source", **kw)
        self.readout = pn.pane.HTML(sizing_mode="stretch_width", name="scale_readout", **kw)
        self._shown = None          # the result dict on screen (identity: redraw only when it changes)
        self._callback = None
        if self.autostart:
            self.runner.start()
        self.refresh()
        if self.runner.status()["state"] == "running" and pn.state.curdoc is not None \
                and pn.state.curdoc.session_context is not None:
            # poll only while measuring; a periodic callback made in a session belongs to that session
            self._callback = pn.state.add_periodic_callback(self.refresh, period=POLL_MS)

    # -- figures ---------------------------------------------------------------------

    def _figures(self):
        common = dict(height=300, sizing_mode="stretch_width", x_axis_type="log", tools="save,reset",
                      toolbar_location="right")
        t = figure(title="Time per forward vs N (k fixed): compute follows k, not N", name="scale_time_fig",
                   **common)
        moe = t.line("n", "ms", source=self.time_src, line_width=3, color=MOE_COLOR)
        t.scatter("n", "ms", source=self.time_src, size=9, color=MOE_COLOR)
        dense = t.line("n", "ms", source=self.dense_src, line_width=2, line_dash="dashed", color=DENSE_COLOR)
        t.add_layout(Legend(items=[("MoE layer (measured)", [moe]),
                                   ("dense FFN with the same active weights (measured)", [dense])],
                            location="top_left", label_text_font_size="11px"))
        t.add_tools(HoverTool(renderers=[moe], tooltips=[("N", "@n"), ("time", "@ms{0.0} ms")]))
        t.yaxis.axis_label = "ms per forward (CPU time, median)"

        m = figure(title="Weight memory vs N: every expert is stored", name="scale_memory_fig", **common)
        tot = m.line("n", "mb", source=self.mem_src, line_width=3, color=MOE_COLOR)
        m.scatter("n", "mb", source=self.mem_src, size=9, color=MOE_COLOR)
        m.text("n", "mb", text="label", source=self.mem_src, text_font_size="11px", x_offset=-8, y_offset=-4,
               text_align="right", text_baseline="bottom")
        act = m.line("n", "active_mb", source=self.mem_src, line_width=2, line_dash="dashed", color=ACTIVE_COLOR)
        m.add_layout(Legend(items=[("all weights (memory)", [tot]), ("weights one token uses (active)", [act])],
                            location="top_left", label_text_font_size="11px"))
        m.add_tools(HoverTool(renderers=[tot], tooltips=[("N", "@n"), ("weights", "@mb{0.0} MB (@total{0,0} params)"),
                                                         ("used per token", "@active_mb{0.00} MB (@active{0,0})")]))
        m.yaxis.axis_label = "MB of float32 weights"
        for f in (t, m):
            f.xaxis.axis_label = "N (experts per layer, log scale)"
            f.xaxis.ticker = FixedTicker(ticks=[])      # set to the measured N values in _draw
            f.y_range.start = 0
            f.xgrid.visible = False
        return t, m

    # -- data ------------------------------------------------------------------------

    def refresh(self) -> None:
        """Show the best numbers available; stop polling once this server's measurement has ended."""
        status = self.runner.status()
        text, result = source_line(status, self.reference)
        with pn.io.hold():
            self.source.object = f"<div class='muted'>{html.escape(text)}</div>"
            if result is not None and result is not self._shown:
                self._draw(result)
        if status["state"] in ("done", "failed") and self._callback is not None:
            self._callback.stop()
            self._callback = None

    def _draw(self, result: dict) -> None:
        rows = result["rows"]
        ns = [r["n_experts"] for r in rows]
        self.time_src.data = {"n": ns, "ms": [r["ms"] for r in rows], "label": [f"{r['ms']:.0f}" for r in rows]}
        self.dense_src.data = {"n": [ns[0], ns[-1]], "ms": [result["dense"]["ms"]] * 2}
        self.mem_src.data = {"n": ns, "mb": [r["weight_mb"] for r in rows],
                             "active_mb": [r["active_weight_mb"] for r in rows],
                             "total": [r["total_params"] for r in rows],
                             "active": [r["active_params_per_token"] for r in rows],
                             "label": [f"{r['weight_mb']:.3g} MB" for r in rows]}
        for f in (self.time_fig, self.mem_fig):
            f.xaxis.ticker.ticks = ns
            f.xaxis.major_label_overrides = {n: str(n) for n in ns}
            f.x_range.start, f.x_range.end = ns[0] / 2.2, ns[-1] * 1.4   # room for the labels on the left
        self.time_fig.y_range.end = max(max(r["ms"] for r in rows), result["dense"]["ms"]) * 1.6  # legend room
        self.mem_fig.y_range.end = rows[-1]["weight_mb"] * 1.2
        s = summary(result)
        self.readout.object = (
            f"<div>From N = {s['n_from']} to N = {s['n_to']} experts (k = {result['config']['top_k']}): the weights "
            f"grow <b>\u00d7{s['memory_ratio']:.0f}</b>, the weights one token uses \u00d7{s['active_ratio']:.2f} "
            f"(only the router grows), and the measured time per forward \u00d7{s['time_ratio']:.2f}. Time is "
            f"not perfectly flat: with more experts each one gets fewer tokens (smaller matrix products), the "
            f"layer loops over more experts, and more weights must be read from memory.</div>")
        self._shown = result

    def __panel__(self):
        plots = pn.Column(self.source, pn.pane.Bokeh(self.time_fig, sizing_mode="stretch_width"),
                          pn.pane.Bokeh(self.mem_fig, sizing_mode="stretch_width"), self.readout,
                          sizing_mode="stretch_width")
        if not self.show_published:
            return plots
        chart = published_chart()
        # the Parameters tab may show the same chart in this document: keep model names unique
        chart.name = "scale_published_chart"
        for r in chart.renderers:
            r.data_source.name = "scale_published_source"
        kw = {"stylesheets": [self.css]} if self.css else {}
        published = pn.Column(
            pn.pane.HTML("<div class='muted'>Published models, parameters counted from their configs: the same "
                         "pattern at full scale, memory for every expert, compute for the active ones.</div>",
                         sizing_mode="stretch_width", **kw),
            pn.pane.Bokeh(chart, sizing_mode="stretch_width"), sizing_mode="stretch_width")
        return pn.Column(plots, published, sizing_mode="stretch_width")


__all__ = ["ScaleView", "source_line"]
