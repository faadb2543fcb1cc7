"""Expert profiles and expert ablation: what does each expert take, and what happens without it?

Experts in MoE language models specialise in surface, syntactic patterns that
the router learns (digits, whitespace and indentation, punctuation, word
pieces, code keywords, a writing system), not in human subjects: there is no
"maths expert" or "biology expert" (Mixtral of Experts, Jiang et al. 2024,
arXiv:2401.04088, section 5; OLMoE, Muennighoff et al. 2024,
arXiv:2409.02060, section 5). A profile lets a student check that on our own
model: for every layer and expert, the tokens the router sends to it most
often, and its mix of fine token categories (moe_core.data.categories) next
to the corpus's own mix, so an over-represented category stands out ("digit 71% (corpus 6%)").

Profiles are computed from the real model on a fixed slice of the held-out
(eval) corpus split: `n_tokens` tokens in evenly spaced windows of the model's
context length (the same windows for every model, so profiles compare), routed
as one routing group with the routing the model was trained with. They are
cached as JSON in assets/profiles/NAME.json (`python -m moe_core.analysis.profiles
--all`), together with a fingerprint of the weights, the training steps and a
hash of the token slice: `load_profiles` uses the cache only when all of them
match, and otherwise computes the profile now and says so (`source`).

`ablate` switches one expert off (the router can never select it; see
`MoELayer.route(disabled_experts=...)`, the weights are never touched) and
measures the next-token loss with and without it, and where the tokens that
used to pick it first go instead.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..data import corpus
from ..data.categories import CATEGORIES, token_category
from ..data.tokenizer import get_tokenizer
from ..inference import forward_windows, tokenize, windows
from ..model.checkpoint import ASSETS, list_checkpoints, load
from ..model.request import RoutingRequest
from .specialisation import nmi

PROFILE_DIR = ASSETS / "profiles"
FORMAT = "moe-router-lab/profiles/1"
PROFILE_TOKENS = 16384      # held-out tokens per profile: 64 windows of 256
ABLATION_TOKENS = 4096      # held-out tokens per ablation (16 windows): about a second on 2 CPU cores
MAX_ABLATION_TOKENS = 16384
TOP_TOKENS = 12             # most frequent first-choice tokens listed per expert
DISTINCTIVE_TOKENS = 8      # tokens most often sent to this expert (of those seen >= DISTINCTIVE_MIN times)
DISTINCTIVE_MIN = 5

@functools.lru_cache(maxsize=1)
def _vocab_tables() -> tuple[np.ndarray, list[str]]:
    """Category index of every vocabulary entry, and each entry's readable text (\\xNN for partial bytes)."""

    tok = get_tokenizer()
    cats = np.array([CATEGORIES.index(token_category("<|endoftext|>" if i == tok.eot_id else
                                                     tok.token_bytes(i).decode("utf-8", errors="replace")))
                     for i in range(tok.vocab_size)])
    return cats, [tok.token_str(i) for i in range(tok.vocab_size)]


# ----------------------------------------------------------------------------- the held-out slice


@functools.lru_cache(maxsize=1)
def heldout_ids() -> np.ndarray:
    """The eval split as token ids, documents separated by <|endoftext|> (as train.load_token_data does)."""

    tok = get_tokenizer()
    ids: list[int] = []
    for doc in corpus.load_documents("eval"):
        ids.extend(tok.encode(doc["text"]))
        ids.append(tok.eot_id)
    out = np.asarray(ids, dtype=np.int64)
    out.flags.writeable = False
    return out


def heldout_windows(n_tokens: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [W, block_size]: W = n_tokens // block_size evenly spaced held-out windows and their next tokens.

    Evenly spaced across the whole split (not its first n_tokens), so the slice
    holds prose, code, numbers and other scripts in about the corpus's proportions.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < block_size:
        raise ValueError(f"n_tokens must be a whole number of at least one window ({block_size} tokens), got {n_tokens!r}")
    data = heldout_ids()
    W = min(n_tokens // block_size, (len(data) - 1) // block_size)
    starts = np.linspace(0, len(data) - block_size - 1, W).astype(np.int64)
    x = np.stack([data[s : s + block_size] for s in starts])
    y = np.stack([data[s + 1 : s + 1 + block_size] for s in starts])
    return torch.from_numpy(x), torch.from_numpy(y)


def _sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a, dtype=np.int64)).tobytes()).hexdigest()[:16]


