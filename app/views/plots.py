"""Bokeh views of one routing result for the Router details tab: heatmap and flow view.

Each view owns its figures and ColumnDataSources, and `update()` swaps the
data in place (the caller wraps updates in `pn.io.hold()`). Every model has a
`name=` so browser tests can read the state with Bokeh.documents[0].get_model_by_name.
Tooltips show token text through Bokeh's default escaping (never `{safe}`).
"""
from __future__ import annotations

import numpy as np
from bokeh.models import (
    BoxAnnotation,
    ColorBar,
    ColumnDataSource,
    FixedTicker,
    HoverTool,
    LinearColorMapper,
    Range1d,
    TapTool,
)
from bokeh.palettes import Cividis256
from bokeh.plotting import figure

from .palette import expert_colors

WINDOW = 64          # tokens visible at once in the heatmap (pan to see more)
FLOW_WINDOW = 24     # tokens shown in the flow view, around the selected one
PROB_PALETTE = list(reversed(Cividis256))  # light = low probability, dark = high; colour-blind safe


def token_label(text: str) -> str:
    """Readable axis label for a token: spaces and control characters made visible."""
    shown = text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
    shown = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in shown)
    return shown[:14] or "\u2205"


class HeatmapView:
    """Tokens x experts router probabilities, one small multiple per layer."""

    def __init__(self, n_layer_max: int = 4):
        self.figs, self.images, self.cells, self.drops, self.bands = [], [], [], [], []
        self.x_range = Range1d(-0.5, WINDOW - 0.5, name="heat_x_range")
        self.mapper = LinearColorMapper(palette=PROB_PALETTE, low=0.0, high=1.0)
        for li in range(n_layer_max):
            img = ColumnDataSource({"image": [np.zeros((1, 1))], "x": [-0.5], "y": [-0.5], "dw": [1], "dh": [1]},
                                   name=f"heat_image_{li}")
            cells = ColumnDataSource({k: [] for k in ("t", "e", "p", "w", "text", "color")}, name=f"heat_cells_{li}")
            drops = ColumnDataSource({k: [] for k in ("t", "e", "p", "text")}, name=f"heat_drops_{li}")
            f = figure(height=190, sizing_mode="stretch_width", x_range=self.x_range, tools="xpan,reset,save",
                       active_drag="xpan", toolbar_location="right", name=f"heatmap_{li}",
                       title=f"Layer {li}: router probability per token (rows: experts)")
            f.image(image="image", x="x", y="y", dw="dw", dh="dh", source=img, color_mapper=self.mapper)
            r = f.rect("t", "e", 1, 1, source=cells, fill_alpha=0, line_color="#000000", line_width=2)
            d = f.scatter("t", "e", source=drops, marker="x", size=12, line_color="#D55E00", line_width=3)
            band = BoxAnnotation(left=-0.5, right=0.5, fill_alpha=0.12, fill_color="#1a56db", line_color="#1a56db")
            f.add_layout(band)
            f.add_tools(HoverTool(renderers=[r], tooltips=[("token", "@t: @text"), ("expert", "@e"),
                                                           ("probability", "@p{0.000}"), ("weight", "@w{0.000}")]))
            f.add_tools(HoverTool(renderers=[d], tooltips=[("DROPPED token", "@t: @text"), ("expert", "@e"),
                                                           ("probability", "@p{0.000}")]))
            f.add_tools(TapTool(renderers=[r]))
            f.yaxis.axis_label = "expert"
            # tickers are made once and updated in place: assigning a NEW model to a live
            # document makes Bokeh re-walk every model and data list (seconds with 512 tokens)
            f.xaxis.ticker = FixedTicker(ticks=[])
            f.yaxis.ticker = FixedTicker(ticks=[])
            f.xgrid.visible = f.ygrid.visible = False
            f.xaxis.major_label_orientation = 1.2
            f.min_border_left = 50
            self.figs.append(f)
            self.images.append(img)
            self.cells.append(cells)
            self.drops.append(drops)
            self.bands.append(band)
        bar = ColorBar(color_mapper=self.mapper, title="probability", orientation="horizontal", height=8,
                       width=220, location=(0, 0))
        self.legend = figure(height=60, width=300, toolbar_location=None, min_border=0, outline_line_color=None,
                             name="heat_legend")
        self.legend.add_layout(bar, "below")
        # a figure that only holds a colour bar: one invisible glyph keeps Bokeh's
        # "plot has no renderers" warning out of the server log for every session
        self.legend.scatter([0], [0], alpha=0)
        self.legend.axis.visible = self.legend.grid.visible = False
        self.legend.title.text = "Outlined: expert used. \u00d7: chosen but dropped (capacity)."

    def update(self, result, layers: list[int], selected: int) -> None:
        if result is None:
            return
        T = len(result.tokens)
        texts = [t.text for t in result.tokens]
        labels = {i: token_label(t) for i, t in enumerate(texts)}
        self.x_range.update(start=-0.5, end=min(T, WINDOW) - 0.5)
        self.x_range.bounds = (-0.5, max(T, 1) - 0.5)
        for li, f in enumerate(self.figs):
            f.visible = li in layers
            if li not in layers or li >= len(result.routings):
                continue
            r = result.routings[li]
            N = r.n_experts
            probs = r.probs.numpy()
            self.images[li].data = {"image": [probs.T.copy()], "x": [-0.5], "y": [-0.5], "dw": [T], "dh": [N]}
            t_idx, e_idx = np.nonzero(r.dispatch.numpy())
            colors = expert_colors(N)
            self.cells[li].data = {"t": t_idx, "e": e_idx, "p": probs[t_idx, e_idx],
                                   "w": r.combine.numpy()[t_idx, e_idx], "text": [texts[t] for t in t_idx],
                                   "color": [colors[e] for e in e_idx]}
            dt, de = np.nonzero(r.dropped.numpy())
            self.drops[li].data = {"t": dt, "e": de, "p": probs[dt, de], "text": [texts[t] for t in dt]}
            f.y_range.update(start=-0.5, end=N - 0.5)
            f.yaxis.ticker.ticks = list(range(N)) if N <= 16 else list(range(0, N, 2))
            f.xaxis.ticker.ticks = list(range(T))
            f.xaxis.major_label_overrides = labels
            f.height = 90 + 14 * N          # rows of 14 px: every expert's row and tick label readable
        self.select(selected)

    def select(self, selected: int) -> None:
        for band in self.bands:
            band.update(left=selected - 0.5, right=selected + 0.5)
        start = self.x_range.start
        if not (start <= selected <= self.x_range.end):
            span = self.x_range.end - start
            new_start = max(-0.5, selected - span / 2)
            self.x_range.update(start=new_start, end=new_start + span)


