"""HTML panels built from the routing result: selected-token detail, balance metrics,
parameter counters, published models, explainers.

These are pure functions returning HTML strings, so they are unit-tested
without a browser. Every piece of user text goes through `html.escape`:
Panel's HTML/Markdown panes render raw HTML, so escaping is our job.
"""
from __future__ import annotations

import html
import math
import re
from functools import lru_cache

from moe_core.analysis.metrics import COVERAGE, METRICS, balance_metrics, coverage_curve
from moe_core.model.checkpoint import ASSETS
from moe_core.model.published import compute, memory_bytes, published_models
from moe_core.model.routing import SCHEMES

from .palette import expert_colors, text_color

esc = html.escape


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


def visible(text: str) -> str:
    """A token's text with whitespace and control characters made visible, then escaped."""
    shown = text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
    shown = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in shown)
    return esc(shown or "\u2205")


def chip(e: int, n: int) -> str:
    c = expert_colors(n)[e]
    return (f'<span class="chip" style="background:{c};color:{text_color(c)}" '
            f'aria-label="expert {e}">{e}</span>')


def token_detail(result, layers: list[int], selected: int) -> str:
    """Logits -> probabilities -> choice -> weights for the selected token, per layer shown."""
    if result is None or not result.tokens:
        return "<p>No routing yet.</p>"
    t = max(0, min(selected, len(result.tokens) - 1))
    tok = result.tokens[t]
    parts = [f'<div class="detail"><div class="tokhead">Token {t} of {len(result.tokens)}: '
             f'<code class="tok">{visible(tok.text)}</code> <span class="muted">id {tok.id}, '
             f'characters {tok.start}\u2013{tok.end}</span></div>']
    for li in layers:
        r = result.routings[li]
        N = r.n_experts
        probs = r.probs[t].tolist()
        logits = r.logits[t].tolist()
        order = sorted(range(N), key=lambda e: (-probs[e], e))[: min(N, 6)]
        used = {e: w for e, w in zip(r.indices[t].tolist(), r.weights[t].tolist()) if e >= 0}
        dropped = set(r.dropped[t].nonzero().flatten().tolist())
        rows = []
        for e in order:
            status = ("used, weight " + f"{used[e]:.3f}") if e in used else ("DROPPED (expert full)" if e in dropped else "")
            bar = f'<span class="pbar" style="width:{max(probs[e], 0) * 100:.1f}%"></span>'
            rows.append(f"<tr><td>{chip(e, N)}</td><td class='num'>{logits[e]:+.2f}</td>"
                        f"<td class='num'>{probs[e]:.3f}</td><td class='barcell'>{bar}</td><td>{status}</td></tr>")
        score = "sigmoid score" if r.scheme == "deepseek" else "probability"
        parts.append(f"<div class='layer'><b>Layer {li}</b> <table class='mini'><thead><tr><th>expert</th>"
                     f"<th>logit</th><th>{score}</th><th></th><th>decision</th></tr></thead>"
                     f"<tbody>{''.join(rows)}</tbody></table></div>")
    parts.append("</div>")
    return "".join(parts)


def balance_table(result, layers: list[int]) -> str:
    """The balance metrics per layer, each name carrying its one-line definition."""
    if result is None:
        return ""
    metrics = {li: balance_metrics(result.routings[li]) for li in layers}
    head = "".join(f"<th>Layer {li}</th>" for li in layers)
    rows = []
    for key, (label, definition) in METRICS.items():
        cells = []
        for li in layers:
            v = metrics[li][key]
            if key in ("drop_rate", "top1_max_share"):
                txt = f"{v:.1%}"
            elif isinstance(v, int):
                txt = str(v)
            else:
                txt = f"{v:.3f}"
            cells.append(f"<td class='num'>{txt}</td>")
        rows.append(f"<tr><th scope='row'><abbr title='{esc(definition, quote=True)}' tabindex='0'>{esc(label)}</abbr>"
                    f"<span class='def'>{esc(definition)}</span></th>{''.join(cells)}</tr>")
    return (f"<table class='metrics'><thead><tr><th>metric (hover or focus for its definition)</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>" + coverage_html(result))


