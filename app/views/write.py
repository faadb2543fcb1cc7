"""Watch it write: the Router tab's model continues a prompt token by token, each token dropped into its
expert's column (issue #24).

The server generates (`moe_core.generate.generate`), the page draws. Write runs the prompt through the
model in one pass (the prefill) and sends its tokens in one record (`WriteScreen.run`); then a periodic
callback pulls ONE new token from the generator per tick, at the chosen pace, and sends it alone
(`WriteScreen.chunk`, about 100 bytes). The server's event loop is held for one decode step at a time
(a few ms), never for the whole text, so other students' updates keep flowing. The callback stops when
the text is written, on Stop, on a new Write and when the session ends.

The page (`WriteScreen`, a JSComponent) keeps every token it was sent and draws, for the layer shown:
- the text so far, the prompt's tokens outlined in grey, each new token tinted by its first expert;
- the expert bins: one column per expert; each token falls into its first-choice expert's column, with
  a badge for every other expert that also processed it (k experts per token);
- what the run measured: the prefill's time and the decode steps' time on this server.
Changing the layer redraws in the browser; user text is only ever set with `textContent`.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import ClassVar

import panel as pn
import param
from panel.custom import JSComponent
from panel.io.callbacks import PeriodicCallback

from moe_core.data.tokenizer import get_tokenizer
from moe_core.generate import PER_TOKEN_SCHEMES, generate
from moe_core.model.routing import SCHEMES

from ..state import RouterState
from .guard import refuse_bad_values
from .palette import expert_colors, text_color, tint

WRITE_SPEEDS_MS = {"slow": 1200, "normal": 500, "fast": 200}   # the pause between two new tokens
DEFAULT_PROMPT = "def add(a, b):"
MAX_NEW_TOKENS = 200
MAX_PROMPT_CHARS = 2_000
END_OF_TEXT = 0          # <|endoftext|>: writing stops there, as a language model server does
PROMPT_CSS = ("textarea.bk-input { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; "
              "font-size: var(--moe-fs, 14px); }")       # presenter mode enlarges the prompt too
BABBLE = ("This model is small and was trained for a few minutes on a small corpus: its text is babble. "
          "Watch the routing, not the prose.")


def schemes_that_write() -> str:
    """The routing schemes generation accepts, in words."""
    labels = [SCHEMES[s].label for s in PER_TOKEN_SCHEMES]
    return ", ".join(labels[:-1]) + " and " + labels[-1]


def scheme_notice(state: RouterState) -> dict:
    """What the view says about the Router tab's routing: it writes with it, or it cannot (and which can)."""
    s = state.scheme_info
    if state.scheme in PER_TOKEN_SCHEMES:
        k = f", k = {state.top_k}" if s.uses_k else ""
        return {"level": "ok", "text": f"Writes with the Router tab's model ({state.model_info['name']}) and routing "
                                       f"({s.label}{k}). Generation works with {schemes_that_write()}."}
    return {"level": "warn",
            "text": f"{s.label} routes a whole group of tokens at once, so it cannot route one new token at a time. "
                    f"Watch it write works with {schemes_that_write()}: choose one in the Router tab "
                    f"(Softmax top-k with k = 1 for a Switch model)."}


def token_record(tok) -> dict:
    """One GeneratedToken as the page draws it: position, text, prefill flag, experts and weights (thousandths)
    per layer."""
    return {"i": tok.position, "t": tok.text, "p": int(tok.phase == "prefill"), "e": tok.experts,
            "w": [[round(w * 1000) for w in ws] for ws in tok.weights]}


def expert_bins(tokens, layer: int, n_experts: int, phase: str | None = None) -> list[list[int]]:
    """Per expert, the positions of the tokens whose FIRST choice in `layer` it is (what the bins show);
    `phase` keeps only "prefill" or "decode" tokens."""
    out: list[list[int]] = [[] for _ in range(n_experts)]
    for t in tokens:
        if (phase is None or t.phase == phase) and t.experts[layer]:
            out[t.experts[layer][0]].append(t.position)
    return out


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


