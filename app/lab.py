"""The training lab tab: train a real MoE live and watch the router collapse, or not.

Widgets build a `moe_core.train.lab.Recipe`; Train subscribes to the job for it in the
process-wide `moe_core.train.lab.manager()` (one job per recipe, shared by every session that
asks for it; server-wide cap, queue); a periodic callback polls the subscription and streams its
new steps into Bokeh sources. One subscription per session: a new Train leaves the old job, and
so does a page that has lost its connection (`page_connected`, checked by the manager).
"""
from __future__ import annotations

import html
import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import panel as pn
import param
from bokeh.core.properties import value
from bokeh.models import ColumnDataSource, HoverTool, Legend, Span
from bokeh.plotting import figure

from moe_core.experiments import saturation_curve
from moe_core.model.routing import SCHEMES
from moe_core.train.lab import (
    BALANCING,
    COLLAPSED_SHARE,
    MAX_EXPERTS,
    MAX_STEPS,
    PROBE_EVERY,
    PROBE_WINDOWS,
    RECIPES,
    UNEVEN_FACTOR,
    Recipe,
    manager,
    status,
)

from .views.guard import refuse_bad_values
from .views.palette import expert_colors

POLL_MS = 400
RUN_COLORS = ["#0072B2", "#D55E00"]
RUN_DASH = ["solid", "dashed"]


def page_connected(doc) -> Callable[[], bool] | None:
    """For a served page: whether its websocket is still open (None outside a server).

    Panel's session-destroyed hook fires only when the server discards the session, 5 min after
    the tab closed in the Procfile; the job manager asks this every 0.5 s instead. Bokeh has no
    public accessor for the session's connections: `_session` is its ServerSession (None while
    the session is being created)."""
    ctx = doc.session_context if doc is not None else None
    if ctx is None:
        return None

    def alive() -> bool:
        session = ctx._session
        return session is None or (not session.destroyed and session.connection_count > 0)
    return alive


def wait_text(seconds: float | None) -> str:
    if seconds is None:
        return "the wait is estimated once a job has trained a few steps"
    return f"starts in about {seconds:.0f} s" if seconds < 90 else f"starts in about {seconds / 60:.0f} min"


def queue_text(snap: dict, slots: int) -> str:
    """What a queued student reads: their place, and when their job should start."""
    return (f"Waiting for a free training slot: position {snap['queue_position']} in the queue, "
            f"{wait_text(snap['wait_s'])} (this server trains {slots} job(s) at a time).")


def held(handler):
    """`handler()` as a widget callback, run with the document's events held (`pn.io.hold`).

    The lab's handlers set Bokeh sources directly. A click that reaches the server while another
    control's change waits out Panel's 50 ms debounce (a slider moved, then Train at once) is run
    by Panel 1.9 without Bokeh's document lock, and a direct model change there raised
    "_pending_writes should be non-None": Train then did nothing. Under a hold, Panel collects the
    changes and sends them itself, locked or not."""
    def callback(event=None):
        with pn.io.hold():
            handler()
    return callback


SATURATION_COLORS = ["#0b3d6e", "#b35806", "#1b7837", "#762a83"]