class FlowView:
    """Tokens on the left, experts on the right, a line for each routing decision."""

    def __init__(self):
        self.tokens = ColumnDataSource({k: [] for k in ("x", "y", "label", "t", "alpha")}, name="flow_tokens")
        self.experts = ColumnDataSource({k: [] for k in ("x", "y", "label", "color", "load")}, name="flow_experts")
        self.links = ColumnDataSource({k: [] for k in ("x0", "y0", "x1", "y1", "w", "color", "alpha", "dash", "t", "e",
                                                       "text", "kind")}, name="flow_links")
        f = figure(height=520, sizing_mode="stretch_width", x_range=Range1d(-0.75, 1.3), y_range=Range1d(-1, 1),
                   tools="save",
                   toolbar_location="right", name="flow_fig", title="Flow")
        kept = f.segment("x0", "y0", "x1", "y1", source=self.links, line_width="w", line_color="color",
                         line_alpha="alpha", line_dash="dash")
        f.text("x", "y", text="label", source=self.tokens, text_align="right", text_baseline="middle",
               text_font={"value": "monospace"}, text_font_size="13px", text_alpha="alpha")
        dots = f.scatter("x", "y", source=self.experts, size=26, fill_color="color", line_color="#222")
        f.text("x", "y", text="label", source=self.experts, text_align="center", text_baseline="middle",
               text_font_size="12px", text_font_style="bold", text_color="#000000", x_offset=0, y_offset=0)
        f.add_tools(HoverTool(renderers=[kept], tooltips=[("token", "@t: @text"), ("expert", "@e"),
                                                          ("weight", "@w{0.00}"), ("", "@kind")]))
        f.add_tools(HoverTool(renderers=[dots], tooltips=[("expert", "@label"), ("tokens in window", "@load")]))
        f.axis.visible = f.grid.visible = False
        f.outline_line_color = None
        self.fig = f

    def update(self, result, layer: int, selected: int) -> None:
        if result is None:
            return
        r = result.routings[layer]
        T, N = len(result.tokens), r.n_experts
        lo = max(0, min(selected - FLOW_WINDOW // 2, T - FLOW_WINDOW))
        hi = min(T, lo + FLOW_WINDOW)
        ts = list(range(lo, hi))
        span = max(len(ts), N, 2)
        ty = {t: span - 1 - (i * (span - 1) / max(len(ts) - 1, 1)) for i, t in enumerate(ts)}
        ey = [span - 1 - (e * (span - 1) / max(N - 1, 1)) for e in range(N)]
        colors = expert_colors(N)
        texts = [t.text for t in result.tokens]
        self.tokens.data = {"x": [-0.02] * len(ts), "y": [ty[t] for t in ts],
                            "label": [f"{token_label(texts[t])} {t:>4}" for t in ts], "t": ts,
                            "alpha": [1.0 if t == selected else 0.75 for t in ts]}
        combine, dropped, dispatch = r.combine.numpy(), r.dropped.numpy(), r.dispatch.numpy()
        load = np.zeros(N, dtype=int)
        links = {k: [] for k in self.links.data}
        for t in ts:
            for e in range(N):
                used, drop = bool(dispatch[t, e]), bool(dropped[t, e])
                if not (used or drop):
                    continue
                load[e] += int(used)
                w = float(combine[t, e])
                links["x0"].append(0.0)
                links["y0"].append(ty[t])
                links["x1"].append(1.0)
                links["y1"].append(ey[e])
                links["w"].append(1.5 + 7 * w if used else 1.5)
                links["color"].append(colors[e] if used else "#777777")
                links["alpha"].append((0.95 if t == selected else 0.45) if used else 0.8)
                links["dash"].append("solid" if used else "dashed")
                links["t"].append(t)
                links["e"].append(e)
                links["text"].append(texts[t])
                links["kind"].append("used" if used else "DROPPED: expert was full")
        self.links.data = links
        self.experts.data = {"x": [1.0] * N, "y": ey, "label": [str(e) for e in range(N)], "color": colors,
                             "load": load.tolist()}
        self.fig.y_range.update(start=-1, end=span)
        self.fig.title.text = f"Layer {layer}: tokens {lo}\u2013{hi - 1} \u2192 experts"
