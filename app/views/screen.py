"""The Router tab's first screen: the router deciding, the text coloured by expert, load and counters.

One JSComponent draws all four views in the browser from one compact JSON record
of the real routing (`screen_data`): every token's choices, kept flags, weights
and router scores, for every layer. Selecting a token, switching the layer and
playing through the text are drawn in the browser with no round trip to the
server; changing k, N, the scheme or the text routes again on the server and
sends a new record. User text is only ever set with `textContent`.

The four views carry the CSS classes the lessons point at:
- `view-decide`: the selected token's router scores for all N experts (bars), the
  experts that light up, their combine weights, and what the scheme did;
- `view-tokens`: the text, each token with one colour stripe per chosen expert (k stripes);
- `view-load`: tokens per expert in this layer, on this text and over the held-out corpus;
- `view-counters`: total vs active parameters of the loaded model.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import param
from panel.custom import JSComponent

from moe_core.model.routing import SCHEMES

from ..state import corpus_profile
from .palette import expert_colors, text_color, tint

PLAY_SPEEDS_MS = {"slow": 1400, "normal": 800, "fast": 300}


def per_token_text(result) -> str:
    """What k really is under the result's scheme, in words (the k control and the counter say the same)."""
    s = SCHEMES[result.scheme]
    if s.uses_k:
        return f"k = {result.top_k} experts per token"
    if s.fixed_k:
        return f"{s.fixed_k} expert{'s' if s.fixed_k > 1 else ''} per token (fixed by the scheme)"
    return f"experts choose tokens: {result.params.experts_per_token:.1f} experts per token on this text"


def _permille(rows) -> list:
    return [[round(x * 1000) for x in row] for row in rows]


def screen_data(result, model, corpus: dict | None = None) -> dict:
    """The compact record the screen draws: plain JSON, numbers in thousandths.

    `corpus`: the model's held-out profile (`moe_core.analysis.profiles`), whose per-expert shares
    of all choices are drawn next to this text's load; None when there is none."""
    if result is None:
        return {}
    n = result.routings[0].n_experts
    colors = expert_colors(n)
    biases = [m.expert_bias.tolist() for m in model.model.modules() if hasattr(m, "expert_bias")]
    layers = []
    for li, r in enumerate(result.routings):
        choices = r.choices.tolist()
        kept_rows = r.dispatch.tolist()
        weight_of = [dict(zip(i, w)) for i, w in zip(r.indices.tolist(), r.weights.tolist())]
        top, kept, w = [], [], []
        for t, row in enumerate(choices):
            row = [e for e in row if e >= 0]
            top.append(row)
            kept.append([int(kept_rows[t][e]) for e in row])
            w.append([round(weight_of[t].get(e, 0.0) * 1000) for e in row])
        layer = {"top": top, "kept": kept, "w": w, "p": _permille(r.probs.tolist()), "capacity": r.capacity}
        if result.scheme == "deepseek" and li < len(biases):
            layer["bias"] = [round(b * 1000) for b in biases[li]]
        if corpus and li < len(corpus.get("layers", [])):
            layer["corpus"] = [round(e["share_all"] * 1000) for e in corpus["layers"][li]["experts"]]
        layers.append(layer)
    s = SCHEMES[result.scheme]
    p = result.params
    route = (corpus or {}).get("route", {})
    corpus_route = SCHEMES[route["scheme"]].label + (f", k = {route['top_k']}" if route.get("top_k") else "") \
        if route.get("scheme") in SCHEMES else ""
    return {
        "tokens": [t.text for t in result.tokens],
        "n": n,
        "scheme": result.scheme,
        "scheme_label": s.label,
        "k": result.top_k,
        "per_token": per_token_text(result),
        "colors": colors,
        "tints": [tint(c) for c in colors],
        "ink": [text_color(c) for c in colors],
        "layers": layers,
        "corpus_tokens": (corpus or {}).get("slice", {}).get("n_tokens"),
        "corpus_route": corpus_route,
        # the held-out marks show the model's own routing; say so when the screen routes another way
        "corpus_as_now": route.get("scheme") == result.scheme and route.get("top_k") == result.top_k,
        "counters": {"total": p.total, "active": p.active_per_token, "ratio": round(p.ratio, 2),
                     "share": round(p.active_share, 4), "n": n},
    }


_json: OrderedDict = OrderedDict()


