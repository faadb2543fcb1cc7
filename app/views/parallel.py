"""The parallelism view: where the experts live, and what travels between devices.

Everything it draws comes from a saved, real expert-parallel run
(`assets/parallel/*.json`, written by `moe_core.parallel.expert_parallel.record` under
torchrun; the file says which command made it) and from the parameter
counts of `moe_core.model.published`. Nothing is simulated.

    parallel_view()  ->  a Panel layout for one dashboard tab
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import panel as pn
from bokeh.models import ColumnDataSource, HoverTool, NumeralTickFormatter, Span
from bokeh.plotting import figure

from moe_core.analysis.export import current_keys
from moe_core.model.checkpoint import ASSETS
from moe_core.model.published import BYTES_PER_PARAM, compute, published_models

from ..styles import CSS
from .palette import expert_colors, text_color

RUN_DIR = Path(ASSETS) / "parallel"
GPU_GB = 80          # one H100 (or A100 80GB): 80 GB of HBM, the usual unit for "how many GPUs"
DTYPE = "bf16"       # how MoE checkpoints are usually served; 2 bytes per parameter
MAX_RUN_BYTES = 4 * 1024 * 1024


# ----------------------------------------------------------------------------- data


def list_runs() -> list[Path]:
    return sorted(RUN_DIR.glob("*.json"))


def load_run(path: str | Path) -> dict:
    """A saved expert-parallel run, checked enough that the figures cannot be built from nonsense."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no expert-parallel run at {path.name}")
    if path.stat().st_size > MAX_RUN_BYTES:
        raise ValueError(f"{path.name} is larger than {MAX_RUN_BYTES >> 20} MB; not a saved run")
    try:
        d = current_keys(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != "moe-router-lab/parallel-run/1":
        raise ValueError(f"{path.name} is not a saved expert-parallel run (format moe-router-lab/parallel-run/1)")
    try:
        P = int(d["world_size"])
        if len(d["placement"]) != P or not d["layers"]:
            raise ValueError
        for L in d["layers"]:
            if len(L["traffic"]) != P or any(len(row) != P for row in L["traffic"]):
                raise ValueError
            if len(L["load_per_rank"]) != P or len(L["dropped_per_rank"]) != P:
                raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path.name}: the run is incomplete (world_size, placement and per-layer traffic, "
                         f"load and drops per rank are needed)") from None
    return d


def gpu_table_rows(gpu_gb: float = GPU_GB, dtype: str = DTYPE) -> list[dict]:
    """Per published model: GPUs to HOLD every weight vs GPUs' worth of weights one token USES.

    Weights only (no KV cache, activations or optimizer state), so both are
    lower bounds. The gap is the point of expert parallelism: memory scales
    with total parameters, compute per token with active ones.
    """
    per_gpu = gpu_gb * 10**9
    rows = []
    for name in published_models():
        c = compute(name)
        total_b = c.total * BYTES_PER_PARAM[dtype]
        active_b = c.active_per_token * BYTES_PER_PARAM[dtype]
        rows.append({"key": name, "model": c.label, "total": c.total, "active": c.active_per_token,
                     "n_experts": c.n_experts, "top_k": c.top_k, "n_shared": c.n_shared,
                     "total_gb": total_b / 1e9, "active_gb": active_b / 1e9,
                     "gpus_total": max(1, math.ceil(total_b / per_gpu)),
                     "gpus_active": max(1, math.ceil(active_b / per_gpu)),
                     "flops_per_token": 2 * c.active_per_token})
    return rows


# ----------------------------------------------------------------------------- figures