def model_fingerprint(net) -> str:
    """sha256 of the weights (float32, state-dict order): changes whenever any weight or buffer changes."""
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _unwrap(model):
    """(name, MoEGPT, card) from a LoadedModel or a bare MoEGPT."""
    if hasattr(model, "model") and hasattr(model, "config"):
        return model.name, model.model, model.card
    return getattr(model, "name", "unnamed"), model, {}


# ----------------------------------------------------------------------------- profiles


def _summary(shares: np.ndarray, base: np.ndarray, n_first: int) -> str:
    """One honest line: the over-represented categories with the corpus baseline next to them."""
    if n_first == 0:
        return "never a first choice on the held-out slice"
    lift = np.where(base > 0, shares / np.maximum(base, 1e-12), np.inf)
    picks = [i for i in np.argsort(-shares, kind="stable") if shares[i] >= 0.10 and lift[i] >= 1.5][:2]
    few = f"; only {n_first} token{'s' if n_first != 1 else ''}, too few to say much" if n_first < 100 else ""
    if not picks:
        i = int(np.argmax(shares))
        return f"no category stands out (largest: {CATEGORIES[i]} {shares[i]:.0%}, corpus {base[i]:.0%}){few}"
    return ", ".join(f"{CATEGORIES[i]} {shares[i]:.0%} (corpus {base[i]:.0%})" for i in picks) + few


@torch.no_grad()
def expert_profiles(model, *, n_tokens: int = PROFILE_TOKENS, scheme: str | None = None, top_k: int | None = None,
                    capacity_factor: float | None = None) -> dict:
    """Per layer and expert: its load, most frequent and most distinctive tokens, and category mix.

    The held-out slice (`heldout_windows`) is routed through `model` as one
    routing group. "first choice" = the router's top-ranked expert for a token
    (before any capacity drop); "all choices" = every expert the router picked
    (k per token for top-k schemes, so they add up to tokens x k); "processed"
    = tokens the expert really computed (after capacity). Token lists and
    category mixes are over first-choice tokens: the clearest view of what
    the router sends where. `share_of_token` = the share of that token's
    occurrences in the slice whose first choice is this expert.
    """

    name, net, card = _unwrap(model)
    cfg = net.config
    request = RoutingRequest.make(cfg, scheme, top_k, capacity_factor)
    t0 = time.perf_counter()
    x, y = heldout_windows(n_tokens, cfg.block_size)
    device = next(net.parameters()).device
    routings, heldout_loss = forward_windows(net, x.to(device), y.to(device), None, request)
    ids = x.reshape(-1).numpy()
    T = len(ids)
    cat_of, text_of = _vocab_tables()
    cats = cat_of[ids]
    C = len(CATEGORIES)
    base = np.bincount(cats, minlength=C) / T
    token_total = Counter(ids.tolist())
    layers = []
    for li, r in enumerate(routings):
        N = r.n_experts
        top1 = r.top1.numpy()
        chosen = r.choices.numpy()
        all_counts = np.bincount(chosen[chosen >= 0], minlength=N)
        processed = r.dispatch.sum(0).numpy()
        experts = []
        for e in range(N):
            sel = top1 == e
            n1 = int(sel.sum())
            shares = np.bincount(cats[sel], minlength=C) / max(n1, 1)
            mine = Counter(ids[sel].tolist())
            top = [[int(t), text_of[t], c, round(c / token_total[t], 4)] for t, c in mine.most_common(TOP_TOKENS)]
            distinct = sorted(((c / token_total[t], c, t) for t, c in mine.items() if token_total[t] >= DISTINCTIVE_MIN),
                              key=lambda v: (-v[0], -v[1], v[2]))[:DISTINCTIVE_TOKENS]
            experts.append({
                "expert": e,
                "first_choice": n1,
                "all_choices": int(all_counts[e]),
                "processed": int(processed[e]),
                "share_first": round(n1 / T, 4),
                "share_all": round(float(all_counts[e] / max(all_counts.sum(), 1)), 4),
                "categories": [round(float(v), 4) for v in shares],
                "top_tokens": top,
                "distinctive_tokens": [[int(t), text_of[t], c, round(s, 4)] for s, c, t in distinct],
                "summary": _summary(shares, base, n1),
            })
        valid = top1 >= 0      # Expert Choice may leave a token with no expert
        layers.append({"layer": li, "nmi_category": round(nmi(top1[valid], cats[valid]), 4), "experts": experts})
    return {
        "format": FORMAT,
        "model": name,
        "model_fingerprint": model_fingerprint(net),
        "steps": card.get("steps"),
        "n_layer": cfg.n_layer,
        "n_experts": cfg.n_experts,
        "route": request.as_dict(),
        "slice": {"split": "eval", "n_tokens": T, "windows": int(x.shape[0]), "block_size": cfg.block_size,
                  "sha256": _sha(x.numpy())},
        "heldout_loss": round(heldout_loss, 4),
        "categories": list(CATEGORIES),
        "corpus_categories": [round(float(v), 4) for v in base],
        "layers": layers,
        "wall_s": round(time.perf_counter() - t0, 2),
        "source": "computed now",
    }


