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

from .layer import MoELayer
from .request import RoutingRequest
from .routing import Routing, get_scheme


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
        if self.d_model % self.n_head:
            raise ValueError(f"d_model = {self.d_model} must be divisible by n_head = {self.n_head}")
        s = get_scheme(self.scheme)
        if s.uses_k and not (isinstance(self.top_k, int) and 1 <= self.top_k <= self.n_experts):
            raise ValueError(f"top_k must be between 1 and n_experts = {self.n_experts}, got {self.top_k!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "cv_loss_coef", "bias_update_rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"config {name} must be a non-negative number, got {v!r}")
        if self.bias_update_rate and self.scheme != "deepseek":
            raise ValueError("bias balancing (bias_update_rate > 0) needs the deepseek routing scheme")

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

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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

    def forward(self, x: Tensor, mask: Tensor | None, request: RoutingRequest, layer: int) -> tuple[Tensor, Routing]:
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        if mask is None:
            y, routing = self.moe(h, request=request, layer=layer)
        else:
            # only real tokens are routed (padding must not compete for capacity)
            y = torch.zeros_like(h)
            y[mask], routing = self.moe(h[mask], request=request, layer=layer)
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

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, mask: Tensor | None = None,
                return_logits: bool = True, request: RoutingRequest | None = None) -> ModelOutput:
        """idx (B, T) token ids; targets (B, T) next tokens, -1 = ignore; mask (B, T) real tokens.

        `request` (RoutingRequest.make(model.config, ...)) routes every MoE layer of this call another
        way than the model was trained with (scheme, top-k, capacity factor, experts switched off for an
        ablation), without touching weights; None routes as trained.
        `return_logits=False` (training) computes the loss chunk by chunk and
        never builds the full logits tensor.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context of {self.config.block_size}")
        request = request or RoutingRequest.make(self.config)
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)                # (B, T, C)
        routings = []
        for i, block in enumerate(self.blocks):
            x, routing = block(x, mask, request, i)
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
