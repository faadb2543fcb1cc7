"""Published MoE models, total vs active parameters on a log scale."""
from __future__ import annotations

from bokeh.models import ColumnDataSource, HoverTool, Legend
from bokeh.plotting import figure
from bokeh.transform import dodge

from .panels import published_rows


def published_chart():
    rows = sorted(published_rows(), key=lambda r: r["total"])
    names = [r["model"] for r in rows]
    src = ColumnDataSource({
        "model": names,
        "total": [r["total"] / 1e9 for r in rows],
        "active": [r["active"] / 1e9 for r in rows],
        "share": [r["active"] / r["total"] for r in rows],
        "bf16": [r["bf16_gb"] for r in rows],
    }, name="published_source")
    f = figure(y_range=names, x_axis_type="log", height=60 + 38 * len(rows), sizing_mode="stretch_width",
               tools="save", toolbar_location="right", name="published_chart", x_range=(0.5, 3000),
               title="Billions of parameters (log scale): stored (total) vs used per token (active)")
    t = f.hbar(y=dodge("model", 0.18, range=f.y_range), right="total", left=0.5, height=0.34, source=src,
               fill_color="#0072B2", line_color=None)
    a = f.hbar(y=dodge("model", -0.18, range=f.y_range), right="active", left=0.5, height=0.34, source=src,
               fill_color="#E69F00", line_color=None, hatch_pattern="/", hatch_color="#7a4f00", hatch_alpha=0.4)
    f.add_layout(Legend(items=[("total (memory)", [t]), ("active per token (compute)", [a])],
                        location="bottom_right"))
    f.add_tools(HoverTool(tooltips=[("model", "@model"), ("total", "@total{0.0} B"), ("active", "@active{0.0} B"),
                                    ("active share", "@share{0.0%}"), ("bf16 weights", "@bf16{0,0} GB")]))
    f.ygrid.visible = False
    return f