def _cache_matches(doc: dict, net, card: dict, n_tokens: int) -> bool:
    cfg = net.config
    try:
        x, _ = heldout_windows(n_tokens, cfg.block_size)
        return (doc.get("format") == FORMAT and doc.get("steps") == card.get("steps")
                and doc.get("categories") == list(CATEGORIES)
                and doc.get("route") == RoutingRequest.make(cfg).as_dict()
                and doc.get("slice", {}).get("sha256") == _sha(x.numpy())
                and doc.get("model_fingerprint") == model_fingerprint(net))
    except (AttributeError, TypeError):
        return False


_computed: dict[tuple[str, str, int], dict] = {}


def cached_profiles(model, *, n_tokens: int = PROFILE_TOKENS, directory: Path | None = None) -> dict | None:
    """The profiles of `model` under its trained routing if they are already computed, else None (never computes).

    `source` says where they came from: "cache" (assets/profiles/NAME.json, checked against the
    weights' fingerprint, the training steps and the slice hash) or "computed now" (earlier in this
    process: kept in memory, never written over the shipped file).
    """
    name, net, card = _unwrap(model)
    path = Path(directory or PROFILE_DIR) / f"{name}.json"
    if path.is_file() and path.stat().st_size < 2 * 1024 * 1024:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            doc = None
        if isinstance(doc, dict) and _cache_matches(doc, net, card, n_tokens):
            return {**doc, "source": "cache"}
    return _computed.get((name, model_fingerprint(net), n_tokens))


def load_profiles(model, *, n_tokens: int = PROFILE_TOKENS, directory: Path | None = None) -> dict:
    """The profiles of `model` under its trained routing: `cached_profiles`, or computed now and kept."""
    doc = cached_profiles(model, n_tokens=n_tokens, directory=directory)
    if doc is not None:
        return doc
    name, net, _ = _unwrap(model)
    key = (name, model_fingerprint(net), n_tokens)
    if len(_computed) >= 32:            # lab models come and go: keep memory bounded
        _computed.pop(next(iter(_computed)))
    _computed[key] = expert_profiles(model, n_tokens=n_tokens)
    return _computed[key]