def screen_json(result, model, corpus: dict | None = None) -> str:
    """`screen_data` as compact JSON, remembered for the last results (sessions share routings: see
    app.state.routed). The entry holds the result, so its id is not reused meanwhile."""
    key = (id(result), id(corpus))
    hit = _json.get(key)
    if hit is None:
        hit = _json[key] = (result, json.dumps(screen_data(result, model, corpus), separators=(",", ":")))
        if len(_json) > 64:
            _json.popitem(last=False)
    return hit[1]


class RouterScreen(JSComponent):
    """The first screen. `layer` and `selected` are two-way: clicks in the browser set them."""

    data = param.String(default="{}", doc="screen_data() as JSON (a string: param compares it in O(1)).")
    layer = param.Integer(default=0, bounds=(0, None), doc="The layer shown.")
    selected = param.Integer(default=0, bounds=(0, None), doc="Index of the selected token.")
    asked = param.Integer(default=0, doc="Routings asked for by this page's controls (counted by the server).")
    answered = param.Integer(default=0, doc="Routings done: the busy cue shows while asked > answered, after 200 ms.")
    nudge = param.Integer(default=0, doc="Bumped by the page when a routing it asked for is not back after 1.5 s.")
    focus = param.String(default="", doc="The view a lesson step points at (decide, tokens, load, counters).")

    _esm = r"""
    const SPEEDS = __SPEEDS__;
    const MIN_HEIGHT = 380;      // below this the views keep their own height and the page scrolls
    const h = (tag, cls, text) => {
      const e = document.createElement(tag);
      if (cls) e.className = cls;
      if (text !== undefined) e.textContent = text;
      return e;
    };
    const fmt = (n) => n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n >= 1e3 ? (n / 1e3).toFixed(1) + " K" : String(n);
    const pct = (x) => (100 * x).toFixed(x < 0.1 ? 1 : 0) + "%";
    const shown = (t) => t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/ /g, "\u2423") || "\u2205";

    export function render({ model, el }) {
      let d = {}, timer = null, playTo = null;
      const root = h("div", "screen");
      root.dataset.seq = "0";
      // --- the router deciding
      const decide = h("section", "view view-decide");
      const dHead = h("div", "vhead");
      const dTitle = h("div", "vtitle");
      const play = h("button", "play", "\u25b6 Play");
      play.title = "Step through the text token by token: each token's experts light up and the load fills";
      const speed = h("select", "speed");
      for (const s of Object.keys(SPEEDS)) { const o = h("option", "", s); o.value = s; speed.appendChild(o); }
      speed.value = "normal";
      speed.setAttribute("aria-label", "play speed");
      dHead.append(dTitle, play, speed);
      const bars = h("div", "bars");
      bars.setAttribute("role", "img");
      const dNote = h("div", "note");
      decide.append(dHead, bars, dNote);
      // --- the text
      const tokens = h("section", "view view-tokens");
      const tHead = h("div", "vhead");
      const tTitle = h("div", "vtitle", "Your text, coloured by expert");
      const layerBox = h("div", "layers");
      layerBox.setAttribute("role", "group");
      layerBox.setAttribute("aria-label", "layer");
      tHead.append(tTitle, layerBox);
      const text = h("div", "toktext");
      text.setAttribute("role", "group");
      text.setAttribute("aria-label", "Your text, each token with its experts");
      const legend = h("div", "legend");
      tokens.append(tHead, text, legend);
      // --- load and counters
      const load = h("section", "view view-load");
      const lTitle = h("div", "vtitle");
      const chart = h("div", "chart");            // the bars only: the lines are drawn on the same scale
      const lnums = h("div", "lnums");
      const lNote = h("div", "note");
      load.append(lTitle, chart, lnums, lNote);
      const counters = h("section", "view view-counters");
      root.append(decide, load, tokens, counters);
      el.appendChild(root);

      let spans = [], cols = [], lbars = [], shownN = -1;

      function L() { return d.layers ? d.layers[Math.min(model.layer, d.layers.length - 1)] : null; }
      function sel() { return Math.max(0, Math.min(model.selected, (d.tokens || [""]).length - 1)); }

      function buildColumns() {
        bars.replaceChildren(); chart.replaceChildren(); lnums.replaceChildren(); cols = []; lbars = [];
        for (let e = 0; e < d.n; e++) {
          const c = h("div", "col");
          const val = h("div", "val");
          const track = h("div", "track");
          const fill = h("div", "fill");
          const sel2 = h("div", "mark sel-mark");      // DeepSeek: score + bias (what selection ranks)
          const tick = h("div", "mark tick");          // Expert Choice: the score this expert needed
          track.append(fill, sel2, tick);
          const light = h("div", "light", String(e));   // the expert's number, in its light
          const wt = h("div", "wt");
          c.append(val, track, light, wt);
          bars.appendChild(c);
          cols.push({ c, val, fill, sel2, tick, light, wt });
          const lc = h("div", "lcol");
          const ltrack = h("div", "ltrack");
          const lfill = h("div", "lfill");
          const ldrop = h("div", "ldrop");
          const lcorp = h("div", "lcorp");
          ltrack.append(lfill, ldrop, lcorp);
          lc.append(ltrack);
          chart.appendChild(lc);
          lnums.appendChild(h("div", "num", String(e)));
          lbars.push({ lc, lfill, ldrop, lcorp });
        }
        for (const cls of ["fair", "cap"]) { const ln = h("div", "hline " + cls); chart.appendChild(ln); }
        shownN = d.n;
      }

      function drawLayers() {
        layerBox.replaceChildren();
        (d.layers || []).forEach((_, i) => {
          const b = h("button", "layer-btn" + (i === model.layer ? " on" : ""), "Layer " + i);
          b.dataset.layer = String(i);
          b.setAttribute("aria-pressed", String(i === model.layer));
          b.addEventListener("click", () => { stop(); model.layer = i; });
          layerBox.appendChild(b);
        });
      }

      function drawText() {
        text.replaceChildren();
        spans = [];
        let word = null;
        (d.tokens || []).forEach((t, i) => {
          if (!word || /^\s/.test(t)) {
            word = h("span", "word");
            text.appendChild(word);
          }
          const s = h("span", "tok");
          const tx = h("span", "tx", t.replace(/\n/g, "\u21b5"));   // text, never HTML; a newline shows as a mark
          s.dataset.text = t;                         // the token's exact text
          if (t.includes("\n")) s.classList.add("nl");
          const st = h("span", "stripes");
          s.append(tx, st);
          s.tabIndex = -1;
          s.dataset.i = String(i);
          s.addEventListener("click", () => { stop(); choose(i, false); });
          s.addEventListener("keydown", (ev) => {
            let j = null;
            if (ev.key === "ArrowRight") j = Math.min(i + 1, d.tokens.length - 1);
            if (ev.key === "ArrowLeft") j = Math.max(i - 1, 0);
            if (j !== null) { ev.preventDefault(); stop(); choose(j, true); }
          });
          spans.push(s);
          word.appendChild(s);
          if (t.includes("\n")) { text.appendChild(h("span", "brk")); word = null; }   // the text's own line break
        });
      }

      function paintText() {
        const l = L();
        if (!l) return;
        spans.forEach((s, i) => {
          const st = s.lastChild;
          st.replaceChildren();
          const top = l.top[i], kept = l.kept[i];
          s.classList.toggle("none", top.length === 0);
          const first = top.length ? top[0] : -1;
          s.firstChild.style.backgroundColor = first >= 0 && kept[0] ? d.tints[first] : "";
          const tip = [];
          top.forEach((e, j) => {
            const b = h("span", "stripe" + (kept[j] ? "" : " dropped"));
            b.style.backgroundColor = kept[j] ? d.colors[e] : "";
            b.dataset.e = String(e);
            st.appendChild(b);
            tip.push("expert " + e + (kept[j] ? " (weight " + (l.w[i][j] / 1000).toFixed(2) + ")" : " dropped: expert full"));
          });
          s.title = "token " + i + ", layer " + model.layer + ": " + (tip.length ? tip.join(", ") : "no expert took it");
          s.setAttribute("aria-label", JSON.stringify(d.tokens[i]) + ": " + (tip.join(", ") || "no expert"));
        });
        mark();
      }

      function mark() {
        const i = sel();
        spans.forEach((s, j) => { s.classList.toggle("sel", j === i); s.tabIndex = j === i ? 0 : -1;
                                  s.classList.toggle("ahead", playTo !== null && j > playTo); });
      }

      function choose(i, focus) {
        model.selected = i;
        mark();
        drawDecide();
        if (focus && spans[i]) spans[i].focus();
        if (playTo !== null) drawLoad();
      }

      function ecThresholds(l, C) {
        // Expert Choice: expert e takes its C highest-scoring tokens; the C-th score is its cut-off
        const out = [];
        for (let e = 0; e < d.n; e++) {
          const col = l.p.map((row) => row[e]).sort((a, b) => b - a);
          out.push(col[Math.min(C, col.length) - 1]);
        }
        return out;
      }

      function drawDecide() {
        const l = L();
        if (!l) return;
        const i = sel();
        const top = l.top[i], kept = l.kept[i], w = l.w[i], p = l.p[i];
        dTitle.replaceChildren();
        dTitle.append(h("span", "", "The router decides: token " + i + " "),
                      h("code", "tokname", shown(d.tokens[i])), h("span", "", " \u00b7 layer " + model.layer));
        const ds = d.scheme === "deepseek";
        const biased = ds && l.bias ? p.map((v, e) => v + l.bias[e]) : null;
        const thr = d.scheme === "expert_choice" && l.capacity ? ecThresholds(l, l.capacity) : null;
        const maxv = Math.max(1, ...p, ...(biased || [0]));
        const label = [];
        for (let e = 0; e < d.n; e++) {
          const c = cols[e];
          const j = top.indexOf(e);
          const on = j >= 0 && kept[j] === 1, dropped = j >= 0 && kept[j] === 0;
          c.fill.style.height = (100 * p[e] / maxv).toFixed(1) + "%";
          c.fill.style.backgroundColor = on ? d.colors[e] : dropped ? "#9aa3ad" : "#c9ced6";
          c.val.textContent = (p[e] / 1000).toFixed(2);
          c.c.classList.toggle("on", on);
          c.c.classList.toggle("dropped", dropped);
          c.light.style.backgroundColor = on ? d.colors[e] : "";
          c.light.style.boxShadow = on ? "0 0 14px 3px " + d.colors[e] : "";
          c.light.textContent = dropped ? e + "\u2715" : String(e);
          c.light.style.color = on ? d.ink[e] : "";
          c.wt.textContent = on ? (w[j] / 1000).toFixed(2) : dropped ? "full" : "";
          c.sel2.style.display = biased ? "block" : "none";
          if (biased) c.sel2.style.bottom = (100 * Math.max(0, biased[e]) / maxv).toFixed(1) + "%";
          c.tick.style.display = thr ? "block" : "none";
          if (thr) c.tick.style.bottom = (100 * thr[e] / maxv).toFixed(1) + "%";
          label.push("expert " + e + " score " + (p[e] / 1000).toFixed(2) + (on ? " lit, weight " + (w[j] / 1000).toFixed(2) : dropped ? " chosen but dropped" : ""));
        }
        bars.setAttribute("aria-label", label.join("; "));
        dNote.replaceChildren(...note(l, i, top, kept, biased));
      }

      function note(l, i, top, kept, biased) {
        const lit = top.filter((e, j) => kept[j]);
        const drop = top.filter((e, j) => !kept[j]);
        const out = [];
        const say = (t, cls) => out.push(h("div", cls || "", t));
        const ww = lit.map((e) => "expert " + e + " \u00d7 " + (l.w[i][top.indexOf(e)] / 1000).toFixed(2)).join(" + ");
        const p = l.p[i];
        const best = p.indexOf(Math.max(...p));
        if (d.scheme === "switch") {
          say("Switch lights exactly one expert, the highest score. Each expert has room for " + l.capacity +
              " tokens of this text; a token past that is dropped and skips the layer (residual only).");
        } else if (d.scheme === "expert_choice") {
          say("Experts choose tokens: each expert takes the " + l.capacity + " tokens of this text it scores highest " +
              "(tick = the lowest score it took). This token was taken by " + lit.length + " expert" +
              (lit.length === 1 ? "" : "s") + ".");
        } else if (d.scheme === "base") {
          say("BASE gives every expert the same number of tokens (a balanced assignment)." +
              (lit.length && lit[0] !== best ? " This token's top score was expert " + best + ", but balance sent it to expert " + lit[0] + "." : ""));
        } else if (d.scheme === "deepseek") {
          const k = d.k || top.length;
          const plain = p.map((v, e) => [v, e]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, k).map((x) => x[1]);
          const moved = plain.filter((e) => !lit.includes(e));
          say("DeepSeek-V3 ranks sigmoid score + bias (the dark mark) to choose, then weights by the score alone." +
              (moved.length ? " The bias changed the choice: without it expert " + moved.join(", ") + " would be lit." :
               " Here the bias did not change the choice."));
        } else if (d.scheme === "gshard") {
          say("GShard: top-2 with room for " + l.capacity + " tokens per expert; first choices take their slots " +
              "before second choices, so second choices are dropped first (the second expert is always sent here; " +
              "the paper sends it with probability 2\u00b7p\u2082).");
        } else if (d.scheme === "hash" || d.scheme === "random") {
          const k = d.k || top.length;
          say((d.scheme === "hash" ? "The router is not used: a fixed hash of this token's id picks its " + k + " experts, " +
               "the same ones wherever the token appears" : "The router is not used: " + k + " experts drawn at random for " +
               "this token, drawn again at every routing") + ", each weighted 1/" + k + ". The bars show these weights: " +
               "there are no scores.");
        } else {
          say("Top-" + (d.k || top.length) + " of " + d.n + " scores light up; their weights are renormalised to sum to 1.");
        }
        say(lit.length ? "Output = " + ww + "." : "No expert processes this token: it passes through the residual only.", "out");
        if (drop.length) say("Dropped (expert full): expert " + drop.join(", ") + ".", "warn");
        return out;
      }

      function drawLoad() {
        const l = L();
        if (!l) return;
        const upto = playTo === null ? d.tokens.length - 1 : playTo;
        const T = d.tokens.length;
        const kept = new Array(d.n).fill(0), dropped = new Array(d.n).fill(0);
        let slots = 0;
        for (let t = 0; t < T; t++) {
          l.top[t].forEach((e, j) => { if (t <= upto) { if (l.kept[t][j]) kept[e]++; else dropped[e]++; } if (l.kept[t][j]) slots++; });
        }
        const all = Math.max(1, l.top.reduce((a, r) => a + r.length, 0));
        const fair = all / d.n;
        const corp = l.corpus ? l.corpus.map((x) => x * all / 1000) : null;
        const top = Math.max(1, fair * 1.3, ...kept.map((v, e) => v + dropped[e]), ...(corp || [0]), l.capacity || 0);
        for (let e = 0; e < d.n; e++) {
          const b = lbars[e];
          b.lfill.style.height = (100 * kept[e] / top).toFixed(1) + "%";
          b.lfill.style.backgroundColor = d.colors[e];
          b.ldrop.style.height = (100 * dropped[e] / top).toFixed(1) + "%";
          b.ldrop.style.bottom = (100 * kept[e] / top).toFixed(1) + "%";
          b.lcorp.style.display = corp ? "block" : "none";
          if (corp) b.lcorp.style.bottom = (100 * corp[e] / top).toFixed(1) + "%";
          b.lc.title = "expert " + e + ": " + kept[e] + " tokens" + (dropped[e] ? ", " + dropped[e] + " dropped" : "") +
                       (corp ? "; held-out corpus " + (l.corpus[e] / 10).toFixed(1) + "% of choices" : "");
        }
        const fairEl = chart.querySelector(".fair"), capEl = chart.querySelector(".cap");
        fairEl.style.bottom = (100 * fair / top).toFixed(1) + "%";
        fairEl.title = "fair share: " + fair.toFixed(1) + " tokens per expert";
        capEl.style.display = l.capacity ? "block" : "none";
        if (l.capacity) capEl.style.bottom = (100 * l.capacity / top).toFixed(1) + "%";
        lTitle.textContent = "Load in layer " + model.layer + ": tokens per expert" + (playTo !== null ? " (first " + (upto + 1) + " tokens)" : "");
        const load = kept.map((v, e) => v + dropped[e]);
        const busiest = Math.max(...load) / Math.max(1, load.reduce((a, b) => a + b, 0));   // of the choices so far
        const key = (cls, label) => { const x = h("span", "key"); x.append(h("span", "sym " + cls), h("span", "", label)); return x; };
        const keys = h("div", "keys");
        keys.append(key("sym-bar", "this text (busiest: " + pct(busiest) + " of all choices)"));
        keys.append(corp ? key("sym-corp", d.corpus_as_now ? "held-out corpus" : "held-out corpus as trained (not this routing)") :
                    h("span", "key", "held-out corpus: not computed for this model (Expert profiles computes it)"));
        keys.append(key("sym-fair", "fair share " + pct(1 / d.n)));
        if (l.capacity) keys.append(key("sym-cap", "capacity " + l.capacity));
        keys.title = corp ? "Corpus: " + fmt(d.corpus_tokens || 0) + " held-out tokens routed as the model was trained (" + d.corpus_route + ")" : "";
        lNote.replaceChildren(keys, h("div", "why", "Balance is trained over mixed batches, not within one text, so one " +
                                      "text can be lopsided while the corpus is not (Qwen, arXiv:2501.11873)."));
      }

      function drawCounters() {
        const c = d.counters;
        counters.replaceChildren();
        const cell = (label, value, sub, cls) => {
          const x = h("div", "stat " + (cls || ""));
          x.append(h("div", "label", label), h("div", "big", value), h("div", "sub", sub));
          return x;
        };
        counters.append(
          cell("Total parameters", c.total.toLocaleString("en-US"), "all N = " + c.n + " experts sit in memory", "total"),
          cell("Active per token", c.active.toLocaleString("en-US"), d.per_token, "active"),
          cell("Total / active", c.ratio.toFixed(2) + "\u00d7", pct(c.share) + " of the model touches each token"));
        counters.title = "Counted from the loaded PyTorch module. Memory follows N; compute per token follows k.";
      }

      function draw() {
        d = JSON.parse(model.data || "{}");
        if (!d.tokens) return;
        stop();
        if (shownN !== d.n) buildColumns();
        drawLayers();
        drawText();
        paintText();
        drawDecide();
        drawLoad();
        drawCounters();
        legend.replaceChildren(
          h("span", "lg", "a stripe per expert that took the token, first choice on top"),
          h("span", "lg dropped-key", "hatched: dropped, expert full"),
          h("span", "lg none-key", "grey: no expert"));
        root.dataset.seq = String(Number(root.dataset.seq) + 1);
        root.dataset.layer = String(model.layer);
      }

      function stop() {
        if (timer) { clearInterval(timer); timer = null; }
        if (playTo !== null) { playTo = null; mark(); drawLoad(); }
        play.textContent = "\u25b6 Play";
      }
      play.addEventListener("click", () => {
        if (timer) { stop(); return; }
        playTo = 0;
        choose(0, false);
        play.textContent = "\u275a\u275a Pause";
        timer = setInterval(() => {
          if (playTo >= d.tokens.length - 1) { clearInterval(timer); timer = null; play.textContent = "\u25b6 Play"; return; }
          playTo += 1;
          choose(playTo, false);
        }, SPEEDS[speed.value]);
      });
      speed.addEventListener("change", () => { if (timer) { play.click(); play.click(); } });

      // on a wide screen the four views fill what is left of the first viewport, whatever sits above
      // them (a lesson card, presenter type): the bars and the text flex, nothing runs below the fold
      let fitted = "";
      function fit() {
        const wide = innerWidth > 900;
        const top = root.getBoundingClientRect().top + scrollY;
        const want = wide ? Math.max(MIN_HEIGHT, Math.floor(innerHeight - top - 6)) + "px" : "";
        if (want !== fitted) { fitted = want; root.style.height = want; root.classList.toggle("fit", wide); }
      }
      const fitTimer = setInterval(fit, 300);
      addEventListener("resize", fit);

      model.on("data", draw);
      model.on("layer", () => { drawLayers(); paintText(); drawDecide(); drawLoad(); root.dataset.layer = String(model.layer); });
      model.on("selected", () => { mark(); drawDecide(); });
      let nudge = null;
      const flags = () => {
        const waiting = model.asked > model.answered;                  // counters: any arrival order settles
        root.classList.toggle("busy", waiting);
        clearTimeout(nudge);
        if (waiting) nudge = setTimeout(() => { if (model.asked > model.answered) model.nudge += 1; }, 1500);
        for (const [name, v] of [["decide", decide], ["tokens", tokens], ["load", load], ["counters", counters]])
          v.classList.toggle("lesson-focus", model.focus === name);
      };
      model.on("asked", flags);
      model.on("answered", flags);
      model.on("focus", flags);
      model.on("remove", () => { if (timer) clearInterval(timer); clearInterval(fitTimer); clearTimeout(nudge); removeEventListener("resize", fit); });
      flags();
      draw();
      fit();
    }
    """.replace("__SPEEDS__", json.dumps(PLAY_SPEEDS_MS))

    _stylesheets = [r"""
    :host { display: block; width: 100%; }
    .screen { --fs: var(--moe-fs, 14px); position: relative; display: grid; gap: 10px; font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
              font-size: var(--fs); color: #1b1f24;
              grid-template-columns: minmax(0, 1.25fr) minmax(0, 1fr);
              grid-template-areas: "decide load" "tokens counters"; }
    .view { background: #fff; border: 1px solid #d6dbe1; border-radius: 8px; padding: 8px 10px; min-width: 0; }
    .view-decide { grid-area: decide; } .view-load { grid-area: load; }
    .view-tokens { grid-area: tokens; } .view-counters { grid-area: counters; align-self: start; }
    .view.lesson-focus { outline: 4px solid #B35806; outline-offset: 1px; }
    .vhead { display: flex; align-items: center; gap: 8px; flex-wrap: wrap; }
    .vtitle { font-weight: 700; flex: 1 1 auto; font-size: 1em; }
    code.tokname { background: #eef1f5; padding: 1px 5px; border-radius: 4px; white-space: pre; font-size: 1.05em; }
    button.play, select.speed, button.layer-btn { font: inherit; font-size: .9em; border: 1px solid #9aa3ad; background: #f4f6f9;
              border-radius: 6px; padding: 3px 10px; cursor: pointer; color: #1b1f24; }
    button.play { background: #0b5cad; color: #fff; border-color: #0b5cad; }
    button.layer-btn.on { background: #0b3d6e; color: #fff; border-color: #0b3d6e; }
    .layers { display: flex; gap: 4px; flex-wrap: wrap; }
    .bars { display: flex; gap: 4px; height: calc(var(--fs) * 12); align-items: stretch; margin-top: 6px; }
    .col { flex: 1 1 0; min-width: 0; display: flex; flex-direction: column; align-items: center; }
    .col .val { font-size: .72em; color: #4b5563; font-variant-numeric: tabular-nums; height: 1.3em; }
    .track { position: relative; flex: 1 1 auto; width: 70%; max-width: 44px; background: #f1f3f6; border-radius: 3px 3px 0 0; }
    .fill { position: absolute; bottom: 0; left: 0; right: 0; border-radius: 3px 3px 0 0;
            transition: height .45s ease, background-color .45s ease; }
    .mark { position: absolute; left: -3px; right: -3px; height: 3px; background: #1b1f24; display: none;
            transition: bottom .45s ease; }
    .mark.tick { background: #B35806; }
    .light { min-width: calc(var(--fs) * 1.7); height: calc(var(--fs) * 1.7); max-width: 100%; border-radius: 999px; margin-top: 4px;
             background: #3a3f47; border: 2px solid #1b1f24; color: #fff; font-weight: 700; line-height: calc(var(--fs) * 1.7 - 4px);
             text-align: center; font-size: .9em; box-sizing: border-box; padding: 0 2px;
             transition: background-color .4s ease, box-shadow .4s ease; }
    .col.dropped .light { background: #fff; color: #b42318; border: 2px dashed #b42318; }
    .col .wt { font-size: .75em; height: 1.3em; font-variant-numeric: tabular-nums; color: #0b3d6e; font-weight: 700; }
    .note { font-size: .82em; line-height: 1.3; color: #374151; margin-top: 3px; }
    .note .out { font-weight: 600; color: #1b1f24; }
    .note .warn { color: #8a2a0a; font-weight: 600; }
    .note .why { color: #4b5563; font-style: italic; font-size: .92em; }
    .toktext { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; line-height: 1.25; max-height: calc(var(--fs) * 11);
               overflow-y: auto; padding: 4px 2px; display: flex; flex-wrap: wrap; row-gap: 6px; align-content: flex-start; }
    .tok { display: inline-flex; flex-direction: column; cursor: pointer; border-radius: 3px; }
    .tok .tx { white-space: pre; padding: 0 1px; border-radius: 3px; transition: background-color .3s; }
    .word { display: inline-flex; white-space: nowrap; }
    .tok.nl .tx { color: #6b7280; }
    .brk { flex-basis: 100%; height: 0; }
    .tok .stripes { display: flex; flex-direction: column; gap: 1px; margin-top: 1px; }
    .stripe { display: block; height: 4px; border-radius: 1px; transition: background-color .3s; }
    .stripe.dropped { background: repeating-linear-gradient(45deg, #555 0 2px, #fff 2px 4px); }
    .tok.none .tx { color: #6b7280; text-decoration: underline dotted; }
    .tok.sel .tx { outline: 2px solid #111; outline-offset: 1px; }
    .tok.ahead { opacity: .35; }
    .tok:focus-visible { outline: 3px solid #1a56db; outline-offset: 2px; }
    .legend { display: flex; flex-wrap: wrap; gap: 0 14px; font-size: .74em; color: #4b5563; margin-top: 3px; line-height: 1.3; }
    .keys { display: flex; flex-wrap: wrap; gap: 0 14px; }
    .key { display: inline-flex; align-items: center; gap: 4px; white-space: nowrap; }
    .sym { display: inline-block; width: 16px; height: 0; }
    .sym-bar { height: 10px; width: 10px; background: #9aa3ad; }
    .sym-corp { border-top: 3px solid #1b1f24; }
    .sym-fair { border-top: 2px dotted #1b1f24; }
    .sym-cap { border-top: 2px dashed #B35806; }
    .chart { position: relative; display: flex; gap: 4px; height: calc(var(--fs) * 9); margin: 6px 0 2px; align-items: stretch; }
    .lcol { flex: 1 1 0; min-width: 0; display: flex; flex-direction: column; align-items: center; }
    .ltrack { position: relative; flex: 1 1 auto; width: 75%; max-width: 40px; border-bottom: 1px solid #6b7280; }
    .lfill, .ldrop { position: absolute; left: 0; right: 0; bottom: 0; transition: height .4s ease, bottom .4s ease; }
    .ldrop { background: repeating-linear-gradient(45deg, #555 0 2px, #fff 2px 4px); }
    .lcorp { position: absolute; left: -4px; right: -4px; height: 3px; background: #1b1f24; transition: bottom .4s ease; }
    .hline { position: absolute; left: 0; right: 0; height: 0; pointer-events: auto; }
    .hline.fair { border-top: 2px dotted #1b1f24; }
    .hline.cap { border-top: 2px dashed #B35806; }
    .lnums { display: flex; gap: 4px; }
    .lnums .num { flex: 1 1 0; min-width: 0; text-align: center; font-weight: 700; font-size: .8em; }
    .view-counters { display: flex; gap: 8px; flex-wrap: wrap; }
    .stat { flex: 1 1 120px; background: #f4f6f9; border-radius: 6px; padding: 4px 8px; }
    .stat .label { font-size: .72em; font-weight: 700; text-transform: uppercase; color: #4b5563; letter-spacing: .04em; }
    .stat .big { font-size: 1.35em; font-weight: 700; font-variant-numeric: tabular-nums; }
    .stat .sub { font-size: .75em; color: #4b5563; }
    .screen.busy::after { content: "routing\2026"; position: absolute; top: 6px; right: 10px; background: #0b3d6e; color: #fff;
              padding: 3px 10px; border-radius: 12px; font-size: .85em; opacity: 0; animation: cue 0s linear .2s forwards; }
    @keyframes cue { to { opacity: 1; } }
    .screen.fit { grid-template-rows: minmax(0, 1.45fr) minmax(0, 1fr); }
    .screen.fit .view { display: flex; flex-direction: column; min-height: 0; overflow: hidden; }
    .screen.fit .view > * { flex: 0 0 auto; }
    .screen.fit .bars { flex: 1 1 0; height: auto; min-height: 72px; }
    .screen.fit .chart { flex: 1 1 0; height: auto; min-height: 48px; }
    .screen.fit .toktext { flex: 1 1 0; max-height: none; min-height: 2.6em; }
    .screen.fit .view-counters { flex-direction: row; flex-wrap: wrap; align-content: flex-start; overflow: auto; }
    @media (max-width: 900px) {
      .screen { grid-template-columns: minmax(0, 1fr); grid-template-areas: "decide" "tokens" "load" "counters"; }
    }
    """]

    def follow(self, state) -> RouterScreen:
        """Show `state` (a RouterState) from now on: its routing, token and layer, and send the token or layer
        picked in the browser back to it. Values come over the websocket: one the page could not have sent (a
        layer the model lacks, a token past the end) is put back, never raised on."""

        def draw(event=None):
            if state.result is not None:
                self.param.update(data=screen_json(state.result, state.model, corpus_profile(state.model)),
                                  selected=state.selected_token, layer=state.layer)

        def picked(event):
            n = len(state.result.tokens) if state.result is not None else 1
            if event.name == "layer" and event.new in state.param.layer.objects:
                state.layer = event.new
            elif event.name == "selected" and 0 <= event.new < n:
                state.selected_token = event.new
            else:
                self.param.update(layer=state.layer, selected=state.selected_token)

        state.param.watch(draw, ["result"])
        state.param.watch(lambda e: self.param.update(selected=state.selected_token, layer=state.layer),
                          ["selected_token", "layer"])
        self.param.watch(picked, ["selected", "layer"])
        draw()
        return self


__all__ = ["RouterScreen", "screen_data", "screen_json", "per_token_text", "PLAY_SPEEDS_MS"]
