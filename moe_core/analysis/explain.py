"""One token through one MoE layer, step by step, with the model's real numbers.

`router_walkthrough` runs the text through the model once (the same call as
`inference.route_text`), captures what the chosen MoE layer received and gave
back for ONE token, and recomputes that token's output by hand:

    logits  l = W_r h                   (router, one score per expert)
    probs   p = softmax(l)              (or sigmoid for DeepSeek-V3; none for hash and random routing)
    choose  the scheme picks experts    (top-k, capacity, expert choice, ...)
    weights g_e: top-k probs, renormalised to sum to 1 when the scheme does
    output  y = sum_e g_e * E_e(h)      (+ shared experts, if the model has them)

and checks that the hand-computed y equals what the layer really produced
(`max_abs_diff`). The chosen experts and weights are read from the layer's own
Routing, so the walkthrough is exact for every scheme, not just softmax top-k.
"""
from __future__ import annotations

import torch

from ..inference import route_ids, tokenize
from ..model.checkpoint import LoadedModel
from ..model.request import RoutingRequest, resolve

SHOW_DIMS = 6  # output dimensions printed in the walkthrough (d_model is 128: a few are enough)


@torch.no_grad()
def router_walkthrough(model: LoadedModel, text: str, token: int, layer: int, request: RoutingRequest | None = None,
                       *, scheme: str | None = None, top_k: int | None = None, capacity_factor: float | None = None,
                       max_tokens: int = 4096) -> dict:
    """Every intermediate number of one token's trip through MoE layer `layer` (see module doc)."""

    cfg = model.config
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cfg.n_layer:
        raise ValueError(f"layer must be between 0 and {cfg.n_layer - 1}, got {layer!r}")
    request = resolve(cfg, request, scheme=scheme, top_k=top_k, capacity_factor=capacity_factor)
    scheme = request.scheme
    tokens, _ = tokenize(text, max_tokens=max_tokens, truncate=True)
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < len(tokens):
        raise ValueError(f"token must be between 0 and {len(tokens) - 1}, got {token!r}")

    net = model.model
    moe = net.blocks[layer].moe
    seen = {}

    def hook(module, args, output):
        seen["h"], (seen["y"], seen["routing"]) = args[0], output

    handle = moe.register_forward_hook(hook)
    try:
        route_ids(net, [t.id for t in tokens], request)
    finally:
        handle.remove()

    h = seen["h"][token].float()                          # (C,) the layer's input for this token
    routing = seen["routing"]
    logits = moe.router(h[None])[0]                       # (N,)
    probs = routing.probs[token].float()                  # the scheme's scores (softmax or sigmoid)
    idx = [int(e) for e in routing.indices[token].tolist() if e >= 0]
    w = [float(routing.weights[token, j]) for j, e in enumerate(routing.indices[token].tolist()) if e >= 0]
    chosen = [int(e) for e in routing.choices[token].tolist() if e >= 0]
    dropped = [e for e in chosen if bool(routing.dropped[token, e])]

    parts = []
    y_hand = torch.zeros_like(h)
    for e, g in zip(idx, w):
        out = moe.experts.expert(e, h[None].to(moe.experts.w_in.dtype))[0].float()
        y_hand += g * out
        parts.append({"expert": e, "weight": g, "prob": float(probs[e]), "output": out[:SHOW_DIMS].tolist(),
                      "weighted": (g * out)[:SHOW_DIMS].tolist(), "output_norm": float(out.norm())})
    shared = None
    if moe.shared is not None:
        s = moe.shared(h[None].to(moe.experts.w_in.dtype))[0].float()
        y_hand += s
        shared = s[:SHOW_DIMS].tolist()
    y_real = seen["y"][token].float()
    chosen_probs = [float(probs[e]) for e in idx]
    return {
        "token": token, "token_text": tokens[token].text, "layer": layer, "scheme": scheme,
        "top_k": request.top_k, "n_experts": cfg.n_experts,
        "logits": logits.tolist(), "probs": probs.tolist(),
        "score": {"deepseek": "sigmoid", "hash": "none", "random": "none"}.get(scheme, "softmax"),
        "chosen": chosen, "dropped": dropped, "experts": idx, "weights": w,
        "chosen_prob_sum": sum(chosen_probs),
        "parts": parts, "shared": shared,
        "output": y_hand[:SHOW_DIMS].tolist(), "layer_output": y_real[:SHOW_DIMS].tolist(),
        "max_abs_diff": float((y_hand - y_real).abs().max()),
        "d_model": cfg.d_model, "show_dims": SHOW_DIMS,
    }


__all__ = ["router_walkthrough"]