def save_profiles(doc: dict, directory: Path | None = None) -> Path:
    """Write a profile as compact JSON (atomic: temp file + rename)."""
    directory = Path(directory or PROFILE_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{doc['model']}.json"
    body = {k: v for k, v in doc.items() if k != "source"}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(body, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    os.chmod(tmp, 0o644)            # mkstemp makes 0600 files; the cache ships in the repository
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- ablation


def _check_index(what: str, v, n: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < n:
        raise ValueError(f"{what} {v!r} does not exist: {what}s are numbered 0 to {n - 1}")
    return int(v)


def _nanmean(t: torch.Tensor) -> float | None:
    t = t[~torch.isnan(t)]
    return round(t.mean().item(), 4) if t.numel() else None


def ablate(model, layer: int, expert: int, *, text: str | None = None, n_tokens: int = ABLATION_TOKENS,
           scheme: str | None = None, top_k: int | None = None, capacity_factor: float | None = None) -> dict:
    """Switch expert `expert` of layer `layer` off and measure what changes.

    On `text` (its first MAX_TOKENS tokens) or, without text, on `n_tokens`
    held-out tokens (evenly spaced windows; at most MAX_ABLATION_TOKENS). The
    model runs twice on the same tokens, with the expert on and off; switched
    off, the router can never select it (`disabled_experts`, see
    MoELayer.route: weights untouched). Returns the mean next-token loss both
    ways and on the tokens that had picked this expert first; `goes_to[e]` =
    how many of those tokens now pick expert e first at that layer (the layer's
    inputs are unchanged, so this is purely the router's next preference), plus
    `unrouted` for tokens no expert takes (Expert Choice); they add up to
    `first_choice_tokens`. `top1_changed_later` = share of tokens whose first
    choice changed in each later layer (the knock-on effect).
    """

    name, net, _ = _unwrap(model)
    cfg = net.config
    layer = _check_index("layer", layer, cfg.n_layer)
    expert = _check_index("expert", expert, cfg.n_experts)
    request = RoutingRequest.make(cfg, scheme, top_k, capacity_factor)
    switched_off = RoutingRequest.make(cfg, scheme, top_k, capacity_factor, disabled_experts={layer: [expert]})
    device = next(net.parameters()).device
    t0 = time.perf_counter()
    truncated = False
    if text is not None:
        tokens, n_total = tokenize(text, truncate=True)
        ids, truncated = [t.id for t in tokens], n_total > len(tokens)
        if len(ids) < 2:
            raise ValueError("the text has fewer than 2 tokens: there is no next token to measure a loss on")
        x, y, mask = windows(ids, cfg.block_size, device)
        source = "text"
    else:
        if isinstance(n_tokens, int) and n_tokens > MAX_ABLATION_TOKENS:
            raise ValueError(f"ablation is limited to {MAX_ABLATION_TOKENS} held-out tokens, got {n_tokens}")
        x, y = heldout_windows(n_tokens, cfg.block_size)
        x, y, mask = x.to(device), y.to(device), None
        source = "held-out"
    r_on, _, ce_on = forward_windows(net, x, y, mask, request, per_token_loss=True)
    r_off, _, ce_off = forward_windows(net, x, y, mask, switched_off, per_token_loss=True)
    first = r_on[layer].top1
    sel = first == expert
    moved = r_off[layer].top1[sel]
    goes_to = torch.bincount(moved[moved >= 0], minlength=cfg.n_experts).tolist()
    return {
        "model": name,
        "layer": layer,
        "expert": expert,
        "scheme": request.scheme,
        "route": request.as_dict(),
        "source": source,
        "n_tokens": int(first.numel()),
        "truncated": truncated,
        "loss_on": _nanmean(ce_on),
        "loss_off": _nanmean(ce_off),
        "delta": round(_nanmean(ce_off) - _nanmean(ce_on), 4),
        "first_choice_tokens": int(sel.sum()),
        "loss_on_expert_tokens": _nanmean(ce_on[sel]),
        "loss_off_expert_tokens": _nanmean(ce_off[sel]),
        "loss_on_other_tokens": _nanmean(ce_on[~sel]),
        "loss_off_other_tokens": _nanmean(ce_off[~sel]),
        "goes_to": goes_to,
        "unrouted": int((moved < 0).sum()),
        "load_on": r_on[layer].load.tolist(),
        "load_off": r_off[layer].load.tolist(),
        "top1_changed_later": [round((r_on[li].top1 != r_off[li].top1).float().mean().item(), 4)
                               for li in range(layer + 1, cfg.n_layer)],
        "wall_ms": round((time.perf_counter() - t0) * 1e3, 1),
    }


# ----------------------------------------------------------------------------- command line


def build(names: list[str] | None = None, directory: Path | None = None, *, log=print) -> list[Path]:
    """Compute and write the profiles of the named (default: all shipped) checkpoints."""

    names = names or [d["name"] for d in list_checkpoints()]
    paths = []
    for n in names:
        doc = expert_profiles(load(n))
        p = save_profiles(doc, directory)
        log(f"{n}: {p} ({p.stat().st_size / 1024:.0f} KB, {doc['wall_s']} s, held-out loss {doc['heldout_loss']})")
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:

    ap = argparse.ArgumentParser(prog="python -m moe_core.analysis.profiles",
                                 description="Build or check the cached expert profiles (assets/profiles).")
    ap.add_argument("names", nargs="*", help="checkpoint names (default with --all: every shipped checkpoint)")
    ap.add_argument("--all", action="store_true", help="every shipped checkpoint")
    ap.add_argument("--check", action="store_true", help="only check that the cached files match; exit 1 if not")
    args = ap.parse_args(argv)
    known = [d["name"] for d in list_checkpoints()]
    bad = [n for n in args.names if n not in known]
    if bad or not (args.names or args.all):
        msg = f"unknown model(s) {', '.join(bad)}" if bad else "name checkpoints or pass --all"
        print(f"error: {msg}; shipped: {', '.join(known)}", file=sys.stderr)
        return 2
    names = args.names or known
    if args.check:
        stale = [n for n in names if load_profiles(load(n))["source"] != "cache"]
        print("stale or missing: " + ", ".join(stale) if stale else f"all {len(names)} profile caches match")
        return 1 if stale else 0
    build(names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
