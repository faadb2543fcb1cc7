"""Watch it write: the model continues a prompt token by token, and every token shows its experts.

    for tok in generate(model, "The cat", max_new_tokens=50):   # a generator: stop whenever you like
        print(tok.phase, tok.text, tok.experts)

Prefill, then decode, as every LLM server does. The prompt's tokens go through the model in ONE pass
(the prefill); they come out first, with phase "prefill". Then each new token is picked from the last
position's logits (greedy, or sampled with a temperature and a seed), run through the model alone
(the decode step) and yielded with phase "decode". A KV cache (`MoEGPT.kv_cache()`, kept in each
attention layer) holds the keys and values of every earlier position, so a decode step computes one
position, not the whole sequence again; `use_cache=False` recomputes the whole sequence at every step
(the reference the tests compare with: same tokens, same routing).

Which routing a token carries: the experts that processed THAT token, per layer, with their weights
(the Routing record of the pass that ran it). So a new token is yielded after its own decode step;
the routing that chose it is the one of the position before it.

Routing groups: in this project all tokens of one call form one routing group (capacity and Expert
Choice compete across them). A decode step routes its token alone, a group of one, where Switch,
GShard, Expert Choice and BASE would route differently than over the whole text (with one token,
capacity never binds; Expert Choice and BASE would give the token to experts by the group's rule, not
the trained one). Generation is therefore restricted to the schemes where a token's routing does not
depend on its group: softmax top-k, noisy top-k (evaluation mode: no noise) and DeepSeek; the others
raise ValueError (route the same model with `softmax_topk`, k = 1 for a Switch model, to generate).

Context: the model's context is `block_size` (256) tokens and the window does not slide. The prompt
and the new tokens together must fit in it (max_new_tokens <= block_size - prompt tokens); a longer
request is refused before any work, so a generation that starts always finishes.

The end-of-text token (`<|endoftext|>`, id 0) is generated like any other token; a caller that wants
to stop there stops iterating.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from .data.tokenizer import get_tokenizer
from .model.checkpoint import LoadedModel
from .model.gpt import MoEGPT
from .model.request import RoutingRequest
from .model.routing import SCHEMES, Routing

# schemes whose routing of a token depends only on that token (not on the other tokens of its group): causal
# and without a capacity (Switch's capacity is causal, but counts the earlier tokens of the group)
PER_TOKEN_SCHEMES = tuple(name for name, s in SCHEMES.items() if s.causal and not s.uses_capacity)
MAX_SEED = 2**64 - 1


@dataclass
class GeneratedToken:
    position: int                 # index in the sequence (the prompt's tokens are 0 .. P-1)
    id: int                       # token id
    text: str                     # the token as text (bytes of a partial character show as \\xNN)
    phase: str                    # "prefill" (a prompt token) or "decode" (a generated token)
    experts: list[list[int]]      # per layer: the experts that processed this token, in rank order
    weights: list[list[float]]    # per layer: their combine weights

    def as_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = [[round(w, 6) for w in ws] for ws in self.weights]
        return d


def check_request(net: MoEGPT, request: RoutingRequest | None) -> RoutingRequest:
    """The request generation routes with (the model's own by default), if its scheme routes each token
    on its own; ValueError otherwise (see the module docstring)."""
    if request is None:
        request = RoutingRequest.make(net.config)
    if not isinstance(request, RoutingRequest):
        raise ValueError(f"request must be a RoutingRequest (or None), got {type(request).__name__}")
    if request.scheme not in PER_TOKEN_SCHEMES:
        raise ValueError(f"generation routes each new token alone, so it needs a scheme where a token's routing "
                         f"does not depend on the other tokens: {', '.join(PER_TOKEN_SCHEMES)}; {request.scheme} "
                         f"routes a group (capacity or balanced assignment). Choose one of those schemes "
                         f"(softmax_topk with top-k 1 for a Switch model)")
    if request.scheme == "noisy_topk" and net.training:
        raise ValueError("noisy top-k adds noise in training mode: call model.eval() before generating")
    return request


def prompt_ids(prompt, net: MoEGPT, tokenizer) -> list[int]:
    """The prompt's token ids: a non-empty string (tokenised) or a list of ids, at most block_size - 1 long."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty: give the model some text to continue")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = list(prompt)
    else:
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    V, ctx = net.config.vocab_size, net.config.block_size
    if not ids:
        raise ValueError("the prompt has no tokens: give the model some text to continue")
    if len(ids) >= ctx:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {ctx} tokens and at least one "
                         f"must be left to write: give at most {ctx - 1}")
    if not all(0 <= i < V for i in ids):
        raise ValueError(f"prompt token ids must be from 0 to {V - 1}")
    return ids


