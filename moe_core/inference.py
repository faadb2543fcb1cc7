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
import torch.nn.functional as F

from .analysis.metrics import balance_metrics
from .data.tokenizer import get_tokenizer
from .model.checkpoint import LoadedModel
from .model.params import ParamReport, count_params
from .model.request import RoutingRequest, resolve
from .model.routing import Routing

MAX_TOKENS = 4096  # longest text routed in one request (16 windows of 256 tokens)


@dataclass
class RouteResult:
    tokens: list                # tokenizer Tokens (id, text, start, end), spans into `text`
    routings: list[Routing]     # one per layer, detached, on CPU
    loss: float | None          # mean next-token cross-entropy (nats); None for a 1-token text
    request: RoutingRequest     # how it was routed
    truncated: bool             # text was longer than MAX_TOKENS and was cut
    n_tokens_in_text: int       # tokens before truncation
    params: ParamReport

    @property
    def scheme(self) -> str:
        return self.request.scheme

    @property
    def top_k(self) -> int | None:
        """Experts per token for top-k schemes."""
        return self.request.top_k

    @property
    def capacity_factor(self) -> float | None:
        return self.request.capacity_factor

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


def tokenize(text: str, *, max_tokens: int = MAX_TOKENS, truncate: bool = False, tokenizer=None) -> tuple[list, int]:
    """The text's tokens (each with its character span) and how many it had before any cut.

    Over `max_tokens` tokens: ValueError, or with `truncate=True` the first `max_tokens` are kept."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not text:
        raise ValueError("the text is empty: type or paste something to route")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
    tokens = (tokenizer or get_tokenizer()).tokenize(text)
    n_total = len(tokens)
    if n_total > max_tokens:
        if not truncate:
            raise ValueError(f"the text has {n_total} tokens; the limit is {max_tokens} tokens per request")
        tokens = tokens[:max_tokens]
    return tokens, n_total


@torch.no_grad()
def forward_windows(net, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor | None,
                    request: RoutingRequest | None = None, *, per_token_loss: bool = False):
    """Run windows through the model: (per-layer routings on CPU, mean next-token loss or None, and with
    `per_token_loss` each routed token's loss in routing order, NaN where it has no next token)."""
    out = net(x, y, mask=mask, return_logits=per_token_loss, request=request)
    routings = [r.detach().apply(lambda t: t.cpu()) for r in out.routings]
    loss = out.ce_loss.item() if out.ce_loss is not None else None
    if not per_token_loss:
        return routings, loss
    logits = out.logits
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1).clamp(min=0), reduction="none")
    ce = torch.where(y.reshape(-1) >= 0, ce, torch.full_like(ce, float("nan")))
    if mask is not None:
        ce = ce[mask.reshape(-1)]
    return routings, loss, ce.cpu()


def route_ids(net, ids: list[int], request: RoutingRequest | None = None, *, per_token_loss: bool = False):
    """Token ids through the model as one routing group: (per-layer routings, mean next-token loss)."""
    x, y, mask = windows(ids, net.config.block_size, next(net.parameters()).device)
    return forward_windows(net, x, y if len(ids) > 1 else None, mask, request, per_token_loss=per_token_loss)


def route_text(model: LoadedModel, text: str, request: RoutingRequest | None = None, *, scheme: str | None = None,
               top_k: int | None = None, capacity_factor: float | None = None, disabled_experts: dict | None = None,
               max_tokens: int = MAX_TOKENS, truncate: bool = False, tokenizer=None) -> RouteResult:
    """Tokenise `text` and route it through every layer of `model`: the pipeline every view, the CLI,
    the quiz, the comparisons and the walkthrough use.

    `request` says how to route (RoutingRequest.make(model.config, ...)); without one, the keyword
    choices make it (`disabled_experts={layer: [experts]}` switches experts off, an ablation; the
    router can never select them, see MoELayer.route). Over `max_tokens` tokens: ValueError, or with
    `truncate=True` the first `max_tokens` tokens are routed and `truncated` is set.
    """
    request = resolve(model.config, request, scheme=scheme, top_k=top_k, capacity_factor=capacity_factor,
                      disabled_experts=disabled_experts)
    tokens, n_total = tokenize(text, max_tokens=max_tokens, truncate=truncate, tokenizer=tokenizer)
    routings, loss = route_ids(model.model, [t.id for t in tokens], request)
    return RouteResult(tokens, routings, loss, request, n_total > len(tokens), n_total, params_of(model, request))


def params_of(model: LoadedModel, request: RoutingRequest) -> ParamReport:
    return count_params(model.model, top_k=request.top_k, scheme=request.scheme,
                        capacity_factor=request.capacity_factor)


@torch.no_grad()
def evaluate(model, data, batches: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) on fixed held-out windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x, y = data.eval_windows(model.config.block_size, batches * batch_size)
    total, count = 0.0, 0
    for xs, ys in zip(x.split(batch_size), y.split(batch_size)):
        out = model(xs.to(device), ys.to(device), return_logits=False)
        total += out.ce_loss.item() * ys.numel()
        count += ys.numel()
    model.train(was_training)
    return total / max(count, 1)