class TrainingLab(pn.viewable.Viewer):
    """Controls + live plots for one session's training job."""

    router_state = param.Parameter(default=None, doc="The dashboard's RouterState, to route with a lab model.")

    def __init__(self, notify=None, css: str = "", **params):
        super().__init__(**params)
        self._notify = notify or (lambda kind, msg: None)
        self._css = [css] if css else []
        self.job = None
        self._since = [0, 0]
        self._poll_cb = None
        self._build_widgets()
        # sources are made once and reused (their names stay unique in the document)
        self.loss_src = [ColumnDataSource({"step": [], "loss": []}, name=f"lab_loss_{i}") for i in range(2)]
        self.eval_src = [ColumnDataSource({"step": [], "eval": []}, name=f"lab_eval_{i}") for i in range(2)]
        self.busy_src = [ColumnDataSource({"step": [], "busiest": []}, name=f"lab_busiest_{i}") for i in range(2)]
        self.bal_src = [ColumnDataSource({"step": [], "max_over_mean": [], "load_balance": [], "dead": []},
                                         name=f"lab_balance_{i}") for i in range(2)]
        self.share_src = [ColumnDataSource({"step": []}, name=f"lab_share_{i}") for i in range(2)]
        self.bias_src = [ColumnDataSource({"step": []}, name=f"lab_bias_{i}") for i in range(2)]
        self.sat_src = ColumnDataSource({"step": []}, name="lab_saturation")
        self._build_plots(Recipe(), None)
        self._alive = page_connected(pn.state.curdoc)
        if self._alive is not None:
            pn.state.on_session_destroyed(lambda ctx: self.cancel())

    # -- widgets -------------------------------------------------------------------

    def _build_widgets(self):
        self.preset = pn.widgets.Select(name="Preset", options=list(RECIPES), value=list(RECIPES)[0])
        self.n = pn.widgets.IntSlider(name="N (experts)", start=2, end=MAX_EXPERTS, value=8)
        self.k = pn.widgets.IntSlider(name="k (experts per token)", start=1, end=8, value=2)
        self.scheme = pn.widgets.Select(name="Routing scheme", options={v.label: k for k, v in SCHEMES.items()},
                                        value="softmax_topk")
        self.balancing = pn.widgets.Select(name="Balancing", options={v: k for k, v in BALANCING.items()},
                                           value="none")
        self.aux = pn.widgets.FloatSlider(name="Load-balancing loss weight", start=0.0, end=0.1, step=0.001,
                                          value=0.01, format="0.000")
        self.gamma = pn.widgets.FloatSlider(name="DeepSeek bias step \u03b3", start=0.0, end=0.05, step=0.001,
                                            value=0.01, format="0.000")
        self.capacity = pn.widgets.FloatSlider(name="Capacity factor", start=0.5, end=4.0, step=0.05, value=1.25)
        self.steps = pn.widgets.IntSlider(name="Steps", start=20, end=MAX_STEPS, step=10, value=300)
        self.seed = pn.widgets.IntInput(name="Seed", value=0, start=0, end=2**31 - 1)
        self.compare = pn.widgets.Select(name="Compare with (same seed and data)",
                                         options=["(nothing)", *RECIPES], value="(nothing)")
        self.train_btn = pn.widgets.Button(name="Train", button_type="primary")
        self.pause_btn = pn.widgets.Button(name="Pause", disabled=True)
        self.step_btn = pn.widgets.Button(name="Step +1", disabled=True)
        self.reset_btn = pn.widgets.Button(name="Reset", disabled=True)
        self.use_btn = pn.widgets.Button(name="Route text with this model", disabled=True, button_type="success")
        self.download = pn.widgets.FileDownload(callback=self._download, filename="moe-lab-model.zip",
                                                label="Download model (safetensors + config)", disabled=True,
                                                button_type="default")
        self.progress = pn.indicators.Progress(value=0, max=100, sizing_mode="stretch_width", bar_color="primary")
        self.status = pn.pane.HTML(stylesheets=self._css, sizing_mode="stretch_width")
        self.layer = pn.widgets.RadioButtonGroup(name="Layer", options={"layer 0": 0, "layer 1": 1}, value=0, css_classes=["lab-layer"])
        for w in (self.preset, self.n, self.k, self.scheme, self.balancing, self.aux, self.gamma, self.capacity,
                  self.steps, self.seed, self.compare, self.layer):   # values from the browser are untrusted
            refuse_bad_values(w, lambda msg: self._notify("warning", msg))

        self.preset.param.watch(self._on_preset, "value")
        self.scheme.param.watch(self._on_scheme, "value")
        self.n.param.watch(lambda e: setattr(self.k, "end", max(1, min(8, e.new))), "value")
        self.train_btn.on_click(held(self.start))
        self.pause_btn.on_click(held(self.toggle_pause))
        self.step_btn.on_click(lambda e: self.job and self.job.step(1))
        self.reset_btn.on_click(held(self.reset))
        self.use_btn.on_click(held(self.use_model))
        self.layer.param.watch(held(self._rebuild_share_plots), "value")
        self._on_preset(None)
        self._set_status("idle", "Pick a recipe and press Train. The model is the shipped one made smaller "
                                 "(2 layers, d_model 64) so a minute of CPU shows the dynamics.")

    def _on_preset(self, event):
        r = RECIPES[self.preset.value]
        self.n.value, self.k.value, self.scheme.value = r.n_experts, r.top_k, r.scheme
        self.balancing.value, self.capacity.value = r.balancing, r.capacity_factor
        self._on_scheme(None)

    def _on_scheme(self, event):
        s = SCHEMES[self.scheme.value]
        self.k.disabled = not s.uses_k
        self.capacity.disabled = not s.uses_capacity

    def recipe(self) -> Recipe:
        return Recipe(n_experts=self.n.value, top_k=self.k.value, scheme=self.scheme.value,
                      balancing=self.balancing.value, aux_loss_coef=self.aux.value, bias_update_rate=self.gamma.value,
                      capacity_factor=self.capacity.value, steps=self.steps.value, seed=int(self.seed.value or 0))

    # -- job control ---------------------------------------------------------------------

    def start(self):
        try:
            recipes = [self.recipe().validate()]
            if self.compare.value in RECIPES:
                other = RECIPES[self.compare.value]
                recipes.append(Recipe(**{**other.__dict__, "steps": recipes[0].steps, "seed": recipes[0].seed,
                                         "n_experts": recipes[0].n_experts}).validate())
        except ValueError as e:
            self._notify("error", str(e))
            return
        self.cancel()
        self.job = manager().submit(recipes, alive=self._alive)
        self._since = [0] * len(recipes)
        self._build_plots(recipes[0], recipes[1] if len(recipes) > 1 else None)
        for b in (self.pause_btn, self.step_btn, self.reset_btn):
            b.disabled = False
        self.use_btn.disabled = self.download.disabled = True
        self.pause_btn.name = "Pause"
        if self._poll_cb is None:
            self._poll_cb = pn.state.add_periodic_callback(self.poll, period=POLL_MS)
        # status only: steps the job made already are streamed by the next poll, in a hold of its own
        # (see _rebuild_share_plots: a reset and a stream in one hold reach the page twice)
        self._show_progress(self.job.snapshot(self._since))

    def toggle_pause(self):
        if self.job is None:
            return
        if self.job.state == "paused":
            self.job.resume()
            self.pause_btn.name = "Pause"
        else:
            self.job.pause()
            self.pause_btn.name = "Play"

    def cancel(self):
        if self.job is not None and not self.job.finished:
            self.job.cancel()

    def reset(self):
        self.cancel()
        self.job = None
        self._stop_polling()
        self._build_plots(self.recipe(), None)
        for b in (self.pause_btn, self.step_btn, self.reset_btn, self.use_btn):
            b.disabled = True
        self.download.disabled = True
        self.progress.value = 0
        self._set_status("idle", "Reset. Pick a recipe and press Train.")

    def _stop_polling(self):
        if self._poll_cb is not None:
            self._poll_cb.stop()
            self._poll_cb = None

    # -- polling -------------------------------------------------------------------------

    def poll(self):
        job = self.job
        if job is None:
            return
        snap = job.snapshot(self._since)
        with pn.io.hold():
            for i, run in enumerate(snap["runs"]):
                if run["steps"]:
                    self._stream(i, run["steps"])
                    self._since[i] += len(run["steps"])
            self._show_progress(snap)
        if job.finished:
            self._stop_polling()
            self.pause_btn.disabled = self.step_btn.disabled = True
            if job.state == "done":
                self.use_btn.disabled = self.download.disabled = False
            elif job.state == "failed":
                self._notify("error", f"Training failed: {job.error}")

    def _show_progress(self, snap):
        run0 = snap["runs"][0]
        done, total = run0["shown"], run0["total"]
        self.progress.value = int(100 * done / max(total, 1))
        st = snap["state"]
        if st == "queued":
            self._set_status("queued", queue_text(snap, manager().max_running))
            return
        parts = [f"{st}: step {done}/{total}"]
        lasts = [run["steps"][-1] if run["steps"] else (self._history[i][-1] if self._history[i] else None)
                 for i, run in enumerate(snap["runs"])]
        if lasts[0] and st == "running" and snap["eta_s"] is not None:
            parts.append(f"{lasts[0]['tokens_per_s']:,.0f} tokens/s, ETA {snap['eta_s']:.0f} s")
        if snap["others"]:
            parts.append(f"trained once for you and {snap['others']} other session(s) with this recipe")
        verdicts, words = [], []
        for i, (run, last_i) in enumerate(zip(snap["runs"], lasts)):
            if last_i:
                word, why = status(last_i["top1_share"])
                words.append(word)
                dead = f"; {last_i['dead_experts']} dead expert(s)" if last_i["dead_experts"] else ""
                verdicts.append(f"{'AB'[i]}: <b>{word}</b> ({html.escape(why)}{dead}) \u2014 "
                                f"{html.escape(run['label'])}")
        self._set_status("collapsed" if "Collapsed" in words else st, " \u00b7 ".join(parts), verdicts)

    def _set_status(self, state: str, text: str, verdicts: list[str] | None = None):
        level = "warn" if state in ("failed", "queued", "cancelled", "collapsed") else "ok"
        extra = "".join(f"<div>{v}</div>" for v in verdicts or [])
        self.status.object = (f"<div class='badge-{level}' data-testid='lab-status'>{html.escape(text)}{extra}"
                              f"<div class='muted'>Collapsed: one expert takes \u2265 {COLLAPSED_SHARE:.0%} of "
                              f"first choices in some layer. Uneven: more than {UNEVEN_FACTOR:g}\u00d7 the fair share "
                              f"1/N. Balanced: otherwise.</div></div>")

    # -- plots -----------------------------------------------------------------------------

    def _build_plots(self, a: Recipe, b: Recipe | None):
        """Empty plots for these recipes. The figures are made again only when their shape changes
        (N, one or two runs, a bias plot): making them took ~0.2 s of the server's event loop a Train
        (py-spy, 30 students pressing Train together: 6 s of a 10 s window, the router updates waiting)."""
        runs = [a] if b is None else [a, b]
        self._recipes = runs
        for i in range(2):
            self.loss_src[i].data = {"step": [], "loss": []}
            self.eval_src[i].data = {"step": [], "eval": []}
            self.busy_src[i].data = {"step": [], "busiest": []}
            self.bal_src[i].data = {"step": [], "max_over_mean": [], "load_balance": [], "dead": []}
        self._history = [[] for _ in runs]       # kept for redrawing the share plots per layer
        self._probes = []                        # run A's (step, router top-k on the probe tokens)
        self.sat_src.data = {"step": []}
        shape = [(r.n_experts, r.balancing == "deepseek_bias") for r in runs]
        if shape == getattr(self, "_shape", None) and hasattr(self, "sat_pane"):
            for items in self._legend_items:
                for item, r in zip(items, runs):
                    item.label = value(f"{item.label.value[0]}: {r.label()}")
            self.sat_pane.object.title.text = re.sub(r"top-\d+", f"top-{a.model_config().top_k}",
                                                     self.sat_pane.object.title.text)
            self._rebuild_share_plots()
            return
        self._shape = shape
        f = figure(height=260, sizing_mode="stretch_width", title="Loss (nats): training, and held-out dots",
                   tools="save", toolbar_location="right")
        g = figure(height=260, sizing_mode="stretch_width", y_range=(0, 1.02),
                   title="Busiest expert's share of first choices (any layer)", tools="save", toolbar_location="right")
        items_f, items_g = [], []
        for i, r in enumerate(runs):
            lab = f"{'AB'[i]}: {r.label()}"
            ln = f.line("step", "loss", source=self.loss_src[i], color=RUN_COLORS[i], line_dash=RUN_DASH[i], width=2)
            f.scatter("step", "eval", source=self.eval_src[i], color=RUN_COLORS[i], size=7)
            items_f.append((lab, [ln]))
            lg = g.line("step", "busiest", source=self.busy_src[i], color=RUN_COLORS[i], line_dash=RUN_DASH[i],
                        width=2)
            items_g.append((lab, [lg]))
        h = figure(height=260, sizing_mode="stretch_width", tools="save", toolbar_location="right",
                   title="Balance per step: max/mean load (solid), load-balance loss (dots); 1.0 = even")
        items_h = []
        for i, r in enumerate(runs):
            lh = h.line("step", "max_over_mean", source=self.bal_src[i], color=RUN_COLORS[i], line_dash=RUN_DASH[i],
                        width=2)
            h.scatter("step", "load_balance", source=self.bal_src[i], color=RUN_COLORS[i], size=3, alpha=0.6)
            items_h.append((f"{'AB'[i]}", [lh]))
        h.add_tools(HoverTool(tooltips=[("step", "@step"), ("max/mean load", "@max_over_mean{0.00}"),
                                        ("load-balance loss", "@load_balance{0.000}"), ("dead experts", "@dead")]))
        g.add_layout(Span(location=COLLAPSED_SHARE, dimension="width", line_color="#B35806", line_dash="dotted",
                          line_width=2))
        g.add_layout(Span(location=1 / a.n_experts, dimension="width", line_color="#333", line_dash="dotted"))
        self._legend_items = []
        for fig, items in ((f, items_f), (g, items_g), (h, items_h)):
            legend = Legend(items=items, label_text_font_size="11px", orientation="vertical")
            fig.add_layout(legend, "below")
            if fig is not h:
                self._legend_items.append(legend.items)
            fig.xaxis.axis_label = "step"
            fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("value", "$y{0.000}")]))
        s = figure(height=260, sizing_mode="stretch_width", y_range=(0, 1.02), tools="save", toolbar_location="right",
                   title=f"A: router saturation, share of the final top-{a.model_config().top_k} choices already made "
                         f"(the latest look's, until training ends)")
        layers = a.model_config().n_layer
        items_s = [(f"layer {i}", [s.line("step", f"l{i}", source=self.sat_src, color=SATURATION_COLORS[i % 4],
                                          width=2)]) for i in range(layers)]
        s.add_layout(Legend(items=items_s, label_text_font_size="11px", orientation="horizontal"), "below")
        s.xaxis.axis_label = (f"step (the router probed every {PROBE_EVERY} steps on "
                              f"{PROBE_WINDOWS * a.model_config().block_size} held-out tokens)")
        s.yaxis.axis_label = "share already made"
        s.add_tools(HoverTool(tooltips=[("step", "@step"), ("already final", "$y{0%}")]))
        if not hasattr(self, "loss_pane"):
            self.loss_pane = pn.pane.Bokeh(f, sizing_mode="stretch_width")
            self.sat_pane = pn.pane.Bokeh(s, sizing_mode="stretch_width")
            self.busy_pane = pn.pane.Bokeh(g, sizing_mode="stretch_width")
            self.bal_pane = pn.pane.Bokeh(h, sizing_mode="stretch_width")
            self.share_panes = pn.Row(sizing_mode="stretch_width")
            self.bias_panes = pn.Row(sizing_mode="stretch_width")
        else:
            self.loss_pane.object, self.busy_pane.object, self.bal_pane.object = f, g, h
            self.sat_pane.object = s
        self._share_figs = None
        self._rebuild_share_plots()

    def _rebuild_share_plots(self):
        """The per-expert plots for the chosen layer, filled with every step so far.

        A source is given all its rows at once, never emptied and then streamed into: Bokeh
        sends a held change when the hold ends, and reads the data then, so an emptied source
        streamed into in the same hold reached the page with the streamed rows in it, and then
        the stream again (every step twice)."""
        layer = self.layer.value
        for i, r in enumerate(self._recipes):
            share, bias = self._layer_columns(self._history[i], r.n_experts)
            self.share_src[i].data = share
            self.bias_src[i].data = bias or {"step": [], **{f"e{e}": [] for e in range(r.n_experts)}}
        if self._share_figs is not None:          # the same shape: new titles only (see _build_plots)
            for fig in self._share_figs:
                fig.title.text = re.sub(r"layer \d+", f"layer {layer}", fig.title.text)
            return
        shares, biases = [], []
        for i, r in enumerate(self._recipes):
            n = r.n_experts
            cols = [f"e{e}" for e in range(n)]
            src = self.share_src[i]
            fig = figure(height=260, sizing_mode="stretch_width", y_range=(0, 1), tools="save",
                         toolbar_location="right",
                         title=f"{'AB'[i]}: share of first choices per expert, layer {layer} (stacked)")
            fig.varea_stack(cols, x="step", source=src, color=expert_colors(n), alpha=0.9)
            fig.xaxis.axis_label = "step"
            fig.yaxis.axis_label = "share"
            shares.append(pn.pane.Bokeh(fig, sizing_mode="stretch_width"))
            bsrc = self.bias_src[i]
            if r.balancing == "deepseek_bias":
                bf = figure(height=220, sizing_mode="stretch_width", tools="save", toolbar_location="right",
                            title=f"{'AB'[i]}: DeepSeek selection bias per expert, layer {layer}")
                for e, c in enumerate(cols):
                    bf.line("step", c, source=bsrc, color=expert_colors(n)[e], width=1.5)
                bf.xaxis.axis_label = "step"
                biases.append(pn.pane.Bokeh(bf, sizing_mode="stretch_width"))
        self._share_figs = [pane.object for pane in shares + biases]
        self.share_panes.objects = shares
        self.bias_panes.objects = biases

    def _stream(self, i: int, steps: list[dict]):
        self._history[i].extend(steps)
        probes = [(s["step"], s["probe"]) for s in steps if "probe" in s]
        if i == 0 and probes:               # every point is measured against the newest probe: all redrawn
            self._probes.extend(probes)
            curve = saturation_curve([p for _, p in self._probes])
            self.sat_src.data = {"step": [t for t, _ in self._probes],
                                 **{f"l{j}": [c[j] for c in curve] for j in range(len(curve[0]))}}
        xs = [s["step"] for s in steps]
        self.loss_src[i].stream({"step": xs, "loss": [s["loss"] for s in steps]})
        ev = [(s["step"], s["eval_loss"]) for s in steps if s["eval_loss"] is not None]
        if ev:
            self.eval_src[i].stream({"step": [x for x, _ in ev], "eval": [y for _, y in ev]})
        self.busy_src[i].stream({"step": xs, "busiest": [max(max(layer) for layer in s["top1_share"])
                                                         for s in steps]})
        self.bal_src[i].stream({"step": xs, "max_over_mean": [s["max_over_mean"] for s in steps],
                                "load_balance": [s["load_balance"] for s in steps],
                                "dead": [s["dead_experts"] for s in steps]})
        share, bias = self._layer_columns(steps, len(steps[0]["top1_share"][0]))
        self.share_src[i].stream(share)
        if bias is not None:
            self.bias_src[i].stream(bias)

    def _layer_columns(self, steps: list[dict], n: int) -> tuple[dict, dict | None]:
        """The chosen layer's columns for `steps`: each expert's share of first choices, and its
        DeepSeek selection bias (None when the recipe has no bias)."""
        layer = self.layer.value
        xs = [s["step"] for s in steps]
        shares = np.array([s["top1_share"][layer] for s in steps]).reshape(len(steps), n)
        # lists, not arrays: Bokeh sends each array as binary frames of its own, a list rides in the patch's
        # JSON (py-spy, 30 pages polling one job: 8 ms of the event loop a poll with arrays, 1.9 ms with lists)
        share = {"step": xs, **{f"e{e}": shares[:, e].tolist() for e in range(n)}}
        if not steps or steps[0]["bias"] is None:
            return share, None
        bias = np.array([s["bias"][layer] for s in steps])
        return share, {"step": xs, **{f"e{e}": bias[:, e].tolist() for e in range(n)}}

    # -- results ------------------------------------------------------------------------------

    def saturation_run(self) -> tuple | None:
        """Run A's router probes once its training is done, for the saturation experiment: (steps, probes,
        top-k), or None while there is no finished run."""
        if self.job is None or self.job.state != "done" or len(self._probes) < 2:
            return None
        return ([t for t, _ in self._probes], [p for _, p in self._probes], self._recipes[0].model_config().top_k)

    def _loaded(self):
        from moe_core.model.checkpoint import LoadedModel

        run = self.job.runs[0]
        steps = run.steps
        card = {"steps": len(steps), "eval_loss": steps[-1]["eval_loss"] if steps else None,
                "trained_in": "the training lab (this session)"}
        recipe = {"preset": "lab", "balancing": run.recipe.balancing, "lab_recipe": run.recipe.__dict__}
        for p in run.model.parameters():
            p.requires_grad_(False)
        return LoadedModel("lab-model", run.model, run.model.config, recipe, card)

    def use_model(self):
        if self.job is None or self.job.state != "done" or self.router_state is None:
            return
        self.router_state.use_lab_model(self._loaded())
        self._notify("success", "The lab model is loaded in the Router tab (trained in the lab).")

    def _download(self):
        import tempfile

        from moe_core.model.checkpoint import save

        if self.job is None or self.job.state != "done":
            return io.BytesIO(b"")
        lm = self._loaded()
        buf = io.BytesIO()
        with tempfile.TemporaryDirectory() as d:
            save(lm.model, Path(d) / "lab-model", name="lab-model", recipe=lm.recipe, card=lm.card)
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(Path(d).iterdir()):
                    z.write(f, f.name)
        buf.seek(0)
        return buf

    # -- layout ---------------------------------------------------------------------------------

    def controls(self):
        return pn.Column(
            self.preset, self.n, self.k, self.scheme, self.balancing, self.aux, self.gamma, self.capacity,
            self.steps, self.seed, self.compare,
            pn.Row(self.train_btn, self.pause_btn), pn.Row(self.step_btn, self.reset_btn),
            width=300,
        )

    def __panel__(self):
        explainer = (Path(__file__).resolve().parent.parent / "assets" / "explainers" / "lab.md")
        text = explainer.read_text(encoding="utf-8") if explainer.is_file() else ""
        return pn.Row(
            self.controls(),
            pn.Column(
                self.progress, self.status,
                pn.Row(self.loss_pane, self.busy_pane, sizing_mode="stretch_width"),
                pn.Row(self.bal_pane, self.sat_pane, sizing_mode="stretch_width"),
                self.layer, self.share_panes, self.bias_panes,
                pn.Row(self.use_btn, self.download),
                pn.pane.Markdown(text, sizing_mode="stretch_width", stylesheets=self._css),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
        )


__all__ = ["TrainingLab"]