def coverage_html(result, width: int = 240, height: int = 48) -> str:
    """The expert-coverage curve of the text as a small inline SVG (numbers only), with its definition."""
    curve = coverage_curve(result.routings)
    pairs = len(result.routings) * result.routings[0].n_experts
    T = len(curve)
    pts = " ".join(f"{width * t / max(T - 1, 1):.1f},{height - height * c / pairs:.1f}" for t, c in enumerate(curve))
    full = next((t + 1 for t, c in enumerate(curve) if c == pairs), None)
    said = (f"all {pairs} used after {full:,} of {T:,} tokens" if full else
            f"{curve[-1]} of {pairs} used after {T:,} tokens; {pairs - curve[-1]} never")
    label, definition = COVERAGE
    return (f"<div class='coverage'><abbr title='{esc(definition, quote=True)}' tabindex='0'>{esc(label)}</abbr>: "
            f"(layer, expert) pairs that processed a token, {esc(said)}.<br>"
            f"<svg width='{width}' height='{height}' role='img' aria-label='{esc(label)}: {esc(said)}'>"
            f"<line x1='0' y1='1' x2='{width}' y2='1' stroke='#9ca3af' stroke-dasharray='3 3'/>"
            f"<polyline points='{pts}' fill='none' stroke='#0b3d6e' stroke-width='2'/></svg></div>")


def counters(result, config) -> str:
    """Total vs active parameters of the loaded module under the current routing."""
    if result is None:
        return ""
    p = result.params
    dense_compute = p.total / p.active_per_token
    k_text = (f"k = {result.top_k}" if result.top_k else
              f"{p.experts_per_token:g} expert(s) per token on average")
    cards = [
        ("Total parameters", f"{p.total:,}", f"all {config.n_experts} experts per layer must sit in memory"),
        ("Active per token", f"{p.active_per_token:,}", f"what one token computes with ({k_text})"),
        ("Total / active", f"{p.ratio:.2f}\u00d7", "stored weights per weight a token uses"),
        ("Active share", f"{p.active_share:.1%}", "of the model touches each token"),
    ]
    html_cards = "".join(f"<div class='stat'><div class='label'>{a}</div><div class='big'>{b}</div>"
                         f"<div class='muted'>{c}</div></div>" for a, b, c in cards)
    parts = []
    for part, total in p.by_part.items():
        if total:
            active = p.active_by_part[part]
            parts.append(f"<tr><td>{part.replace('_', ' ')}</td><td class='num'>{total:,}</td>"
                         f"<td class='num'>{active:,}</td></tr>")
    dense = (f"<p class='dense'>A dense model with the same compute per token would have "
             f"<b>{p.active_per_token:,}</b> parameters. A dense model as large in memory as this MoE "
             f"(<b>{p.total:,}</b>) would spend <b>{dense_compute:.2f}\u00d7</b> the compute on every token. "
             f"Raise k and the active count grows; raise N and the total grows while the active count "
             f"moves only by the router's few extra weights.</p>")
    return (f"<div class='stats'>{html_cards}</div>{dense}<table class='mini parts'><thead><tr><th>part</th>"
            f"<th>total</th><th>active / token</th></tr></thead><tbody>{''.join(parts)}</tbody></table>"
            f"<p class='muted'>Counted from the loaded PyTorch module (moe_core.model.params). The input embedding "
            f"is tied to the output head, so it is counted once and as active.</p>")


@lru_cache(maxsize=1)
def published_rows() -> list[dict]:
    rows = []
    for name in published_models():
        c = compute(name)
        rows.append({"model": c.label, "key": name, "total": c.total, "active": c.active_per_token,
                     "published_total": c.published_total, "published_active_per_token": c.published_active_per_token,
                     "n_experts": c.n_experts, "top_k": c.top_k, "n_shared": c.n_shared,
                     "bf16_gb": memory_bytes(c.total, "bf16") / 1e9, "source": c.source.split(" ; ")[0],
                     "sources": c.source.split(" ; ")})
    return rows