class WriteScreen(JSComponent):
    """The page's half: the text so far, the expert bins and the run's numbers. `layer` is two-way."""

    run = param.String(default="{}", doc="The run: id, experts' colours, layers, and the prompt's tokens (JSON).")
    chunk = param.String(default="{}", doc="The newest token(s): {run, i: first position, toks: [...]} (JSON).")
    tail = param.String(default="{}", doc="Every token of the run so far; sent only when the page asks (resync).")
    resync = param.Integer(default=0, doc="Bumped by the page when it missed a token (it then gets `tail`).")
    layer = param.Integer(default=0, bounds=(0, None), doc="The layer whose bins are shown.")
    line = param.String(default="", doc="What the run measured, in words (prefill and decode).")
    status = param.String(default="", doc="Where the run stands, in words.")
    writing = param.Boolean(default=False, doc="Whether a run is going on.")
    notice = param.String(default="{}", doc="What the view says about the current routing scheme (JSON).")

    _esm = r"""
    const BABBLE = __BABBLE__;
    const MIN_HEIGHT = 360;
    const h = (tag, cls, text) => {
      const e = document.createElement(tag);
      if (cls) e.className = cls;
      if (text !== undefined) e.textContent = text;
      return e;
    };
    const shown = (t) => t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/ /g, "\u2423") || "\u2205";

    export function render({ model, el }) {
      let meta = {}, recs = [];
      const root = h("div", "write");
      root.dataset.count = "0";
      const babble = h("div", "babble", BABBLE);
      const notice = h("div", "notice");
      // the text so far
      const textBox = h("section", "wview view-write-text");
      const tHead = h("div", "whead");
      tHead.append(h("div", "wtitle", "The text so far"), h("div", "wsub", "prompt outlined \u00b7 new tokens tinted by their first expert"));
      const text = h("div", "wtext");
      text.setAttribute("aria-live", "off");
      textBox.append(tHead, text);
      // the bins
      const binBox = h("section", "wview view-write-bins");
      const bHead = h("div", "whead");
      const bTitle = h("div", "wtitle");
      const layerBox = h("div", "layers");
      layerBox.setAttribute("role", "group");
      layerBox.setAttribute("aria-label", "layer");
      const pill = h("div", "pill");
      bHead.append(bTitle, layerBox, pill);
      const bins = h("div", "wbins");
      const legend = h("div", "wlegend");
      legend.append(h("span", "lg", "Each token falls into its first-choice expert's column; a small badge names each other expert that also took it."),
                    h("span", "lg pre-key", "grey outline: a prompt token (prefill)"));
      binBox.append(bHead, bins, legend);
      const stats = h("div", "wstats view-write-stats");
      root.append(babble, notice, textBox, binBox, stats);
      el.appendChild(root);

      let cols = [];
      const L = () => Math.max(0, Math.min(model.layer, (meta.layers || 1) - 1));

      function drawLayers() {
        layerBox.replaceChildren();
        for (let i = 0; i < (meta.layers || 0); i++) {
          const b = h("button", "layer-btn" + (i === L() ? " on" : ""), "Layer " + i);
          b.dataset.layer = String(i);
          b.setAttribute("aria-pressed", String(i === L()));
          b.addEventListener("click", () => { model.layer = i; });
          layerBox.appendChild(b);
        }
        bTitle.textContent = "Expert bins, layer " + L();
      }

      function buildBins() {
        bins.replaceChildren();
        cols = [];
        const n = meta.n || 0;
        bins.style.gridTemplateColumns = "repeat(" + n + ", minmax(var(--colw), 1fr))";
        for (let e = 0; e < n; e++) {
          const c = h("div", "wcol");
          c.dataset.e = String(e);
          const head = h("div", "chead");
          const light = h("span", "light", String(e));
          light.style.backgroundColor = meta.colors[e];
          light.style.color = meta.ink[e];
          const count = h("span", "count", "0");
          head.append(light, count);
          head.title = "expert " + e;
          const body = h("div", "cbody");
          c.append(head, body);
          bins.appendChild(c);
          cols.push({ c, count, body, n: 0 });
        }
      }

      function tip(r) {
        const l = L();
        const ex = r.e[l].map((e, j) => "expert " + e + " (" + (r.w[l][j] / 1000).toFixed(2) + ")");
        return "token " + r.i + " " + JSON.stringify(r.t) + (r.p ? " (prompt, prefill)" : " (new, decode)") +
               " \u00b7 layer " + l + ": " + (ex.join(", ") || "no expert");
      }

      function textChip(r) {
        const l = L();
        const s = h("span", "wtok " + (r.p ? "pre" : "dec"), r.t.replace(/\n/g, "\u21b5\n"));   // the line breaks too
        s.dataset.i = String(r.i);
        const first = r.e[l].length ? r.e[l][0] : -1;
        if (!r.p && first >= 0) s.style.backgroundColor = meta.tints[first];
        s.title = tip(r);
        return s;
      }

      function binChip(r) {
        const l = L();
        const c = h("span", "chip " + (r.p ? "pre" : "dec"));
        c.dataset.i = String(r.i);
        const first = r.e[l][0];
        c.append(h("span", "tx", shown(r.t)));
        if (!r.p) c.style.backgroundColor = meta.tints[first];
        for (const e of r.e[l].slice(1)) {
          const b = h("span", "also", String(e));
          b.style.backgroundColor = meta.colors[e];
          b.style.color = meta.ink[e];
          c.appendChild(b);
        }
        c.title = tip(r);
        return c;
      }

      function add(r, fresh) {
        const l = L();
        const t = textChip(r);
        text.appendChild(t);
        if (r.e[l].length && cols[r.e[l][0]]) {
          const col = cols[r.e[l][0]];
          const chip = binChip(r);
          if (fresh) {
            root.querySelectorAll(".newest").forEach((x) => x.classList.remove("newest"));
            chip.classList.add("newest", "drop");
            t.classList.add("newest");
          }
          col.body.appendChild(chip);
          col.n += 1;
          col.count.textContent = String(col.n);
          if (fresh) col.body.scrollTop = col.body.scrollHeight;
        }
        recs.push(r);
      }

      function draw() {
        const all = recs;
        recs = [];
        text.replaceChildren();
        buildBins();
        drawLayers();
        for (const r of all) add(r, false);
        text.scrollTop = text.scrollHeight;
        for (const c of cols) c.body.scrollTop = c.body.scrollHeight;
        if (!all.length) text.appendChild(h("span", "hint", "Press Write: the model continues your prompt one token at a time."));
        root.dataset.count = String(recs.filter((r) => !r.p).length);
      }

      function onRun() {
        meta = JSON.parse(model.run || "{}");
        recs = (meta.toks || []).slice();
        draw();
      }

      function onChunk() {
        const c = JSON.parse(model.chunk || "{}");
        if (!c.toks || c.run !== meta.id) return;
        if (c.i > recs.length) { model.resync += 1; return; }     // missed a token: ask for the whole run
        const hint = text.querySelector(".hint");
        if (hint) hint.remove();
        c.toks.forEach((r, j) => { if (c.i + j >= recs.length) add(r, true); });
        text.scrollTop = text.scrollHeight;
        root.dataset.count = String(recs.filter((r) => !r.p).length);
      }

      function onTail() {
        const t = JSON.parse(model.tail || "{}");
        if (!t.toks || t.run !== meta.id) return;
        recs = t.toks.slice();
        draw();
      }

      function onNotice() {
        const n = JSON.parse(model.notice || "{}");
        notice.textContent = n.text || "";
        notice.className = "notice " + (n.level || "ok");
      }

      function onStatus() {
        pill.textContent = model.status;
        pill.classList.toggle("on", model.writing);
        root.classList.toggle("writing", model.writing);
        stats.textContent = model.line;
      }

      // on a wide or tall screen the view fills what is left of the first viewport: the bins flex
      let fitted = "";
      function fit() {
        const top = root.getBoundingClientRect().top + scrollY;
        if (!root.isConnected || root.offsetParent === null) return;    // hidden tab: nothing to measure
        const want = Math.max(MIN_HEIGHT, Math.floor(innerHeight - top - 6)) + "px";
        if (want !== fitted) { fitted = want; root.style.height = want; }
      }
      const fitTimer = setInterval(fit, 300);
      addEventListener("resize", fit);

      model.on("run", onRun);
      model.on("chunk", onChunk);
      model.on("tail", onTail);
      model.on("layer", () => draw());
      model.on("notice", onNotice);
      model.on(["status", "line", "writing"], onStatus);
      model.on("remove", () => { clearInterval(fitTimer); removeEventListener("resize", fit); });
      onNotice();
      onStatus();
      onRun();
      onTail();
      onChunk();
      fit();
    }
    """.replace("__BABBLE__", json.dumps(BABBLE))

    _stylesheets: ClassVar[list[str]] = [r"""
    :host { display: block; width: 100%; }
    .write { --fs: var(--moe-fs, 14px); --colw: calc(var(--fs) * 5); display: flex; flex-direction: column; gap: 6px;
             font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: var(--fs); color: #1b1f24;
             box-sizing: border-box; min-height: 0; }
    .babble { font-size: .92em; background: #fff4d6; color: #5c3b00; border-left: 4px solid #b35806; border-radius: 6px;
              padding: 4px 10px; line-height: 1.35; flex: 0 0 auto; }
    .notice { font-size: .85em; color: #374151; line-height: 1.3; flex: 0 0 auto; }
    .notice.warn { background: #fde8e8; color: #7a1212; border-left: 4px solid #b42318; border-radius: 6px; padding: 4px 10px;
                   font-weight: 600; }
    .wview { background: #fff; border: 1px solid #d6dbe1; border-radius: 8px; padding: 6px 10px; min-width: 0;
             display: flex; flex-direction: column; min-height: 0; box-sizing: border-box; }
    .view-write-text { flex: 0 0 auto; }
    .view-write-bins { flex: 1 1 0; min-height: 200px; }
    .whead { display: flex; align-items: center; gap: 8px; flex-wrap: wrap; flex: 0 0 auto; }
    .wtitle { font-weight: 700; }
    .wsub { font-size: .8em; color: #4b5563; }
    .layers { display: flex; gap: 4px; flex-wrap: wrap; flex: 1 1 auto; }
    button.layer-btn { font: inherit; font-size: .9em; border: 1px solid #9aa3ad; background: #f4f6f9; border-radius: 6px;
                       padding: 3px 10px; cursor: pointer; color: #1b1f24; }
    button.layer-btn.on { background: #0b3d6e; color: #fff; border-color: #0b3d6e; }
    .pill { font-size: .85em; padding: 2px 10px; border-radius: 12px; background: #eef1f5; color: #1b1f24; white-space: nowrap; }
    .pill.on { background: #0b3d6e; color: #fff; }
    .pill:empty { display: none; }
    .wtext { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; line-height: 1.6; max-height: calc(var(--fs) * 6.5);
             min-height: calc(var(--fs) * 1.7); overflow-y: auto; padding: 2px; white-space: pre-wrap; overflow-wrap: anywhere; }
    .wtok { padding: 0 1px; border-radius: 3px; -webkit-box-decoration-break: clone; box-decoration-break: clone; }
    .wtok.pre { color: #4b5563; outline: 1px dashed #6b7280; outline-offset: -1px; }
    .wtok.newest { outline: 2px solid #111; outline-offset: 0; }
    .hint { color: #4b5563; font-family: system-ui, sans-serif; font-style: italic; }
    .wbins { flex: 1 1 0; min-height: 120px; display: grid; gap: 6px; overflow-x: auto; overflow-y: hidden; margin-top: 6px; }
    .wcol { display: flex; flex-direction: column; min-height: 0; min-width: 0; background: #f7f8fa; border-radius: 6px;
            border: 1px solid #e1e5ea; }
    .chead { display: flex; align-items: center; justify-content: space-between; gap: 4px; padding: 3px 6px;
             border-bottom: 1px solid #e1e5ea; flex: 0 0 auto; }
    .light { min-width: calc(var(--fs) * 1.7); height: calc(var(--fs) * 1.7); border-radius: 999px; font-weight: 700;
             display: inline-flex; align-items: center; justify-content: center; border: 2px solid #1b1f24; box-sizing: border-box;
             font-size: .9em; }
    .count { font-weight: 700; font-variant-numeric: tabular-nums; color: #1b1f24; }
    .cbody { flex: 1 1 0; overflow-y: auto; padding: 4px; display: flex; flex-wrap: wrap; gap: 3px; align-content: flex-start;
             min-height: 0; }
    .chip { display: inline-flex; align-items: center; gap: 2px; border-radius: 4px; padding: 1px 4px; max-width: 100%;
            font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em; line-height: 1.35;
            border: 1px solid rgba(0,0,0,.25); box-sizing: border-box; }
    .chip .tx { white-space: pre; overflow: hidden; text-overflow: ellipsis; min-width: 0; }
    .chip.pre { background: #fff; color: #4b5563; border: 1px dashed #6b7280; }
    .chip .also { font-family: system-ui, sans-serif; font-size: .8em; font-weight: 700; border-radius: 3px; padding: 0 3px;
                  line-height: 1.3; }
    .chip.newest { outline: 2px solid #111; outline-offset: 1px; }
    .chip.drop { animation: drop .35s ease-out; }
    @keyframes drop { from { transform: translateY(-14px); opacity: 0; } to { transform: none; opacity: 1; } }
    .wlegend { display: flex; flex-wrap: wrap; gap: 0 14px; font-size: .78em; color: #4b5563; margin-top: 4px; line-height: 1.3;
               flex: 0 0 auto; }
    .wstats { font-size: .9em; color: #1b1f24; font-variant-numeric: tabular-nums; line-height: 1.35; flex: 0 0 auto;
              background: #eef1f5; border-radius: 6px; padding: 4px 10px; }
    .wstats:empty { display: none; }
    """]


