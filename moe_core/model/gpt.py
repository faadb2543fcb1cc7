"""A small decoder-only transformer whose feed-forward layers are Mixtures of Experts.

Read it like nanoGPT: token + position embeddings, n_layer blocks of
(RMSNorm -> causal self-attention -> residual, RMSNorm -> MoE -> residual),
a final norm and a language-model head tied to the token embedding.
`forward(idx, targets=None)` returns the logits, the loss (next-token
cross-entropy plus the balancing terms the config asks for) and what every
MoE layer's router decided.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layer import ACTIVATIONS, MoELayer
from .request import RoutingRequest
from .routing import MAX_CAPACITY_FACTOR, Routing, get_scheme


@dataclass
class MoEConfig:
    vocab_size: int = 4096          # byte-level BPE vocabulary (assets/tokenizer.json)
    block_size: int = 256           # context length in tokens
    n_layer: int = 4                # transformer blocks, each with one MoE layer
    n_head: int = 4                 # attention heads
    d_model: int = 128              # residual stream width
    d_ff: int = 96                  # hidden width of ONE routed expert (SwiGLU)
    n_experts: int = 8              # routed experts per MoE layer (N)
    top_k: int = 2                  # experts per token for top-k schemes (k)
    scheme: str = "softmax_topk"    # routing scheme, a key of moe_core.model.routing.SCHEMES
    n_shared: int = 0               # always-on shared experts (DeepSeekMoE)
    activation: str = "swiglu"      # expert FFN: "swiglu" or "gelu"
    capacity_factor: float | None = None  # for capacity schemes (None = the scheme's default)
    group_size: int | None = None   # route in groups of this many tokens (None = the whole batch)
    aux_loss_coef: float = 0.0      # weight of the load-balancing loss (Switch: 0.01)
    z_loss_coef: float = 0.0        # weight of the router z-loss (ST-MoE: 0.001)
    cv_loss_coef: float = 0.0       # weight of Shazeer's CV^2 importance + load losses (0.01)
    bias_update_rate: float = 0.0   # DeepSeek aux-loss-free bias step gamma (0 = off)

    def __post_init__(self):
        def whole(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"config {name} must be a whole number >= {lo}, got {v!r}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff", "n_experts"):
            whole(name, 1)
        whole("n_shared", 0)
        whole("top_k", 1)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model = {self.d_model} must be divisible by n_head = {self.n_head}")
        if not isinstance(self.scheme, str):
            raise ValueError(f"config scheme must be a routing scheme name, got {self.scheme!r}")
        s = get_scheme(self.scheme)
        if s.uses_k and not self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be between 1 and n_experts = {self.n_experts}, got {self.top_k!r}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ValueError(f"config activation must be one of: {', '.join(ACTIVATIONS)}; got {self.activation!r}")
        cf = self.capacity_factor
        if cf is not None:
            if (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf)
                    or not 0 < cf <= MAX_CAPACITY_FACTOR):
                raise ValueError(f"config capacity_factor must be a number in (0, {MAX_CAPACITY_FACTOR}] "
                                 f"or null, got {cf!r}")
            if not s.uses_capacity:
                raise ValueError(f"{self.scheme} has no capacity; leave capacity_factor unset")
        if self.group_size is not None:
            whole("group_size", 1)
        for name in ("aux_loss_coef", "z_loss_coef", "cv_loss_coef", "bias_update_rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"config {name} must be a non-negative number, got {v!r}")
        if self.bias_update_rate and self.scheme != "deepseek":
            raise ValueError("bias balancing (bias_update_rate > 0) needs the deepseek routing scheme")

    def param_count(self) -> int:
        """Parameters of MoEGPT(self), tied embedding once, computed from the numbers alone (allocates nothing).
        Equals count_params(MoEGPT(self)).total (tests/test_untrusted.py checks it)."""
        d, f, n = self.d_model, self.d_ff, self.n_experts
        d_in = 2 * f if self.activation == "swiglu" else f
        per_layer = (4 * d * d                                      # attention: c_attn (3d x d) + c_proj (d x d)
                     + 2 * d                                        # ln_1, ln_2
                     + n * d * (2 if self.scheme == "noisy_topk" else 1)   # router (+ noise scale)
                     + n * (d * d_in + f * d))                      # routed experts
        if self.n_shared:
            s = self.n_shared * f
            per_layer += d * (2 * s if self.activation == "swiglu" else s) + s * d
        return (self.vocab_size + self.block_size) * d + self.n_layer * per_layer + d   # + ln_f

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor a checkpoint of this config stores (MoEGPT's state_dict without the
        tied lm_head.weight), from the numbers alone (allocates no tensor). O(n_layer): check the size first."""
        d, f, n = self.d_model, self.d_ff, self.n_experts
        d_in = 2 * f if self.activation == "swiglu" else f
        shapes = {"wte.weight": (self.vocab_size, d), "wpe.weight": (self.block_size, d)}
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            shapes.update({b + "ln_1.weight": (d,), b + "attn.c_attn.weight": (3 * d, d),
                           b + "attn.c_proj.weight": (d, d), b + "ln_2.weight": (d,),
                           b + "moe.expert_bias": (n,), b + "moe.router.weight": (n, d)})
            if self.scheme == "noisy_topk":
                shapes[b + "moe.noise.weight"] = (n, d)
            shapes.update({b + "moe.experts.w_in": (n, d, d_in), b + "moe.experts.w_out": (n, f, d)})
            if self.n_shared:
                s = self.n_shared * f
                shapes.update({b + "moe.shared.ffn.w_in": (1, d, 2 * s if self.activation == "swiglu" else s),
                               b + "moe.shared.ffn.w_out": (1, s, d)})
        shapes["ln_f.weight"] = (d,)
        return shapes

    def router_options(self) -> dict:
        opts = {}
        if self.capacity_factor is not None:
            if not get_scheme(self.scheme).uses_capacity:
                raise ValueError(f"{self.scheme} has no capacity; leave capacity_factor unset")
            opts["capacity_factor"] = self.capacity_factor
        if self.group_size is not None:
            opts["group_size"] = self.group_size
        return opts

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        if not isinstance(d, dict):
            raise ValueError("model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


class CausalSelfAttention(nn.Module):
    param_part = "attention"

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cache: list | None = None) -> Tensor:
        """`cache` (decoding): a list, empty at first, that holds this layer's keys and values of every
        position seen so far; x is then only the new positions, and they attend to the cached ones too."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            if cache:
                past = cache[0].size(2)
                k = torch.cat([cache[0], k], dim=2)                      # (B, nh, past + T, hs)
                v = torch.cat([cache[1], v], dim=2)                      # (B, nh, past + T, hs)
            cache[:] = [k, v]
        if past == 0 or T == 1:   # no cache yet: causal; one new position: it sees everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0)
        else:                     # several new positions: each sees the cache and the new ones up to itself
            allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                 # (B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.RMSNorm(cfg.d_model)
        self.moe = MoELayer(
            cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, scheme=cfg.scheme,
            n_shared=cfg.n_shared, activation=cfg.activation, **cfg.router_options(),
        )

    def forward(self, x: Tensor, mask: Tensor | None, request: RoutingRequest, layer: int,
                cache: list | None = None, idx: Tensor | None = None) -> tuple[Tensor, Routing]:
        x = x + self.attn(self.ln_1(x), cache)
        h = self.ln_2(x)
        if mask is None:
            y, routing = self.moe(h, idx, request=request, layer=layer)
        else:
            # only real tokens are routed (padding must not compete for capacity)
            y = torch.zeros_like(h)
            y[mask], routing = self.moe(h[mask], None if idx is None else idx[mask], request=request, layer=layer)
        return x + y, routing


class LMHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ W^T) against targets, computed in chunks of tokens.

    The plain path materialises logits AND their gradient, [tokens, vocab] each
    (64 MB per 4096 tokens here). This computes each chunk's loss and its
    gradients right away (d loss / d logits = softmax - one_hot), so only one
    chunk of logits ever exists: about 1.5x faster on a 2-core CPU. Same
    numbers as F.cross_entropy(x @ W.T, targets, ignore_index=-1).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, chunk: int = 512) -> Tensor:
        valid = targets >= 0
        n = valid.sum().clamp(min=1)
        safe = targets.clamp(min=0)
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight)
        total = x.new_zeros((), dtype=torch.float32)
        for xs, ts, vs, gx in zip(x.split(chunk), safe.split(chunk), valid.split(chunk), grad_x.split(chunk)):
            logp = torch.log_softmax((xs @ weight.t()).float(), dim=-1)  # (chunk, vocab)
            total -= (logp.gather(1, ts[:, None])[:, 0] * vs).sum()
            g = logp.exp_()                                          # softmax
            g.scatter_add_(1, ts[:, None], -vs[:, None].float())     # - one_hot(target)
            g.mul_((vs.float() / n)[:, None])
            torch.mm(g.to(x.dtype), weight, out=gx)
            grad_w.addmm_(g.t().to(x.dtype), xs)
        ctx.save_for_backward(grad_x, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, grad_w * grad_out, None, None


@dataclass
class ModelOutput:
    logits: Tensor | None          # (B, T, vocab); None when called with return_logits=False
    loss: Tensor | None            # ce + weighted balancing terms (None without targets)
    routings: list[Routing]        # one per layer, over the B*T (unmasked) tokens
    ce_loss: Tensor | None = None  # next-token cross-entropy in nats
    aux: dict | None = None        # balancing terms averaged over layers (unweighted)

    def __iter__(self):
        # `logits, loss, routings = model(idx, targets)`
        return iter((self.logits, self.loss, self.routings))


def _token_ids(name: str, t, device: torch.device, lo: int, hi: int, shape: tuple | None = None) -> Tensor:
    """t as a long tensor, if it is an integer tensor [B, T] (of `shape`) on `device` with values lo..hi-1;
    otherwise a ValueError that says what was expected."""
    want = f"{name} must be an integer tensor [B, T] of values from {lo} to {hi - 1}"
    if not isinstance(t, Tensor) or t.dtype not in (torch.long, torch.int) or t.dim() != 2:
        got = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{want}, got {got}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have the shape of idx {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the model is on {device}: move one to the other")
    if t.numel():
        least, most = (int(v) for v in torch.aminmax(t))
        if least < lo or most >= hi:
            raise ValueError(f"{want}, got values from {least} to {most}")
    return t.long()


class MoEGPT(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017), as in GPT-2
        self.apply(self._init_weights)
        # scaled init of the residual projections, per GPT-2
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("w_out"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks]

    def kv_cache(self) -> list[list]:
        """An empty KV cache for `forward(..., cache=)`: one list per block, filled as positions go through."""
        return [[] for _ in self.blocks]

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, mask: Tensor | None = None,
                return_logits: bool = True, request: RoutingRequest | None = None,
                cache: list[list] | None = None) -> ModelOutput:
        """idx (B, T) token ids; targets (B, T) next tokens, -1 = ignore; mask (B, T) real tokens.

        `cache` (decoding, see moe_core/generate.py): `model.kv_cache()`, then passed to every call. Each
        call gives only the new positions (the prompt first, then one token at a time); their keys and
        values are kept, so earlier positions are never computed again. Only the new tokens are routed,
        as one routing group.

        `request` (RoutingRequest.make(model.config, ...)) routes every MoE layer of this call another
        way than the model was trained with (scheme, top-k, capacity factor, experts switched off for an
        ablation), without touching weights; None routes as trained.
        `return_logits=False` (training) computes the loss chunk by chunk and
        never builds the full logits tensor.
        """
        device, vocab = self.wte.weight.device, self.config.vocab_size
        idx = _token_ids("idx", idx, device, 0, vocab)
        B, T = idx.size()
        past = 0
        if cache is not None:
            if not (isinstance(cache, list) and len(cache) == len(self.blocks)
                    and all(isinstance(c, list) for c in cache)):
                raise ValueError("cache must be model.kv_cache() (one list per block), or None")
            if mask is not None:
                raise ValueError("a KV cache cannot be combined with a mask: padding would enter the cache")
            if cache[0]:
                past = cache[0][0].size(2)
                if cache[0][0].size(0) != B:
                    raise ValueError(f"the cache holds {cache[0][0].size(0)} sequences but idx has {B}")
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context of {self.config.block_size}")
        if targets is not None:
            targets = _token_ids("targets (next token ids, -1 = none)", targets, device, -1, vocab, (B, T))
        if mask is not None and not (isinstance(mask, Tensor) and mask.dtype == torch.bool
                                     and mask.shape == (B, T) and mask.device == device):
            raise ValueError(f"mask must be a bool tensor [B, T] = [{B}, {T}] on {device} (True: a real token)")
        if request is not None and not isinstance(request, RoutingRequest):
            raise ValueError(f"request must be a RoutingRequest (or None), got {type(request).__name__}")
        request = request or RoutingRequest.make(self.config)
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)                # (B, T, C)
        routings = []
        for i, block in enumerate(self.blocks):
            x, routing = block(x, mask, request, i, None if cache is None else cache[i], idx)
            routings.append(routing)
        x = self.ln_f(x)
        logits = self.lm_head(x) if return_logits or targets is None else None  # (B, T, vocab)

        loss = ce = aux = None
        if targets is not None:
            if logits is not None:
                ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            else:
                ce = LMHeadCrossEntropy.apply(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1))
            aux = {name: torch.stack([r.aux[name] for r in routings]).mean()
                   for name in routings[0].aux}
            cfg = self.config
            loss = ce
            if cfg.aux_loss_coef:
                loss = loss + cfg.aux_loss_coef * aux["load_balance"]
            if cfg.z_loss_coef:
                loss = loss + cfg.z_loss_coef * aux["z_loss"]
            if cfg.cv_loss_coef and "cv_importance" in aux:
                loss = loss + cfg.cv_loss_coef * (aux["cv_importance"] + aux["cv_load"])
        return ModelOutput(logits, loss, routings, ce, aux)

    @torch.no_grad()
    def update_expert_bias(self, routings: list[Routing], gamma: float | None = None) -> None:
        """DeepSeek-V3 aux-loss-free balancing: one bias step per layer from this batch's load."""
        gamma = self.config.bias_update_rate if gamma is None else gamma
        for layer, routing in zip(self.moe_layers, routings):
            layer.update_bias(routing.load, gamma)