def generate(model: MoEGPT | LoadedModel, prompt: str | list[int], *, max_new_tokens: int,
             temperature: float = 0.0, seed: int | None = None, request: RoutingRequest | None = None,
             use_cache: bool = True, tokenizer=None) -> Iterator[GeneratedToken]:
    """Yield the prompt's tokens (phase "prefill"), then `max_new_tokens` new ones (phase "decode"),
    each with its routing (see the module docstring).

    temperature 0 is greedy (the most probable token; ties go to the lowest id), deterministic. Above 0
    the next token is sampled from softmax(logits / temperature) with a torch.Generator seeded by `seed`
    (same seed, same tokens; None: a fresh random seed). `request` routes another way than the model was
    trained (RoutingRequest.make(model.config, ...)); its scheme must route each token on its own.
    Every argument is checked before any work; bad values raise ValueError.
    """
    net = model.model if isinstance(model, LoadedModel) else model
    if not isinstance(net, MoEGPT):
        raise ValueError(f"model must be a MoEGPT or a loaded checkpoint, got {type(model).__name__}")
    tokenizer = tokenizer or get_tokenizer()
    if net.config.vocab_size > tokenizer.vocab_size:
        raise ValueError(f"the model has {net.config.vocab_size} token ids but the tokenizer only {tokenizer.vocab_size}")
    request = check_request(net, request)
    ids = prompt_ids(prompt, net, tokenizer)
    room = net.config.block_size - len(ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= room:
        raise ValueError(f"max_new_tokens must be a whole number from 1 to {room} (the context is "
                         f"{net.config.block_size} tokens and the prompt has {len(ids)}), got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}")
    device = net.wte.weight.device
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return _run(net, ids, max_new_tokens, float(temperature), gen, request, use_cache, tokenizer)


@torch.inference_mode()     # on a generator, torch enters the mode for each step only, not while the caller runs
def _run(net, ids, max_new_tokens, temperature, gen, request, use_cache, tokenizer) -> Iterator[GeneratedToken]:
    # a generator of its own, so that `generate` checks its arguments when it is called, not at the first next()
    cache = net.kv_cache() if use_cache else None
    seq = torch.tensor([ids], device=net.wte.weight.device)                 # (1, P)
    out = net(seq, request=request, cache=cache)                            # prefill: the prompt, one pass
    for pos, (experts, weights) in enumerate(_per_token(out.routings)):
        yield GeneratedToken(pos, ids[pos], tokenizer.token_str(ids[pos]), "prefill", experts, weights)
    for _ in range(max_new_tokens):
        nxt = _pick(out.logits[0, -1], temperature, gen).view(1, 1)         # (1, 1)
        seq = torch.cat([seq, nxt], dim=1)                                  # (1, T + 1)
        # decode: with the cache only the new token runs; without, the whole sequence again
        out = net(nxt if use_cache else seq, request=request, cache=cache)
        experts, weights = _per_token(out.routings, last=True)[0]
        tid = int(nxt)
        yield GeneratedToken(seq.size(1) - 1, tid, tokenizer.token_str(tid), "decode", experts, weights)


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """The next token id (a 0-dim long tensor) from one position's logits [vocab]."""
    if temperature == 0:
        return torch.argmax(logits)                             # the first maximum: ties go to the lowest id
    # float64 (a temperature like 1e-300 is 0 in float32), max subtracted first: values <= 0, the largest
    # exactly 0, so no overflow and no NaN for any finite temperature > 0
    scaled = (logits.double() - logits.max()) / temperature
    return torch.multinomial(scaled.softmax(-1), 1, generator=gen)[0]


def _per_token(routings: list[Routing], last: bool = False) -> list[tuple[list[list[int]], list[list[float]]]]:
    """[(experts per layer, weights per layer)] for each routed token (only the last with `last`)."""
    rows = slice(-1, None) if last else slice(None)
    layers = [(r.indices[rows].tolist(), r.weights[rows].tolist()) for r in routings]
    out = []
    for t in range(len(layers[0][0])):
        experts = [[e for e in idx[t] if e >= 0] for idx, _ in layers]
        weights = [[w for w, e in zip(ws[t], idx[t]) if e >= 0] for idx, ws in layers]
        out.append((experts, weights))
    return out
