"""Experiments: short guided experiments, each "predict, run, see what it shows" (issue #24, part 2).

The student picks an experiment, reads its question, commits to a prediction (a button on the page),
then runs it. The server runs `moe_core.experiments.run_experiment` on the Router tab's model, in a
worker thread (the event loop keeps serving the class), and the page draws the result: the finding (a
sentence built from the measured numbers), whether the prediction held, and the figure. A result is
computed once per server for each (experiment, model, token) and shared: a class pressing Run together
waits for one computation. User text (the same-token test's word) only reaches the page as data drawn
with `textContent`.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, ClassVar

import panel as pn
import param
from panel.custom import JSComponent

from moe_core.experiments import EXPERIMENTS, OWN_MODELS, SAME_TOKEN, run_experiment

from ..state import RouterState
from .guard import refuse_bad_values
from .palette import expert_colors, text_color

CACHE_SIZE = 64
_results: OrderedDict = OrderedDict()       # key -> Future holding the result (shared by every session)
_lock = threading.Lock()


def shared_result(key: tuple, compute: Callable[[], dict]) -> dict:
    """compute() once for `key` per server: concurrent callers wait for the first one's result. A failure
    is not kept (the next call tries again)."""
    with _lock:
        fut = _results.get(key)
        owner = fut is None
        if owner:
            fut = _results[key] = Future()
            while len(_results) > CACHE_SIZE:
                _results.popitem(last=False)
        else:
            _results.move_to_end(key)
    if owner:
        try:
            fut.set_result(compute())
        except BaseException as e:
            fut.set_exception(e)
            with _lock:
                if _results.get(key) is fut:
                    del _results[key]
    return fut.result()


def spec_of(name: str, model_name: str) -> dict:
    e = EXPERIMENTS[name]
    return {"name": e.name, "title": e.title, "question": e.question, "choices": list(e.choices),
            "source": e.source, "lab": e.needs_training,
            "model": OWN_MODELS.get(name, model_name)}


class ExperimentScreen(JSComponent):
    """The page's half: question, prediction buttons, then the finding and the figure."""

    spec = param.String(default="{}", doc="The experiment: title, question, choices, source (JSON).")
    result = param.String(default="{}", doc="The result: finding, answer, figure (JSON); {} before a run.")
    status = param.String(default="", doc="Where the run stands, in words.")
    predicted = param.Integer(default=-1, bounds=(-1, 9), doc="The choice the student predicted (-1: none yet).")
    layer = param.Integer(default=0, bounds=(0, 63), doc="The layer a per-layer figure shows.")

    _esm = r"""
    const h = (tag, cls, text) => {
      const e = document.createElement(tag);
      if (cls) e.className = cls;
      if (text !== undefined) e.textContent = text;
      return e;
    };
    const fmt = (v, unit) => unit === "share" ? Math.round(v * 100) + "%" : (Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(3));
    const SERIES = ["#0b3d6e", "#b35806", "#1b7837", "#762a83"];

    function bars(fig) {
      const box = h("div", "bars");
      const names = Object.keys(fig.series);
      // one scale for the whole figure, or (scale "row": rows measure different things) one per row
      const scaleOf = (vals) => { const lo = Math.min(0, ...vals), hi = Math.max(...vals, 1e-9);
                                  return (v) => (100 * (v - lo) / (hi - lo)); };
      const all = names.flatMap((n) => fig.series[n]).concat(fig.baseline !== undefined ? [fig.baseline] : []);
      const legend = h("div", "legend");
      names.forEach((n, j) => { const s = h("span", "key"); const sw = h("i"); sw.style.background = SERIES[j % 4];
                                s.append(sw, h("span", "", n)); legend.appendChild(s); });
      if (fig.baseline !== undefined) { const s = h("span", "key"); s.append(h("i", "base-key"), h("span", "", (fig.baseline_label || "baseline") + " = " + fmt(fig.baseline, fig.unit))); legend.appendChild(s); }
      box.appendChild(legend);
      fig.categories.forEach((c, i) => {
        const x = scaleOf(fig.scale === "row" ? names.map((n) => fig.series[n][i]) : all);
        const row = h("div", "brow");
        row.appendChild(h("div", "blabel", c));
        const track = h("div", "track");
        names.forEach((n, j) => {
          const v = fig.series[n][i];
          const line = h("div", "bline");
          const bar = h("div", "bar");
          bar.style.left = Math.min(x(0), x(v)) + "%";
          bar.style.width = Math.max(0.5, Math.abs(x(v) - x(0))) + "%";
          bar.style.background = SERIES[j % 4];
          bar.title = n + ": " + fmt(v, fig.unit);
          const val = h("span", "bval", fmt(v, fig.unit));
          val.style.left = "calc(" + Math.max(x(0), x(v)) + "% + 4px)";
          line.append(bar, val);
          track.appendChild(line);
        });
        if (fig.baseline !== undefined) { const b = h("div", "base"); b.style.left = x(fig.baseline) + "%"; track.appendChild(b); }
        row.appendChild(track);
        box.appendChild(row);
      });
      return box;
    }

    function heatmap(fig, model, colors) {
      const box = h("div", "heat");
      const layers = fig.layer_values.length;
      const L = Math.max(0, Math.min(model.layer, layers - 1));
      const btns = h("div", "layers");
      for (let i = 0; i < layers; i++) {
        const b = h("button", "layer-btn" + (i === L ? " on" : ""), "Layer " + i);
        b.setAttribute("aria-pressed", String(i === L));
        b.addEventListener("click", () => { model.layer = i; });
        btns.appendChild(b);
      }
      box.appendChild(btns);
      const vals = fig.layer_values[L];
      const grid = h("div", "grid");
      grid.style.gridTemplateColumns = "max-content repeat(" + fig.x.length + ", minmax(2.6em, 1fr))";
      grid.appendChild(h("div", "corner", ""));
      fig.x.forEach((x, j) => { const c = h("div", "xh", x); if (colors[j]) c.style.borderBottom = "4px solid " + colors[j]; grid.appendChild(c); });
      const top = Math.max(...vals.flat(), fig.baseline * 2);
      vals.forEach((row, i) => {
        grid.appendChild(h("div", "yh", fig.y[i]));
        row.forEach((v, j) => {
          const c = h("div", "cell", fig.unit.startsWith("share") ? Math.round(v * 100) + "%" : v.toFixed(1) + "\u00d7");
          const t = v >= fig.baseline ? Math.min(1, (v - fig.baseline) / Math.max(top - fig.baseline, 1e-9)) : 0;
          c.style.background = "rgba(179, 88, 6, " + (0.08 + 0.85 * t).toFixed(3) + ")";
          c.style.color = t > 0.55 ? "#fff" : "#1b1f24";
          c.title = fig.y[i] + " \u2192 " + fig.x[j] + ": " + c.textContent;
          grid.appendChild(c);
        });
      });
      box.appendChild(grid);
      box.appendChild(h("div", "note", "Layer " + L + ". Darker: further above " +
        (fig.unit.startsWith("share") ? "chance (" + Math.round(fig.baseline * 100) + "%)" : "an even share (1.0\u00d7)") + "."));
      return box;
    }

    function table(fig, colors, ink) {
      const box = h("div", "ctx");
      const t = h("table");
      const head = h("tr");
      head.append(h("th", "", "context \u2192 token"), ...fig.columns.map((c) => h("th", "", c)));
      t.appendChild(head);
      for (const r of fig.rows) {
        const tr = h("tr");
        const td = h("td", "ctxt");
        td.append(h("span", "before", r.context), h("mark", "", r.token));
        tr.appendChild(td);
        for (const ex of r.experts) {
          const cell = h("td", "");
          for (const e of ex) { const b = h("span", "light", String(e)); b.style.background = colors[e]; b.style.color = ink[e]; cell.appendChild(b); }
          tr.appendChild(cell);
        }
        t.appendChild(tr);
      }
      box.appendChild(t);
      box.appendChild(bars({ ...fig.bars, unit: "share" }));
      return box;
    }

    function lines(fig) {
      const box = h("div", "linesbox");
      const legend = h("div", "legend");
      Object.keys(fig.series).forEach((n, j) => { const k = h("span", "key"); const sw = h("i"); sw.style.background = SERIES[j % 4];
                                                 k.append(sw, h("span", "", n)); legend.appendChild(k); });
      const W = 640, H = 220, P = 40;
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("viewBox", "0 0 " + W + " " + H);
      svg.setAttribute("class", "lines");
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", fig.unit + " by " + fig.x_label);
      const xs = fig.x, x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
      const X = (v) => P + (W - 2 * P) * (v - x0) / (x1 - x0), Y = (v) => H - 28 - (H - 40) * v;
      const el = (tag, attrs, text) => { const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
        for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; svg.appendChild(e); return e; };
      for (const v of [0, 0.5, 1]) { el("line", { x1: P, x2: W - P, y1: Y(v), y2: Y(v), class: "gridl" }); el("text", { x: P - 6, y: Y(v) + 4, class: "ax", "text-anchor": "end" }, Math.round(v * 100) + "%"); }
      el("text", { x: P, y: H - 8, class: "ax" }, String(x0));
      el("text", { x: W - P, y: H - 8, class: "ax", "text-anchor": "end" }, String(x1));
      el("text", { x: W / 2, y: H - 8, class: "ax", "text-anchor": "middle" }, fig.x_label);
      if (fig.mark !== undefined) {        // a moment the question is about (the saturation test: half-way)
        el("line", { x1: X(fig.mark), x2: X(fig.mark), y1: Y(1.04), y2: Y(0), class: "markl" });
        el("text", { x: X(fig.mark) + 4, y: Y(0.04), class: "ax" }, fig.mark_label);
      }
      Object.keys(fig.series).forEach((n, j) => {
        const pts = fig.series[n].map((v, i) => X(xs[i]).toFixed(1) + "," + Y(v).toFixed(1)).join(" ");
        el("polyline", { points: pts, fill: "none", stroke: SERIES[j % 4], "stroke-width": 2.5 });
      });
      box.append(legend, svg);
      return box;
    }

    export function render({ model, el }) {
      const root = h("div", "exp");
      el.appendChild(root);
      function draw() {
        const spec = JSON.parse(model.spec || "{}"), res = JSON.parse(model.result || "{}");
        root.replaceChildren();
        if (!spec.name) return;
        const head = h("div", "ehead");
        head.append(h("div", "etitle", spec.title), h("div", "esource", spec.source + " \u00b7 on " + spec.model));
        const q = h("div", "question", spec.question);
        const choices = h("div", "choices");
        choices.setAttribute("role", "group");
        choices.setAttribute("aria-label", "your prediction");
        spec.choices.forEach((c, i) => {
          let cls = "choice" + (i === model.predicted ? " on" : "");
          if (res.finding !== undefined) cls += i === res.answer ? " right" : "";
          const b = h("button", cls, (res.finding !== undefined && i === res.answer ? "\u2713 " : "") + c);
          b.dataset.choice = String(i);
          b.setAttribute("aria-pressed", String(i === model.predicted));
          b.addEventListener("click", () => { model.predicted = i; });
          choices.appendChild(b);
        });
        const step = res.finding !== undefined ? "3. See what it shows (\u2713: what the numbers say)." :
          model.predicted < 0 ? "1. Predict: pick an answer." : "1. Your prediction is set. 2. Press Run.";
        root.append(head, q, h("div", "step", step), choices);
        const status = h("div", "status", model.status);
        root.appendChild(status);
        if (res.finding === undefined) return;
        const verdict = model.predicted < 0 ? "The numbers say: " + spec.choices[res.answer] + "."
          : (model.predicted === res.answer ? "Your prediction holds: " : "Not what you predicted. The numbers say: ") + spec.choices[res.answer] + ".";
        const v = h("div", "verdict " + (model.predicted === res.answer ? "yes" : "no"), verdict);
        const f = h("div", "finding", res.finding);
        const fig = res.figure || {};
        const colors = spec.colors || [], ink = spec.ink || [];
        const figBox = h("div", "figure");
        if (fig.kind === "bars") figBox.appendChild(bars(fig));
        else if (fig.kind === "heatmap") figBox.appendChild(heatmap(fig, model, colors));
        else if (fig.kind === "table") figBox.appendChild(table(fig, colors, ink));
        else if (fig.kind === "lines") figBox.appendChild(lines(fig));
        root.append(v, f, figBox);
      }
      model.on(["spec", "result", "status", "predicted", "layer"], draw);
      draw();
    }
    """

    _stylesheets: ClassVar[list[str]] = [r"""
    :host { display: block; width: 100%; }
    .exp { --fs: var(--moe-fs, 14px); font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: var(--fs);
           color: #1b1f24; display: flex; flex-direction: column; gap: 6px; box-sizing: border-box; }
    .ehead { display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 12px; }
    .etitle { font-weight: 700; font-size: 1.15em; }
    .esource { font-size: .8em; color: #4b5563; }
    .question { font-size: 1.05em; line-height: 1.35; }
    .step { font-size: .85em; color: #4b5563; }
    .choices { display: flex; flex-wrap: wrap; gap: 6px; }
    button.choice { font: inherit; border: 2px solid #9aa3ad; background: #f4f6f9; border-radius: 8px; padding: 4px 12px;
                    cursor: pointer; color: #1b1f24; text-align: left; max-width: 100%; }
    button.choice.on { border-color: #0b3d6e; background: #0b3d6e; color: #fff; }
    button.choice.right { box-shadow: 0 0 0 3px #1b7837; }
    .status { font-size: .9em; color: #374151; }
    .status:empty { display: none; }
    .verdict { font-weight: 700; border-radius: 6px; padding: 4px 10px; }
    .verdict.yes { background: #e3f4e6; color: #0f4d1c; border-left: 4px solid #1b7837; }
    .verdict.no { background: #fff4d6; color: #5c3b00; border-left: 4px solid #b35806; }
    .finding { line-height: 1.4; }
    .figure { background: #fff; border: 1px solid #d6dbe1; border-radius: 8px; padding: 6px 10px; overflow-x: auto; }
    .legend { display: flex; flex-wrap: wrap; gap: 2px 14px; font-size: .85em; margin-bottom: 4px; }
    .key { display: inline-flex; align-items: center; gap: 4px; }
    .key i { display: inline-block; width: 14px; height: 10px; border-radius: 2px; }
    .key i.base-key { width: 0; height: 12px; border-left: 2px dashed #111; border-radius: 0; }
    .brow { display: grid; grid-template-columns: minmax(6em, 14em) 1fr; gap: 8px; align-items: center; margin: 3px 0; }
    .blabel { font-size: .9em; text-align: right; overflow-wrap: anywhere; }
    .track { position: relative; padding-right: 4.5em; }
    .bline { position: relative; height: 1.3em; margin: 1px 0; }
    .bar { position: absolute; top: .15em; height: 1em; border-radius: 3px; }
    .bval { position: absolute; top: 0; font-size: .8em; font-variant-numeric: tabular-nums; white-space: nowrap; }
    .base { position: absolute; top: 0; bottom: 0; border-left: 2px dashed #111; }
    .layers { display: flex; gap: 4px; flex-wrap: wrap; margin-bottom: 4px; }
    button.layer-btn { font: inherit; font-size: .9em; border: 1px solid #9aa3ad; background: #f4f6f9; border-radius: 6px;
                       padding: 2px 10px; cursor: pointer; color: #1b1f24; }
    button.layer-btn.on { background: #0b3d6e; color: #fff; border-color: #0b3d6e; }
    .grid { display: grid; gap: 2px; font-size: .85em; font-variant-numeric: tabular-nums; }
    .xh { text-align: center; font-weight: 700; }
    .yh { text-align: right; padding-right: 6px; white-space: nowrap; align-self: center; }
    .cell { text-align: center; border-radius: 3px; padding: 2px 0; }
    .note { font-size: .8em; color: #4b5563; margin-top: 4px; }
    .ctx { display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: flex-start; }
    .ctx .bars { flex: 1 1 280px; min-width: 0; }
    table { border-collapse: collapse; font-size: .9em; margin-bottom: 6px; }
    th, td { padding: 2px 8px; border-bottom: 1px solid #e1e5ea; text-align: left; white-space: nowrap; }
    td.ctxt { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre; max-width: 22em;
              overflow: hidden; text-overflow: ellipsis; direction: rtl; unicode-bidi: plaintext; }
    td.ctxt .before { color: #4b5563; }
    mark { background: #fde68a; color: #1b1f24; }
    .light { display: inline-flex; min-width: 1.6em; height: 1.6em; align-items: center; justify-content: center;
             border-radius: 999px; font-weight: 700; border: 2px solid #1b1f24; box-sizing: border-box; margin-right: 2px; font-size: .85em; }
    svg.lines { width: 100%; max-width: 760px; height: auto; display: block; }
    svg .gridl { stroke: #d6dbe1; }
    svg .markl { stroke: #111; stroke-dasharray: 5 4; stroke-width: 1.5; }
    svg .ax { font-size: 12px; fill: #374151; }
    """]