def traffic_figure(run: dict, layer: int):
    """Heatmap: (token, expert) pairs sent from rank i (row) to rank j (column), with the numbers."""
    L = run["layers"][layer]
    P = run["world_size"]
    M = L["traffic"]
    top = max(1, max(max(row) for row in M))
    xs, ys, vals, labels, colors, kinds, fills = [], [], [], [], [], [], []
    for i in range(P):
        for j in range(P):
            v = M[i][j]
            xs.append(f"rank {j}")
            ys.append(f"rank {i}")
            vals.append(v)
            shade = f"#{255 - int(200 * v / top):02X}{255 - int(140 * v / top):02X}FF"
            labels.append(str(v))
            fills.append(shade)
            colors.append(text_color(shade))
            kinds.append("stays on the device" if i == j else "crosses the network")
    names = [f"rank {r}" for r in range(P)]
    src = ColumnDataSource({"x": xs, "y": ys, "v": vals, "label": labels, "color": colors, "kind": kinds,
                              "fill": fills})
    f = figure(x_range=names, y_range=list(reversed(names)), height=140 + 60 * P, width=max(340, 140 + 80 * P),
               toolbar_location="right", name="parallel_traffic",
               title=f"Layer {layer}: pairs sent, row \u2192 column")
    f.rect("x", "y", 1, 1, source=src, fill_color="fill", line_color="#ffffff")
    f.text("x", "y", text="label", source=src, text_align="center", text_baseline="middle",
           text_color="color", text_font_size="13px")
    f.add_tools(HoverTool(tooltips=[("from", "@y"), ("to", "@x"), ("pairs", "@v"), ("", "@kind")]))
    f.xaxis.axis_label = "destination (holds the expert)"
    f.yaxis.axis_label = "source (holds the token)"
    f.grid.visible = False
    return f


def load_figure(run: dict, layer: int):
    """Per device: pairs its experts computed, and pairs cut by capacity at its experts (stacked)."""
    L = run["layers"][layer]
    P = run["world_size"]
    names = [f"rank {r}" for r in range(P)]
    experts = [", ".join(map(str, e)) for e in run["placement"]]
    src = ColumnDataSource({"rank": names, "computed": L["load_per_rank"], "dropped": L["dropped_per_rank"],
                            "experts": experts, "tokens": L["tokens_per_rank"]})
    f = figure(x_range=names, height=300, sizing_mode="stretch_width", toolbar_location="right",
               name="parallel_load", title=f"Layer {layer}: work per device")
    f.vbar_stack(["computed", "dropped"], x="rank", width=0.6, source=src, color=["#0072B2", "#D55E00"],
                 legend_label=["computed by its experts", "dropped (expert full)"])
    fair = sum(L["load_per_rank"]) / P
    f.add_layout(Span(location=fair, dimension="width", line_dash="dotted", line_color="#444444"))
    cap = (run.get("capacity") or [None] * len(run["layers"]))[layer]
    top = max(a + b for a, b in zip(L["load_per_rank"], L["dropped_per_rank"]))
    if cap:
        per_device = cap * len(run["placement"][0])
        f.add_layout(Span(location=per_device, dimension="width", line_dash="dashed", line_color="#E69F00",
                          line_width=2))
        top = max(top, per_device)
    f.y_range.end = max(1, top) * 1.1
    f.add_tools(HoverTool(tooltips=[("device", "@rank"), ("experts", "@experts"), ("computed", "@computed"),
                                    ("dropped", "@dropped"), ("tokens it brought", "@tokens")]))
    f.legend.location = "top_right"
    f.y_range.start = 0
    f.yaxis.axis_label = "(token, expert) pairs"
    return f


def drops_figure(run: dict):
    """Drop rate of every layer (share of the router's choices cut by capacity), from the same run."""
    rates = run.get("drop_rate") or [0.0] * len(run["layers"])
    names = [f"layer {i}" for i in range(len(rates))]
    src = ColumnDataSource({"layer": names, "rate": rates,
                            "dropped": [sum(L["dropped_per_rank"]) for L in run["layers"]]})
    f = figure(x_range=names, height=220, sizing_mode="stretch_width", toolbar_location="right",
               name="parallel_drops", title="Capacity drops per layer (share of the router's choices)")
    f.vbar(x="layer", top="rate", width=0.6, source=src, color="#D55E00")
    f.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("drop rate", "@rate{0.0%}"), ("pairs dropped", "@dropped")]))
    f.y_range.start = 0
    f.yaxis.formatter = NumeralTickFormatter(format="0%")
    return f


# ----------------------------------------------------------------------------- HTML


