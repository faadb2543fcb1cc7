"""HTML for the router walkthrough (one token, one layer, every number) and the routing table.

The routing table is the accessible alternative to the heatmap: the same
numbers as text, readable by a screen reader and by anyone who cannot tell the
colours apart. Pure functions returning escaped HTML, tested without a browser.
"""
from __future__ import annotations

from .panels import chip, esc, visible

MAX_TABLE_TOKENS = 400   # rows in the table view; longer texts say how many are left out


def _num(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if x < 0 else f"{x:.{digits}f}"


def walkthrough_html(d: dict) -> str:
    """The walkthrough dict of `moe_core.analysis.explain.router_walkthrough` as a step-by-step panel."""
    n = d["n_experts"]
    chosen = set(d["experts"])
    score = {"softmax": "softmax over all experts", "sigmoid": "sigmoid per expert (DeepSeek-V3)",
             "none": "none: this scheme ignores the router's logits; the score column shows the fixed weights "
                     "1/k of the chosen experts"}[d["score"]]
    k_txt = f"k = {d['top_k']}" if d["top_k"] else "the scheme's rule"
    if d["scheme"] == "hash":
        k_txt = f"a fixed hash of the token id (k = {d['top_k']})"
    elif d["scheme"] == "random":
        k_txt = f"a random draw (k = {d['top_k']})"
    rows = []
    for e in range(n):
        p = d["probs"][e]
        mark = "\u2713 chosen" if e in chosen else ("dropped (full)" if e in d["dropped"] else "")
        w = d["weights"][d["experts"].index(e)] if e in chosen else None
        rows.append(
            f"<tr class='{'hit' if e in chosen else ''}'><td>{chip(e, n)}</td><td class='num'>{_num(d['logits'][e])}</td>"
            f"<td class='num'>{p:.3f}</td><td class='barcell'><span class='pbar' style='width:{max(p, 0) * 90:.0f}px'>"
            f"</span></td><td>{mark}</td><td class='num'>{'' if w is None else f'{w:.3f}'}</td></tr>")
    parts = d["parts"]
    formula = " + ".join(f"{p['weight']:.3f} \u00b7 E<sub>{p['expert']}</sub>(h)" for p in parts) or "0 (no expert)"
    if d["shared"] is not None:
        formula += " + shared(h)"
    dims = range(d["show_dims"])
    head = "".join(f"<th class='num'>y[{i}]</th>" for i in dims)
    vec_rows = "".join(
        f"<tr><td>{p['weight']:.3f} \u00b7 E<sub>{p['expert']}</sub>(h)</td>"
        + "".join(f"<td class='num'>{_num(v)}</td>" for v in p["weighted"]) + "</tr>" for p in parts)
    if d["shared"] is not None:
        vec_rows += "<tr><td>shared(h)</td>" + "".join(f"<td class='num'>{_num(v)}</td>" for v in d["shared"]) + "</tr>"
    vec_rows += ("<tr class='sum'><td>sum, by hand</td>" + "".join(f"<td class='num'>{_num(v)}</td>" for v in d["output"])
                 + "</tr><tr><td>the layer's real output</td>"
                 + "".join(f"<td class='num'>{_num(v)}</td>" for v in d["layer_output"]) + "</tr>")
    renorm = ""
    if d["scheme"] in ("softmax_topk", "deepseek", "gshard") and parts:
        renorm = (f"<li><b>Renormalise</b>: the chosen experts held {d['chosen_prob_sum']:.3f} of the "
                  f"{'probability' if d['score'] == 'softmax' else 'score'}; their weights are rescaled to sum to "
                  f"{sum(d['weights']):.3f}.</li>")
    return (
        f"<div class='walk'><div class='tokhead'>Token <code class='tok'>{visible(d['token_text'])}</code> "
        f"(#{d['token']}) in layer {d['layer']}, scheme <b>{esc(d['scheme'])}</b></div><ol>"
        f"<li><b>Logits</b>: the router multiplies the token's hidden state h ({d['d_model']} numbers) by W<sub>r</sub>, "
        f"one score per expert.</li><li><b>Scores</b>: {score}.</li>"
        f"<li><b>Choose</b>: {k_txt} picks experts {', '.join(map(str, d['chosen'])) or 'none'}"
        + (f"; dropped by capacity: {', '.join(map(str, d['dropped']))}" if d["dropped"] else "") + ".</li>"
        + renorm
        + f"<li><b>Mix</b>: y = {formula}.</li></ol>"
        "<table class='mini walk-table'><caption>Router numbers for this token</caption><thead><tr><th>expert</th>"
        "<th class='num'>logit</th><th class='num'>score</th><th></th><th>choice</th><th class='num'>weight</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"<table class='mini walk-table'><caption>The first {d['show_dims']} of {d['d_model']} output numbers"
        f"</caption><thead><tr><th></th>{head}</tr></thead><tbody>{vec_rows}</tbody></table>"
        f"<div class='muted'>Hand-computed sum vs the layer's output: largest difference "
        f"{d['max_abs_diff']:.1e} (float rounding). Every number comes from the loaded model.</div></div>"
    )


def routing_table_html(result, layers: list[int]) -> str:
    """Token x layer table of experts and weights: the heatmap's numbers as text."""
    if result is None:
        return ""
    n = result.routings[0].n_experts
    shown = result.tokens[:MAX_TABLE_TOKENS]
    head = "".join(f"<th scope='col'>layer {li}</th>" for li in layers)
    body = []
    per_layer = []
    for li in layers:
        r = result.routings[li]
        per_layer.append((r.indices.tolist(), r.weights.tolist(), r.dropped))
    for t, tok in enumerate(shown):
        cells = []
        for idx, w, dropped in per_layer:
            parts = [f"{chip(e, n)} {wt:.2f}" for e, wt in zip(idx[t], w[t]) if e >= 0]
            drops = [str(e) for e in dropped[t].nonzero().flatten().tolist()]
            cell = " ".join(parts) or "no expert"
            if drops:
                cell += f" <span class='muted'>dropped: {', '.join(drops)}</span>"
            cells.append(f"<td>{cell}</td>")
        body.append(f"<tr><th scope='row' class='num'>{t}</th><td><code class='tok'>{visible(tok.text)}</code></td>"
                    + "".join(cells) + "</tr>")
    more = len(result.tokens) - len(shown)
    note = f"<div class='muted'>{more:,} more tokens not listed.</div>" if more > 0 else ""
    return (f"<div class='routing-table'><table class='mini'><caption>Experts and combine weights per token "
            f"(the heatmap as a table)</caption><thead><tr><th scope='col'>#</th><th scope='col'>token</th>{head}"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table>{note}</div>")


__all__ = ["walkthrough_html", "routing_table_html"]