class ExperimentsView(pn.viewable.Viewer):
    """The controls (which experiment, its token, Run) above the screen."""

    state = param.ClassSelector(class_=RouterState)

    def __init__(self, notify: Callable[[str, str], None] | None = None, open_tab: Callable[[str], None] | None = None,
                 lab_run: Callable[[], tuple | None] | None = None, **params):
        """`lab_run()`: the session's finished Training-lab run as (steps probed at, probes, top-k), or None."""
        super().__init__(**params)
        self._notify = notify if notify is not None else (lambda kind, message: None)
        self._open_tab = open_tab if open_tab is not None else (lambda name: None)
        self._lab_run = lab_run if lab_run is not None else (lambda: None)
        say = lambda m: self._notify("warning", m)   # noqa: E731
        self.pick = refuse_bad_values(pn.widgets.Select(
            name="Experiment", options={f"{chr(97 + i)}. {e.title}": e.name for i, e in enumerate(EXPERIMENTS.values())},
            value="same_token", width=320), say)
        self.token = refuse_bad_values(pn.widgets.TextInput(name="Token to follow", value=SAME_TOKEN, max_length=40,
                                                            width=160), say)
        self.run_btn = pn.widgets.Button(name="Run", button_type="primary", disabled=True, width=110,
                                         align="end")
        self.lab_btn = pn.widgets.Button(name="Open the Training lab", button_type="primary", visible=False,
                                         align="end")
        self.screen = refuse_bad_values(ExperimentScreen(name="experiment_screen", sizing_mode="stretch_width",
                                                         margin=(4, 6)), say)
        self.running = False
        self.pick.param.watch(lambda e: self.show(), "value")
        self.token.param.watch(lambda e: self.show(), "value")
        self.screen.param.watch(lambda e: self._enable(), "predicted")
        self.state.param.watch(lambda e: self.show(), ["n_experts", "balancing"])
        self.run_btn.on_click(self._on_run)
        self.lab_btn.on_click(lambda e: self._open_tab("lab"))
        self.show()

    def show(self) -> None:
        """Show the chosen experiment's question, with no result and no prediction yet."""
        n = self.state.model.config.n_experts
        colors = expert_colors(n)
        spec = {**spec_of(self.pick.value, self.state.model_info["name"]), "colors": colors,
                "ink": [text_color(c) for c in colors]}
        self.token.visible = self.pick.value == "same_token"
        lab = spec["lab"]
        self.lab_btn.visible = lab
        with pn.io.hold():
            self.screen.param.update(spec=json.dumps(spec), result="{}", predicted=-1, layer=0,
                                     status=("Measured on a Training-lab run: predict, open the Training lab and press "
                                             "Train (its Router saturation plot draws live), then come back and press "
                                             "Run to check your prediction on that run." if lab else ""))
        self._enable()

    def _enable(self) -> None:
        self.run_btn.disabled = self.running or self.screen.predicted < 0

    def key(self) -> tuple:
        """What a result depends on: the experiment, the model (unless it uses its own) and the token."""
        name = self.pick.value
        who = None if name in OWN_MODELS else self.state.model_info["name"]
        return (name, who, self.token.value if name == "same_token" else None)

    def compute(self) -> dict:
        """Run the chosen experiment (shared per server: see shared_result; the saturation experiment reads this
        session's Training-lab run). Raises ValueError for bad input."""
        name = self.pick.value
        if EXPERIMENTS[name].needs_training:
            run = self._lab_run()
            if run is None:
                raise ValueError("no finished Training-lab run in this session yet: open the Training lab, press "
                                 "Train, and press Run here when it is done")
            return run_experiment(name, run=run)
        options = {"token": self.token.value} if name == "same_token" else {}
        model = None if name in OWN_MODELS else self.state.model
        if self.state.balancing == self.state.LAB_BALANCING and model is not None:   # this session's own model
            return run_experiment(name, model, **options)
        return shared_result(self.key(), lambda: run_experiment(name, model, **options))

    def _start(self) -> bool:
        if self.running or self.screen.predicted < 0:
            return False
        self._asked = self.key()
        self.running = True
        self._enable()
        self.screen.status = "Running on the model\u2026 (a few seconds; a result is shared with the whole class)"
        return True

    def _finish(self, result: dict | None, error: Exception | None = None) -> None:
        self.running = False
        if self.key() != self._asked:      # the student chose another experiment or model meanwhile: not this
            self._enable()
            return
        if error is not None:       # bad input (ValueError) says why; anything else is a bug, said in one line
            message = str(error) if isinstance(error, ValueError) else f"the experiment failed ({type(error).__name__})"
            self._notify("warning", message)
            self.screen.status = f"Not run: {message}"
        else:
            self.screen.param.update(result=json.dumps(result), status="", layer=result["figure"].get("layer", 0))
        self.running = False
        self._enable()

    async def _on_run(self, event=None) -> None:
        """Run: computed in a worker thread, so the server's event loop keeps serving the class meanwhile."""
        if not self._start():
            return
        try:
            result = await asyncio.to_thread(self.compute)
        except Exception as e:
            self._finish(None, e)
        else:
            self._finish(result)

    def run_now(self) -> None:
        """Run, here and now (no event loop needed): what Run does, for tests and scripts."""
        if not self._start():
            return
        try:
            result = self.compute()
        except Exception as e:
            self._finish(None, e)
        else:
            self._finish(result)

    def __panel__(self):
        controls = pn.FlexBox(self.pick, self.token, self.run_btn, self.lab_btn, sizing_mode="stretch_width",
                              align_items="flex-end", gap="2px 8px", margin=(0, 4), css_classes=["experiment-controls"])
        return pn.Column(controls, self.screen, sizing_mode="stretch_width", margin=0)


__all__ = ["ExperimentScreen", "ExperimentsView", "shared_result", "spec_of"]