def placement_html(run: dict) -> str:
    colors = expert_colors(run["model"]["n_experts"])
    cells = []
    for r, experts in enumerate(run["placement"]):
        chips = "".join(f"<span style='background:{colors[e]};color:{text_color(colors[e])};padding:1px 6px;"
                        f"margin:0 2px;border-radius:3px'>{int(e)}</span>" for e in experts)
        cells.append(f"<td><b>rank {r}</b><br>{chips}</td>")
    return f"<table class='mini'><tr>{''.join(cells)}</tr></table>"


def run_summary_html(run: dict, layer: int) -> str:
    L = run["layers"][layer]
    M = L["traffic"]
    total = sum(map(sum, M))
    off = total - sum(M[i][i] for i in range(len(M)))
    crossing = off / total if total else 0.0
    moved = off * L["bytes_per_pair"] * 2          # dispatch there, combine back
    m = run["model"]
    cf = f", capacity factor {run['capacity_factor']}" if run.get("capacity_factor") else ""
    k = f", top-{run['top_k']}" if run.get("top_k") else ""
    return (f"<p>Measured run: model <b>{html.escape(str(m['name']))}</b> (N = {int(m['n_experts'])}), scheme "
            f"{html.escape(str(run['scheme']))}{html.escape(k)}{html.escape(cf)}, {int(run['n_tokens'])} tokens "
            f"({html.escape(str(run.get('text', '')))}) on {int(run['world_size'])} processes "
            f"({html.escape(str(run['backend']))}); {html.escape(str(run.get('machine', '')))}.</p>"
            f"<p>Layer {layer}: <b>{crossing:.0%}</b> of the {total} (token, expert) pairs that were computed "
            f"cross to another device ({moved / 1e6:.2f} MB there and back at {int(L['bytes_per_pair'])} bytes "
            f"per token row; dropped pairs never travel). If every pair went to a device picked uniformly "
            f"at random, (P − 1) / P = {(len(M) - 1) / len(M):.0%} would cross. "
            f"The slowest rank spent {L['exchange_s'] * 1e3:.1f} ms in the two all-to-alls and "
            f"{L['expert_s'] * 1e3:.1f} ms in its experts (processes on one machine, talking over loopback). "
            f"Routing group: {html.escape(str(run.get('routing_group', '')))}: capacity is shared by all "
            f"devices' tokens, exactly as in one process."
            f"</p><p class='muted'>Made by: <code>{html.escape(str(run.get('command', '')))}</code></p>")


def gpu_table_html(gpu_gb: float = GPU_GB, dtype: str = DTYPE) -> str:
    rows = []
    for r in gpu_table_rows(gpu_gb, dtype):
        experts = f"{r['n_experts']} \u2192 top-{r['top_k']}" + (f" +{r['n_shared']} shared" if r["n_shared"] else "")
        rows.append(f"<tr><td>{html.escape(r['model'])}</td><td class='num'>{html.escape(experts)}</td>"
                    f"<td class='num'>{r['total'] / 1e9:,.1f} B</td><td class='num'>{r['total_gb']:,.0f} GB</td>"
                    f"<td class='num'><b>{r['gpus_total']}</b></td>"
                    f"<td class='num'>{r['active'] / 1e9:,.1f} B</td><td class='num'>{r['active_gb']:,.1f} GB</td>"
                    f"<td class='num'><b>{r['gpus_active']}</b></td>"
                    f"<td class='num'>{r['flops_per_token'] / 1e9:,.0f} GFLOP</td></tr>")
    return ("<table class='mini published'><thead><tr><th>model</th><th>experts</th><th>total params</th>"
            f"<th>{dtype} weights</th><th>GPUs to hold them</th><th>active params</th><th>active weights</th>"
            "<th>GPUs' worth used per token</th><th>compute per token</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            f"<p class='muted'>Assumes {gpu_gb:g} GB per GPU (one H100 or A100 80GB) and {dtype} weights "
            f"({BYTES_PER_PARAM[dtype]} bytes per parameter); weights only, no KV cache, activations or "
            "optimizer state, so real deployments need more. Compute per token is the usual 2 \u00d7 active "
            "parameters estimate for a forward pass (matrix multiplies, attention over the context left out). "
            "Parameter counts: moe_core.model.published, from each model's hyper-parameters.</p>")