class WriteView(pn.viewable.Viewer):
    """The "Watch it write" tab: controls (Panel widgets) above a WriteScreen, and the run's state machine.

    status: idle -> writing -> done | stopped; refused when generate() turned the request down.
    `write()` starts (the prefill runs at once), `tick()` adds one new token, `stop()` stops. In a server
    session a periodic callback calls `tick()` at the chosen pace; elsewhere (tests) the caller does."""

    state = param.ClassSelector(class_=RouterState)
    status = param.Selector(default="idle", objects=["idle", "writing", "done", "stopped", "refused"])
    speed = param.Selector(default="normal", objects=list(WRITE_SPEEDS_MS), doc="The pause between two new tokens.")

    def __init__(self, notify=None, **params):
        super().__init__(**params)
        self._notify = notify if notify is not None else (lambda kind, message: None)
        self.tokens: list = []            # the run's GeneratedTokens, prompt first
        self.n_prompt = 0
        self.n_new = 0                    # new tokens asked for (after the context cut)
        self.prefill_ms = 0.0
        self.step_ms: list[float] = []
        self._gen = None
        self._stepping = False
        self._cb: PeriodicCallback | None = None
        self._run_id = 0
        self._n_experts = 0
        say = lambda m: self._notify("warning", m)
        self.prompt = refuse_bad_values(pn.widgets.TextAreaInput(
            name="Prompt", value=DEFAULT_PROMPT, height=58, max_length=MAX_PROMPT_CHARS, sizing_mode="stretch_width",
            styles={"flex": "1 1 260px", "min-width": "0"}, css_classes=["write-prompt"], stylesheets=[PROMPT_CSS]), say)
        self.new_tokens = refuse_bad_values(pn.widgets.IntSlider(name="New tokens", start=1, end=MAX_NEW_TOKENS,
                                                                 value=40, width=150), say)
        self.temperature = refuse_bad_values(pn.widgets.FloatSlider(name="Temperature (0 = greedy)", start=0.0,
                                                                    end=1.5, step=0.05, value=0.8, format="0.00",
                                                                    width=240), say)     # its label, presenter type
        self.seed = refuse_bad_values(pn.widgets.IntInput(name="Seed", value=1, start=0, end=999_999, width=90), say)
        self.pace = refuse_bad_values(pn.widgets.RadioButtonGroup(name="Pace", options=list(WRITE_SPEEDS_MS),
                                                                  value=self.speed, button_type="default",
                                                                  margin=(5, 10), align="end"), say)
        self.write_btn = pn.widgets.Button(name="\u270e Write", button_type="primary", width=90, align="end",
                                           css_classes=["write-btn"])
        self.stop_btn = pn.widgets.Button(name="\u25a0 Stop", width=80, align="end", disabled=True,
                                          css_classes=["write-stop"])
        self.screen = refuse_bad_values(WriteScreen(name="write_screen", sizing_mode="stretch_width", margin=(4, 6),
                                                    layer=self.state.layer), say)
        self.write_btn.on_click(lambda e: self.write())
        self.stop_btn.on_click(lambda e: self.stop())
        self.pace.param.watch(lambda e: setattr(self, "speed", e.new), "value")
        self.temperature.param.watch(lambda e: setattr(self.seed, "disabled", e.new == 0), "value")
        self.screen.param.watch(self._on_layer, "layer")
        self.screen.param.watch(lambda e: self._send_tail(), "resync")
        self.state.param.watch(self._on_router, ["scheme", "top_k", "n_experts", "balancing"])
        self._on_router()
        self._empty_run()
        doc = pn.state.curdoc
        if doc is not None and doc.session_context is not None:
            pn.state.on_session_destroyed(self._on_session_end)

    # -- the state machine -----------------------------------------------------------

    def write(self) -> bool:
        """Start writing: check the request, run the prefill, schedule the decode steps. False if refused."""
        self.stop()
        s = self.state
        model, request = s.model, s.request()
        prompt = (self.prompt.value_input or self.prompt.value or "")[:MAX_PROMPT_CHARS]   # typed, not yet committed
        n_new = int(self.new_tokens.value)
        n_prompt = len(get_tokenizer().encode(prompt)) if prompt else 0
        room = model.config.block_size - n_prompt
        if 1 <= room < n_new:
            self._notify("warning", f"The prompt has {n_prompt} tokens and the model's context is "
                                    f"{model.config.block_size}: it writes {room} new tokens, not {n_new}.")
            n_new = room
        temperature = float(self.temperature.value)
        try:
            gen = generate(model, prompt, max_new_tokens=n_new, temperature=temperature,
                           seed=int(self.seed.value) if temperature > 0 else None, request=request)
            t0 = time.perf_counter()
            first = next(gen)                                       # the prefill: the whole prompt in one pass
            prefill_ms = (time.perf_counter() - t0) * 1e3
            prompt_toks = [first] + [next(gen) for _ in range(n_prompt - 1)]
        except ValueError as e:
            self.status = "refused"
            self._notify("error", str(e))
            with pn.io.hold():
                self.screen.param.update(status="not written: see the message", line="", writing=False)
            return False
        self._run_id += 1
        self._gen, self.tokens, self.step_ms = gen, prompt_toks, []
        self.n_prompt, self.n_new, self.prefill_ms = n_prompt, n_new, prefill_ms
        self._n_experts = model.config.n_experts
        self.status = "writing"
        with pn.io.hold():
            self.screen.param.update(run=_dumps(self._run_meta(model, [token_record(t) for t in prompt_toks])),
                                     chunk="{}", tail="{}", writing=True, status="writing\u2026", line=self.stats_line())
            self.stop_btn.disabled = False
        self._cb = PeriodicCallback(callback=self.tick, period=WRITE_SPEEDS_MS[self.speed], log=False,
                                    background=True)
        self._cb.start()            # in a server session: on this session's document; elsewhere the caller ticks
        return True

    def tick(self) -> None:
        """One decode step: pull the next token from the generator and send it to the page."""
        if self.status != "writing" or self._gen is None or self._stepping:
            return
        self._stepping = True        # a tick still running (a server with a thread pool) is not run over
        try:
            self._step()
        finally:
            self._stepping = False

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            tok = next(self._gen)
        except StopIteration:
            self._finish("done")
            return
        except Exception as e:               # noqa: BLE001 - never a server traceback from a tick
            self._notify("error", f"Writing stopped: {e}")
            self._finish("stopped")
            return
        self.step_ms.append((time.perf_counter() - t0) * 1e3)
        self.tokens.append(tok)
        n = len(self.step_ms)
        with pn.io.hold():
            self.screen.param.update(chunk=_dumps({"run": self._run_id, "i": tok.position, "toks": [token_record(tok)]}),
                                     line=self.stats_line(), status=f"writing\u2026 {n} of {self.n_new}")
            if n >= self.n_new:
                self._finish("done")
            elif tok.id == END_OF_TEXT:
                self._finish("done", "stopped at <|endoftext|>, the end-of-text token")

    def stop(self) -> None:
        """Stop writing (Stop, a new Write, the session's end). The tokens written so far stay shown."""
        if self.status == "writing":
            self._finish("stopped")
        elif self._cb is not None:
            self._cb.stop()
            self._cb = None

    def _on_session_end(self, session_context) -> None:
        """The page closed: drop the generator and the callback (the document's callbacks go with it)."""
        cb, self._cb, self._gen = self._cb, None, None
        self.status = "stopped" if self.status == "writing" else self.status
        if cb is not None:
            with contextlib.suppress(Exception):     # the document may have dropped it already
                cb.stop()

    def _finish(self, status: str, why: str = "") -> None:
        if self._cb is not None:
            self._cb.stop()
            self._cb = None
        self._gen = None
        self.status = status
        n = len(self.step_ms)
        said = {"done": f"done: {n} new token{'s' if n != 1 else ''}", "stopped": f"stopped after {n} new tokens"}[status]
        with pn.io.hold():
            self.screen.param.update(writing=False, status=said + (f" ({why})" if why else ""), line=self.stats_line())
            self.stop_btn.disabled = True

    # -- what the page is sent ------------------------------------------------------

    def _run_meta(self, model, toks: list[dict]) -> dict:
        n = model.config.n_experts
        colors = expert_colors(n)
        return {"id": self._run_id, "n": n, "layers": model.config.n_layer, "colors": colors,
                "tints": [tint(c) for c in colors], "ink": [text_color(c) for c in colors], "toks": toks}

    def _empty_run(self) -> None:
        """Before the first Write: the current model's empty bins."""
        model = self.state.model
        self._n_experts = model.config.n_experts
        self.screen.run = _dumps(self._run_meta(model, []))

    def _send_tail(self) -> None:
        """The page missed a token (it asks by bumping `resync`): send it the whole run."""
        self.screen.tail = _dumps({"run": self._run_id, "toks": [token_record(t) for t in self.tokens],
                                   "seq": self.screen.resync})

    def _on_layer(self, event) -> None:
        layers = json.loads(self.screen.run).get("layers", 1)
        if not 0 <= event.new < layers:
            self.screen.layer = event.old if 0 <= event.old < layers else 0

    def _on_router(self, *events) -> None:
        self.screen.notice = _dumps(scheme_notice(self.state))
        if self.status in ("idle", "refused") and events and self.state.model.config.n_experts != self._n_experts:
            self._empty_run()

    @param.depends("speed", watch=True)
    def _on_speed(self) -> None:
        if self.pace.value != self.speed:
            self.pace.value = self.speed
        if self._cb is not None:
            self._cb.period = WRITE_SPEEDS_MS[self.speed]     # restarts the callback at the new pace

    def bins(self, layer: int | None = None, phase: str | None = "decode") -> list[list[int]]:
        """What the bins show for `layer` (the shown one by default): per expert, the positions of the tokens
        whose first choice it is (the new tokens only, unless phase=None)."""
        return expert_bins(self.tokens, self.screen.layer if layer is None else layer, self._n_experts, phase)

    def stats_line(self) -> str:
        """What the run measured, in words (prefill and decode times on this server)."""
        if not self.tokens:
            return ""
        p = self.n_prompt
        parts = [f"prefill: {p} prompt token{'s' if p != 1 else ''} in one pass, {self.prefill_ms:.1f} ms"]
        n = len(self.step_ms)
        if n:
            mean = sum(self.step_ms) / n
            parts.append(f"decode: one token per step, {n} step{'s' if n != 1 else ''} at {mean:.1f} ms each "
                         f"({1000 / mean:,.0f} tokens/s on this server's CPU)")
        else:
            parts.append("decode: one token per step")
        parts.append(f"shown one token every {WRITE_SPEEDS_MS[self.speed] / 1000:g} s so you can follow")
        return "; ".join(parts)

    # -- layout ----------------------------------------------------------------------

    def __panel__(self):
        controls = pn.FlexBox(self.prompt, self.new_tokens, self.temperature, self.seed,
                              pn.Column(pn.pane.HTML("<div style='font-size:var(--bokeh-font-size,12px)'>Pace</div>",
                                                     margin=(0, 10)), self.pace, margin=0),
                              self.write_btn, self.stop_btn, sizing_mode="stretch_width", align_items="flex-end",
                              gap="2px 6px", margin=(0, 4), css_classes=["write-controls"])
        return pn.Column(controls, self.screen, sizing_mode="stretch_width", margin=0)


__all__ = ["BABBLE", "DEFAULT_PROMPT", "WRITE_SPEEDS_MS", "WriteScreen", "WriteView", "expert_bins", "scheme_notice",
           "schemes_that_write", "token_record"]