def published_table() -> str:
    rows = []
    for r in published_rows():
        share = r["active"] / r["total"]
        pub = (f"{human(r['published_total'])} / {human(r['published_active_per_token'])}" if r["published_active_per_token"]
               else f"{human(r['published_total'])} / not published")
        links = " ".join(f"<a href='{esc(u, quote=True)}' target='_blank' rel='noopener'>[{i + 1}]</a>"
                         for i, u in enumerate(r["sources"]) if u.startswith("http"))
        rows.append(f"<tr><td>{esc(r['model'])}</td><td class='num'>{r['n_experts']} \u2192 top-{r['top_k']}"
                    f"{' +' + str(r['n_shared']) + ' shared' if r['n_shared'] else ''}</td>"
                    f"<td class='num'>{human(r['total'])}</td><td class='num'>{human(r['active'])}</td>"
                    f"<td class='num'>{share:.1%}</td><td class='num'>{r['bf16_gb']:,.0f} GB</td>"
                    f"<td class='num'>{pub}</td><td>{links}</td></tr>")
    return ("<table class='mini published'><thead><tr><th>model</th><th>experts</th><th>total</th><th>active</th>"
            "<th>active share</th><th>weights in bf16</th><th>published (total / active)</th><th>sources</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table><p class='muted'>Computed by moe_core.model.published from "
            "each model's hyper-parameters (config files and papers), next to the figures their authors "
            "published. Memory is for the weights alone: no KV cache, activations or optimizer state.</p>")


@lru_cache(maxsize=32)
def explainer_markdown(topic: str) -> str:
    path = ASSETS / "explainers" / f"{topic}.md"
    if not re.fullmatch(r"[a-z_]+", topic) or not path.is_file():
        return f"*No explainer for {esc(topic)} yet.*"
    return path.read_text(encoding="utf-8")


def explainer_parts(topic: str) -> list[tuple[str, str]]:
    """The explainer cut into ("markdown", text) and ("math", tex) parts: every $$ ... $$ block (on lines of
    its own, tests/test_explainers.py) becomes a formula. Panel's Markdown pane leaves $$ blocks to MathJax,
    a 1.8 MB script the page does not load; KaTeX, already on the page, draws them (pn.pane.LaTeX)."""
    parts: list[tuple[str, str]] = []
    for i, chunk in enumerate(re.split(r"^\$\$\s*$", explainer_markdown(topic), flags=re.M)):
        if chunk.strip():
            parts.append(("math" if i % 2 else "markdown", chunk.strip()))
    return parts



def right_now(result, layers: list[int], model_info: dict) -> str:
    """What the plots show at this moment, computed from the result (Markdown, no user text)."""
    from moe_core.analysis.metrics import balance_metrics

    if result is None:
        return ""
    r0 = result.routings
    lines = []
    for li in layers:
        m = balance_metrics(r0[li])
        N = r0[li].n_experts
        line = (f"- Layer {li}: the busiest expert takes {m['max_over_mean']:.2f}\u00d7 its fair share; "
                f"{m['n_eff']:.1f} of {N} experts effectively in use")
        if r0[li].capacity is not None:
            line += f"; capacity {r0[li].capacity} tokens per expert, {m['drop_rate']:.1%} of choices dropped"
        if m["dead_experts"]:
            line += f"; {m['dead_experts']} expert(s) got no token"
        lines.append(line + ".")
    if result.loss is not None:
        lines.append(f"- Next-token loss on this text: **{result.loss:.3f} nats** "
                     f"(perplexity {math.exp(min(result.loss, 50)):.1f}) under {SCHEMES[result.scheme].label}"
                     + (f", k = {result.top_k}" if result.top_k else "") + ".")
    lines.append(f"- Model: {model_info['name']} ({model_info['balancing']}).")
    return "**Right now, on your text:**\n\n" + "\n".join(lines)
