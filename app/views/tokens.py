"""The user's exact text, each token coloured by its top-1 expert (Mixtral paper, figure 8 style).

Rendered by a small JSComponent that builds <span>s with `textContent` only:
user text is never parsed as HTML, whatever it contains. Background = the
router's first choice; underline = its second choice; a hatched, struck-out
token was dropped by expert capacity. The expert's number is printed as a
subscript so colour is never the only cue. Click a token (or use the arrow
keys) to select it.
"""
from __future__ import annotations

import param
from panel.custom import JSComponent

from .palette import expert_colors, text_color, tint


def token_view_data(result, layers: list[int], show_numbers: bool = True) -> dict:
    """Plain-JSON description of the coloured text for the layers shown."""
    if result is None:
        return {}
    colors = expert_colors(result.routings[0].n_experts)
    out_layers = []
    for li in layers:
        r = result.routings[li]
        choices, kept, probs = r.choices.tolist(), r.dispatch.tolist(), r.probs.tolist()
        indices, weights = r.indices.tolist(), r.weights.tolist()
        c1, c2, d1, d2, tips = [], [], [], [], []
        for t, row in enumerate(choices):
            first = row[0] if row else -1
            second = row[1] if len(row) > 1 else -1
            c1.append(first)
            c2.append(second)
            d1.append(first >= 0 and not kept[t][first])
            d2.append(second >= 0 and not kept[t][second])
            parts = [f"expert {e} (weight {w:.2f}, p {probs[t][e]:.2f})"
                     for e, w in zip(indices[t], weights[t]) if e >= 0]
            dropped = [e for e in row if e >= 0 and not kept[t][e]]
            tip = f"token {t}, layer {li}: " + (", ".join(parts) if parts else "no expert")
            if dropped:
                tip += "; dropped by capacity: " + ", ".join(f"expert {e}" for e in dropped)
            tips.append(tip)
        out_layers.append({"layer": li, "title": f"Layer {li}", "c1": c1, "c2": c2, "d1": d1, "d2": d2, "tips": tips})
    return {
        "texts": [t.text for t in result.tokens],
        "colors": colors,
        "tints": [tint(c) for c in colors],
        "ink": [text_color(tint(c)) for c in colors],
        "show_numbers": show_numbers,
        "layers": out_layers,
    }


class TokenText(JSComponent):
    """Coloured tokens; `selected` is two-way (click or arrow keys in the browser)."""

    data = param.String(default="{}", doc="token_view_data() as JSON (a string compares in O(1) when "
                                          "param checks for a change; a big dict would be compared deeply).")
    selected = param.Integer(default=0, doc="Index of the selected token.")

    _esm = r"""
    export function render({ model, el }) {
      const root = document.createElement("div");
      root.className = "tokview";
      root.setAttribute("role", "group");
      root.setAttribute("aria-label", "Your text, each token coloured by its top-1 expert");
      let spans = [];

      function style(s, d, L, i) {
        const e1 = L.c1[i], e2 = L.c2[i];
        if (e1 >= 0) {
          s.style.backgroundColor = d.tints[e1];
          s.style.color = d.ink[e1];
          s.style.boxShadow = "inset 0 -2px 0 " + d.colors[e1];
        }
        if (e2 >= 0) {
          s.style.borderBottom = (L.d2[i] ? "3px dotted #777" : "3px solid " + d.colors[e2]);
        }
        if (L.d1[i]) s.classList.add("dropped");
      }

      function select(i, focus) {
        model.selected = i;
        for (const row of spans) {
          for (const s of row) { s.classList.remove("sel"); s.tabIndex = -1; }
          if (row[i]) { row[i].classList.add("sel"); row[i].tabIndex = 0; }
        }
        if (focus && spans.length && spans[0][i]) spans[0][i].focus();
      }

      function draw() {
        const d = JSON.parse(model.data || "{}");
        root.replaceChildren();
        spans = [];
        if (!d || !d.texts) return;
        for (const L of d.layers) {
          const block = document.createElement("div");
          block.className = "layer-block";
          const h = document.createElement("div");
          h.className = "layer-title";
          h.textContent = L.title;
          block.appendChild(h);
          const body = document.createElement("div");
          body.className = "tok-text";
          const row = [];
          d.texts.forEach((t, i) => {
            const s = document.createElement("span");
            s.className = "tok";
            s.textContent = t;                     // exact text, never HTML
            if (t.includes("\n")) s.classList.add("nl");
            if (!t.trim()) s.classList.add("ws");
            s.title = L.tips[i];
            s.tabIndex = -1;
            s.dataset.i = String(i);
            style(s, d, L, i);
            if (d.show_numbers && L.c1[i] >= 0 && t.trim()) {
              const sub = document.createElement("sub");
              sub.textContent = String(L.c1[i]);
              sub.setAttribute("aria-hidden", "true");
              s.appendChild(sub);
            }
            s.addEventListener("click", () => select(i, false));
            s.addEventListener("keydown", (ev) => {
              let j = null;
              if (ev.key === "ArrowRight") j = Math.min(i + 1, d.texts.length - 1);
              if (ev.key === "ArrowLeft") j = Math.max(i - 1, 0);
              if (j !== null) { ev.preventDefault(); model.selected = j; row[j].focus(); select(j, false); }
            });
            row.push(s);
            body.appendChild(s);
          });
          spans.push(row);
          block.appendChild(body);
          root.appendChild(block);
        }
        select(Math.min(model.selected, d.texts.length - 1), false);
      }

      model.on("data", draw);
      model.on("selected", () => {
        for (const row of spans) {
          for (const s of row) s.classList.toggle("sel", s.dataset.i === String(model.selected));
        }
      });
      draw();
      el.appendChild(root);
    }
    """

    _stylesheets = [r"""
    .tokview { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 15px;
               line-height: 2.0; max-height: 460px; overflow-y: auto; padding: 4px 8px; }
    .layer-block { margin-bottom: 10px; }
    .layer-title { font-family: system-ui, sans-serif; font-size: 12px; font-weight: 600; color: #444;
                   text-transform: uppercase; letter-spacing: .04em; }
    .tok-text { white-space: pre-wrap; word-break: break-word; }
    .tok { border-radius: 3px; padding: 1px 0; cursor: pointer; }
    .tok sub { font-size: 9px; opacity: .75; margin-left: 1px; font-family: system-ui, sans-serif; }
    .tok.nl::before { content: "\21B5"; opacity: .45; font-size: 11px; }
    .tok.dropped { background-image: repeating-linear-gradient(45deg, rgba(0,0,0,.28) 0 2px, transparent 2px 6px);
                   text-decoration: line-through; }
    .tok.sel { outline: 2px solid #111; outline-offset: 1px; }
    .tok:focus-visible { outline: 3px solid #1a56db; outline-offset: 2px; }
    """]
