"""Training: a flat nanoGPT-style loop that supports every balancing method.

    batch -> forward -> zero_grad -> backward -> clip -> step -> (bias update)

Balancing methods (set on the model config, so the loss the model reports is
the loss it trains on):
- none:            just the language-model loss (routers are free to collapse)
- load balance:    + aux_loss_coef * N * sum_e f_e P_e     (Switch Transformer)
- z-loss:          + z_loss_coef * mean logsumexp(logits)^2  (ST-MoE)
- CV^2:            + cv_loss_coef * (CV^2 importance + CV^2 load)  (Shazeer 2017, noisy_topk)
- DeepSeek bias:   no loss term; after each step every layer's selection bias
                   moves by bias_update_rate towards balance (DeepSeek-V3)
Any scheme of the routing zoo can be trained; Expert Choice and BASE are
balanced by construction.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .model import MoEConfig, MoEGPT


@dataclass
class TrainConfig:
    steps: int = 600              # optimizer steps (600 x 16 x 256 = 2.5M tokens, ~2/3 of an epoch)
    batch_size: int = 16          # sequences per step (x block_size tokens)
    lr: float = 3e-3              # peak learning rate (AdamW)
    min_lr: float = 3e-4          # end of the cosine decay
    warmup_steps: int = 100       # linear warm-up
    weight_decay: float = 0.1     # on matrices only (not norms)
    grad_clip: float = 1.0        # global grad-norm clip
    seed: int = 0                 # model init and batch order
    eval_interval: int = 250      # steps between held-out evaluations (0 = only at the end)
    eval_batches: int = 8         # held-out batches per evaluation
    device: str = "cpu"           # "auto", "cpu", "cuda"
    threads: int | None = None    # torch CPU threads (None = torch default)

    def __post_init__(self):
        for name in ("steps", "batch_size", "warmup_steps", "eval_interval", "eval_batches", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {v!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        for name in ("lr", "min_lr", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    balancing: str                       # none | load_balance | deepseek_bias | cv | capacity
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    order: int = 50                      # display order of the shipped checkpoints


_BALANCED = dict(aux_loss_coef=0.01, z_loss_coef=0.001)
PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("moe-n4", "4 experts, top-2, load-balancing loss + z-loss", "load_balance",
           dict(n_experts=4, **_BALANCED), order=1),
    Preset("moe-n8", "8 experts, top-2, load-balancing loss + z-loss (the default model)", "load_balance",
           dict(n_experts=8, **_BALANCED), order=2),
    Preset("moe-n16", "16 experts, top-2, load-balancing loss + z-loss", "load_balance",
           dict(n_experts=16, **_BALANCED), order=3),
    Preset("moe-n32", "32 experts, top-2, load-balancing loss + z-loss", "load_balance",
           dict(n_experts=32, **_BALANCED), order=4),
    Preset("moe-n8-nobalance", "8 experts, top-2, NO balancing at all: the collapse contrast", "none",
           dict(n_experts=8), order=5),
    Preset("moe-n8-bias", "8 experts, top-2, DeepSeek-V3 sigmoid routing with aux-loss-free bias balancing", "deepseek_bias",
           dict(n_experts=8, scheme="deepseek", bias_update_rate=0.01), order=6),
    Preset("moe-n8-switch", "8 experts, Switch top-1 with capacity factor 1.25 and load-balancing loss", "load_balance",
           dict(n_experts=8, scheme="switch", top_k=1, capacity_factor=1.25, **_BALANCED), order=7),
    Preset("moe-n8-untrained", "8 experts, top-2, the random initialisation (0 steps): routing by chance", "untrained",
           dict(n_experts=8), dict(steps=0), order=8),
    # short recipes for demos and tests (not shipped)
    Preset("tiny", "2 layers, 4 experts, 60 steps: a smoke test", "load_balance",
           dict(n_layer=2, n_experts=4, d_model=64, n_head=2, d_ff=64, block_size=128, **_BALANCED),
           dict(steps=60, batch_size=8, eval_interval=0, eval_batches=2, warmup_steps=10), order=90),
]}


def make_configs(preset: str, **overrides) -> tuple[MoEConfig, TrainConfig, Preset]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    model_keys = {f.name for f in fields(MoEConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - model_keys - train_keys
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    m = {**p.model, **{k: v for k, v in overrides.items() if k in model_keys}}
    t = {**p.train, **{k: v for k, v in overrides.items() if k in train_keys}}
    return MoEConfig(**m), TrainConfig(**t), p


# ----------------------------------------------------------------------------- data


class TokenData:
    """Token ids of the corpus splits, sampled as random windows."""

    def __init__(self, train: np.ndarray, eval: np.ndarray, corpus_hash: str = ""):
        self.splits = {"train": torch.from_numpy(train.astype(np.int64)), "eval": torch.from_numpy(eval.astype(np.int64))}
        self.corpus_hash = corpus_hash

    def batch(self, split: str, batch_size: int, block_size: int, gen: torch.Generator):
        data = self.splits[split]
        if len(data) <= block_size + 1:
            raise ValueError(f"the {split} split has only {len(data)} tokens, fewer than one window of {block_size + 1}")
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
        x = torch.stack([data[i : i + block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
        return x, y

    def eval_windows(self, block_size: int, max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed, evenly spaced held-out windows: the same for every model, so losses compare."""
        data = self.splits["eval"]
        n = min(max_windows, (len(data) - 1) // block_size)
        starts = torch.linspace(0, len(data) - block_size - 1, n).long()
        x = torch.stack([data[s : s + block_size] for s in starts])
        y = torch.stack([data[s + 1 : s + 1 + block_size] for s in starts])
        return x, y


def _cache_dir() -> Path:
    return Path(os.environ.get("MOE_LAB_CACHE", Path.home() / ".cache" / "moe-router-lab"))


@lru_cache(maxsize=1)
def load_token_data() -> TokenData:
    """Tokenise the shipped corpus once (cached on disk, keyed by corpus + tokenizer hash)."""
    from . import corpus
    from .tokenizer import TOKENIZER_PATH, get_tokenizer

    man = corpus.manifest()
    tok_hash = hashlib.sha256(Path(TOKENIZER_PATH).read_bytes()).hexdigest()[:16]
    # the corpus content hash: sha256 over the uncompressed splits' own sha256 (manifest.json)
    corpus_hash = hashlib.sha256("".join(man["splits"][s]["sha256_uncompressed"] for s in ("train", "eval"))
                                 .encode()).hexdigest()
    key = hashlib.sha256(json.dumps(man, sort_keys=True).encode() + tok_hash.encode()).hexdigest()[:16]
    cache = _cache_dir() / f"ids-{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return TokenData(z["train"], z["eval"], corpus_hash=corpus_hash)
    tok = get_tokenizer()
    arrays = {}
    for split in ("train", "eval"):
        ids: list[int] = []
        for doc in corpus.load_documents(split):
            ids.extend(tok.encode(doc["text"]))
            ids.append(tok.eot_id)
        arrays[split] = np.asarray(ids, dtype=np.uint16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)
    return TokenData(arrays["train"], arrays["eval"], corpus_hash=corpus_hash)


# ----------------------------------------------------------------------------- loop


@dataclass
class StepInfo:
    """What the loop reports after every step (for progress bars and the live lab)."""

    step: int
    steps: int
    loss: float                  # total loss (ce + weighted balancing terms)
    ce_loss: float               # next-token cross-entropy, nats
    aux: dict[str, float]        # unweighted balancing terms, averaged over layers
    lr: float
    tokens_per_s: float
    elapsed_s: float
    load: list[list[int]]        # [layer][expert] tokens processed this step
    top1_share: list[list[float]]  # [layer][expert] share of first choices
    bias: list[list[float]] | None  # [layer][expert] DeepSeek selection bias (bias balancing only)
    eval_loss: float | None = None  # held-out cross-entropy when evaluated at this step


@dataclass
class TrainResult:
    model: MoEGPT
    model_config: MoEConfig
    train_config: TrainConfig
    history: list[dict]
    eval_loss: float | None
    wall_s: float
    tokens: int
    stopped: bool


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr (nanoGPT's schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def configure_optimizer(model: MoEGPT, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: MoEGPT, data: TokenData, batches: int, batch_size: int = 16) -> float:
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


def _progress(info: StepInfo) -> None:
    width = 28
    done = int(width * info.step / max(1, info.steps))
    eta = (info.steps - info.step) * info.elapsed_s / max(1, info.step)
    ev = f" eval {info.eval_loss:.3f}" if info.eval_loss is not None else ""
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {info.step}/{info.steps} loss {info.ce_loss:.3f}{ev} "
                     f"{info.tokens_per_s:,.0f} tok/s ETA {eta:4.0f}s ")
    if info.step == info.steps:
        sys.stderr.write("\n")
    sys.stderr.flush()


_init_lock = threading.Lock()


class Trainer:
    """One model being trained, one optimizer step per `step()` (the training lab steps it by hand)."""

    def __init__(self, model_cfg: MoEConfig, cfg: TrainConfig, *, data: TokenData | None = None,
                 model: MoEGPT | None = None):
        from .layer import pick_device

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model_cfg, self.cfg = model_cfg, cfg
        self.device = pick_device(cfg.device)
        with _init_lock:                    # seeded init, safe with several trainers in one process
            torch.manual_seed(cfg.seed)
            model = model or MoEGPT(model_cfg)
        self.model = model.to(self.device)
        self.model.train()
        self.data = data or load_token_data()
        self.opt = configure_optimizer(self.model, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.tokens_per_step = cfg.batch_size * model_cfg.block_size
        self.step_count = 0
        self.eval_loss: float | None = None
        self.train_s = 0.0                  # time spent in step(), excluding pauses

    @property
    def done(self) -> bool:
        return self.step_count >= self.cfg.steps

    def step(self) -> StepInfo:
        cfg, model_cfg, model = self.cfg, self.model_cfg, self.model
        t0 = time.perf_counter()
        step = self.step_count
        lr = lr_at(step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = self.data.batch("train", cfg.batch_size, model_cfg.block_size, self.gen)
        out = model(x.to(self.device), y.to(self.device), return_logits=False)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        if model_cfg.bias_update_rate:
            model.update_expert_bias(out.routings)
        self.step_count += 1
        step_eval = None
        if (cfg.eval_interval and self.step_count % cfg.eval_interval == 0) or self.done:
            step_eval = self.eval_loss = evaluate(model, self.data, cfg.eval_batches)
        self.train_s += time.perf_counter() - t0
        return StepInfo(
            step=self.step_count, steps=cfg.steps, loss=out.loss.item(), ce_loss=out.ce_loss.item(),
            aux={k: v.item() for k, v in out.aux.items()}, lr=lr,
            tokens_per_s=self.tokens_per_step * self.step_count / self.train_s, elapsed_s=self.train_s,
            load=[r.load.tolist() for r in out.routings],
            top1_share=[(torch.bincount(r.top1[r.top1 >= 0], minlength=r.n_experts).float()
                         / max(1, int((r.top1 >= 0).sum()))).tolist() for r in out.routings],
            bias=[m.expert_bias.tolist() for m in model.moe_layers] if model_cfg.scheme == "deepseek" else None,
            eval_loss=step_eval,
        )


def train(
    model_cfg: MoEConfig,
    cfg: TrainConfig,
    *,
    data: TokenData | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
    model: MoEGPT | None = None,
) -> TrainResult:
    """Train a fresh model (or continue `model`) and return it with its history."""
    trainer = Trainer(model_cfg, cfg, data=data, model=model)
    history: list[dict] = []
    t0 = time.perf_counter()
    stopped = False
    while not trainer.done:
        if should_stop is not None and should_stop():
            stopped = True
            break
        info = trainer.step()
        history.append({"step": info.step, "loss": info.loss, "ce_loss": info.ce_loss, "eval_loss": info.eval_loss,
                        "max_top1_share": [max(s) for s in info.top1_share]})
        if callback is not None:
            callback(info)
        if progress:
            _progress(info)
    wall = time.perf_counter() - t0
    if cfg.steps == 0:
        trainer.eval_loss = evaluate(trainer.model, trainer.data, cfg.eval_batches)
    trainer.model.eval()
    return TrainResult(trainer.model, model_cfg, cfg, history, trainer.eval_loss, wall,
                       trainer.tokens_per_step * len(history), stopped)


def train_and_save(preset: Preset, model_cfg: MoEConfig, cfg: TrainConfig, out_dir: Path, *,
                   progress: bool = True, name: str | None = None) -> Path:
    """Train a preset, measure it (analysis.model_card) and save checkpoint + card."""
    import platform
    from dataclasses import asdict

    from .analysis import model_card
    from .checkpoint import save

    data = load_token_data()
    result = train(model_cfg, cfg, data=data, progress=progress)
    card = model_card(result.model, data)
    card.update({
        "corpus_hash": data.corpus_hash,
        "seed": cfg.seed,
        "steps": len(result.history),
        "tokens_seen": result.tokens,
        "wall_s": round(result.wall_s, 1),
        "tokens_per_s": round(result.tokens / result.wall_s) if result.wall_s > 0 else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, device {cfg.device}",
        "final_train_loss": round(result.history[-1]["ce_loss"], 4) if result.history else None,
    })
    recipe = {"preset": preset.name, "description": preset.description, "balancing": preset.balancing,
              "order": preset.order, "train": asdict(cfg)}
    return save(result.model, Path(out_dir) / (name or preset.name), name=name or preset.name, recipe=recipe, card=card)