# ----------------------------------------------------------------------------- the view


def _html(text: str, **kw):
    return pn.pane.HTML(text, stylesheets=[CSS], sizing_mode="stretch_width", **kw)


def run_card(run: dict) -> pn.viewable.Viewable:
    """Placement, traffic heatmap, work per device and drops of one saved run, with a layer picker."""
    layers = {f"layer {i}": i for i in range(len(run["layers"]))}
    pick = pn.widgets.RadioButtonGroup(options=layers, value=0, name="layer", button_type="default")
    traffic = pn.pane.Bokeh(traffic_figure(run, 0))
    load = pn.pane.Bokeh(load_figure(run, 0), sizing_mode="stretch_width")
    summary = _html(run_summary_html(run, 0))

    def show(event):
        traffic.object = traffic_figure(run, event.new)
        load.object = load_figure(run, event.new)
        summary.object = run_summary_html(run, event.new)

    pick.param.watch(show, "value")
    if any(sum(L["dropped_per_rank"]) for L in run["layers"]):
        drops = pn.pane.Bokeh(drops_figure(run), sizing_mode="stretch_width")
    else:
        why = "had room for every choice" if run.get("capacity_factor") else "has no expert capacity (dropless)"
        drops = _html(f"<p><b>No capacity drops</b> in any layer: {html.escape(str(run['scheme']))} {why}, "
                      "so every (token, expert) pair the router chose was computed.</p>")
    return pn.Column(
        _html("<p>Experts placed on the devices (each process of the run is one device):</p>" + placement_html(run)),
        pick, summary, pn.Row(traffic, load, sizing_mode="stretch_width"),
        _html("<p class='muted'>Heatmap: the diagonal is work that stays on its device; everything off it "
              "crosses the network twice (dispatch, then combine). "
              "Dotted line: the fair share of work per device. Dashed orange line: the "
              "capacity of a device's experts (slots per expert \u00d7 experts per device), for schemes with "
              "capacity.</p>"),
        drops, sizing_mode="stretch_width")


def parallel_view(run_path: str | Path | None = None) -> pn.viewable.Viewable:
    """The dashboard's parallelism tab: saved expert-parallel runs, and the GPU calculator.

    `run_path` shows one run file; by default every run in assets/parallel, with a picker.
    """
    gpus = pn.Card(_html(gpu_table_html()), title=f"Published models: GPUs ({GPU_GB} GB, {DTYPE}) to hold all "
                   "weights vs the weights one token uses", collapsible=False, sizing_mode="stretch_width")
    paths = [Path(run_path)] if run_path else list_runs()
    runs, problems = {}, []
    for path in paths:
        try:
            runs[path.stem] = load_run(path)
        except ValueError as e:
            problems.append(str(e))
    if not paths:
        problems.append("no saved expert-parallel run in assets/parallel (see moe_core/parallel/expert_parallel.py: record)")
    notes = [_html(f"<p class='muted'>{html.escape(p)}</p>") for p in problems]
    if not runs:
        return pn.Column(*notes, gpus, sizing_mode="stretch_width")
    body = pn.Column(run_card(next(iter(runs.values()))), sizing_mode="stretch_width")
    parts = [*notes]
    if len(runs) > 1:
        choose = pn.widgets.Select(name="saved run", options=list(runs), value=next(iter(runs)), width=320)

        def swap(event):
            body.objects = [run_card(runs[event.new])]

        choose.param.watch(swap, "value")
        parts.append(choose)
    card = pn.Card(*parts, body, title="Expert parallelism: measured torch.distributed runs", collapsible=False,
                   sizing_mode="stretch_width")
    return pn.Column(card, gpus, sizing_mode="stretch_width")


__all__ = ["parallel_view", "run_card", "load_run", "list_runs", "gpu_table_rows", "gpu_table_html", "traffic_figure",
           "load_figure", "drops_figure"]
