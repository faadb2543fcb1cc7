"""Route a user's text through a trained model: the one function the CLI and the app share.

The text is tokenised (every token keeps its character span in the text), cut
into windows of the model's context length (256 tokens; each window attends
only within itself), and run through the model once. All tokens of the text
form ONE routing group, so capacity and Expert Choice compete across the whole
text, exactly as the dashboard shows. The loss is the model's mean next-token
cross-entropy on the text under the chosen routing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import LoadedModel
from .metrics import balance_metrics
from .params import ParamReport, count_params
from .routing import Routing, get_scheme

MAX_TOKENS = 4096  # longest text routed in one request (16 windows of 256 tokens)


def route_overrides(config, scheme: str | None = None, top_k: int | None = None,
                    capacity_factor: float | None = None) -> tuple[str, dict]:
    """Validate a routing request against a model config; return (scheme, forward kwargs)."""
    scheme = scheme or config.scheme
    s = get_scheme(scheme)
    kwargs: dict = {"scheme": scheme}
    if s.uses_k:
        k = config.top_k if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.n_experts:
            raise ValueError(f"top-k must be between 1 and N = {config.n_experts} (the model's experts), got {k!r}")
        kwargs["top_k"] = k
    elif top_k is not None and top_k != s.fixed_k:
        what = f"always uses {s.fixed_k} expert(s) per token" if s.fixed_k else "has no top-k (experts choose tokens)"
        raise ValueError(f"{s.label} {what}; top-k = {top_k} does not apply")
    if s.uses_capacity:
        cf = capacity_factor
        if cf is None:
            cf = config.capacity_factor if scheme == config.scheme and config.capacity_factor else s.default_capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not 0 < cf <= 64:
            raise ValueError(f"capacity factor must be a number in (0, 64], got {cf!r}")
        kwargs["capacity_factor"] = float(cf)
    elif capacity_factor is not None:
        raise ValueError(f"{s.label} has no capacity; the capacity factor does not apply")
    return scheme, kwargs


@dataclass
class RouteResult:
    tokens: list                # tokenizer Tokens (id, text, start, end), spans into `text`
    routings: list[Routing]     # one per layer, detached, on CPU
    loss: float | None          # mean next-token cross-entropy (nats); None for a 1-token text
    scheme: str
    top_k: int | None           # experts per token for top-k schemes
    capacity_factor: float | None
    truncated: bool             # text was longer than MAX_TOKENS and was cut
    n_tokens_in_text: int       # tokens before truncation
    params: ParamReport

    def layer_dict(self, i: int) -> dict:
        r = self.routings[i]
        return {
            "layer": i,
            "experts": [[e for e in row if e >= 0] for row in r.indices.tolist()],
            "weights": [[round(w, 6) for w, e in zip(ws, es) if e >= 0]
                        for ws, es in zip(r.weights.tolist(), r.indices.tolist())],
            "dropped": [torch.nonzero(row).flatten().tolist() for row in r.dropped],
            "choices": [[e for e in row if e >= 0] for row in r.choices.tolist()],
            "probs": [[round(p, 6) for p in row] for row in r.probs.tolist()],
            "load": r.load.tolist(),
            "capacity": r.capacity,
            "metrics": balance_metrics(r),
        }

    def to_json(self, model: LoadedModel) -> dict:
        return {
            "model": model.info(),
            "scheme": self.scheme,
            "top_k": self.top_k,
            "capacity_factor": self.capacity_factor,
            "truncated": self.truncated,
            "tokens": [{"id": t.id, "text": t.text, "start": t.start, "end": t.end} for t in self.tokens],
            "layers": [self.layer_dict(i) for i in range(len(self.routings))],
            "params": {"total": self.params.total, "active_per_token": self.params.active_per_token,
                       "by_part": self.params.by_part, "active_by_part": self.params.active_by_part},
            "loss": self.loss,
        }


def windows(ids: list[int], block_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut ids into [W, width] windows; next-token targets (-1 = none) and a mask of real tokens.

    width = min(len(ids), block_size): a text shorter than the context is one window of
    exactly its length (causal attention gives its tokens the same values as in a padded
    window, without computing the padding: a 50-token text costs 50 positions, not 256).
    """
    n = len(ids)
    width = max(1, min(n, block_size))
    W = (n + width - 1) // width
    x = torch.zeros(W * width, dtype=torch.long)
    y = torch.full((W * width,), -1, dtype=torch.long)
    mask = torch.zeros(W * width, dtype=torch.bool)
    t = torch.tensor(ids, dtype=torch.long)
    x[:n], mask[:n] = t, True
    y[: n - 1] = t[1:]
    shape = (W, width)
    return x.view(shape).to(device), y.view(shape).to(device), mask.view(shape).to(device)


@torch.no_grad()
def route_ids(model, ids: list[int], **overrides) -> tuple[list[Routing], float | None]:
    """Run token ids through the model; return per-layer routing and the mean next-token loss."""
    device = next(model.parameters()).device
    x, y, mask = windows(ids, model.config.block_size, device)
    out = model(x, y if len(ids) > 1 else None, mask=mask, return_logits=False, **overrides)
    routings = [r.detach().apply(lambda t: t.cpu()) for r in out.routings]
    loss = out.ce_loss.item() if out.ce_loss is not None else None
    return routings, loss


def route_text(model: LoadedModel, text: str, *, scheme: str | None = None, top_k: int | None = None,
               capacity_factor: float | None = None, max_tokens: int = MAX_TOKENS,
               truncate: bool = False, tokenizer=None, disabled_experts: dict | None = None) -> RouteResult:
    """Tokenise `text` and route it through every layer of `model`.

    Over `max_tokens` tokens: ValueError, or with `truncate=True` the first
    `max_tokens` tokens are routed and `truncated` is set.
    `disabled_experts={layer: [experts]}` switches those experts off (an
    ablation; the router can never select them, see MoELayer.route).
    """
    from .tokenizer import get_tokenizer

    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not text:
        raise ValueError("the text is empty: type or paste something to route")
    scheme, overrides = route_overrides(model.config, scheme, top_k, capacity_factor)
    tok = tokenizer or get_tokenizer()
    tokens = tok.tokenize(text)
    n_total = len(tokens)
    truncated = n_total > max_tokens
    if truncated:
        if not truncate:
            raise ValueError(f"the text has {n_total} tokens; the limit is {max_tokens} tokens per request")
        tokens = tokens[:max_tokens]
    if disabled_experts:
        overrides["disabled_experts"] = disabled_experts
    routings, loss = route_ids(model.model, [t.id for t in tokens], **overrides)
    params = count_params(model.model, top_k=overrides.get("top_k"), scheme=scheme,
                          capacity_factor=overrides.get("capacity_factor"))
    return RouteResult(tokens, routings, loss, scheme, overrides.get("top_k"), overrides.get("capacity_factor"),
                       truncated, n_total, params)
