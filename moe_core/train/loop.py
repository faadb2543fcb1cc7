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

import math
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from ..analysis.specialisation import model_card
from ..data.tokens import TokenData, load_token_data
from ..inference import evaluate
from ..model.checkpoint import save
from ..model.gpt import MoEConfig, MoEGPT
from ..model.layer import pick_device


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
    balancing: str                       # none | load_balance | deepseek_bias | hash | untrained
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
    Preset("moe-n8-hash", "8 experts, 2 per token chosen by a fixed hash of the token id: no learned router", "hash",
           dict(n_experts=8, scheme="hash"), order=8),
    Preset("moe-n8-untrained", "8 experts, top-2, the random initialisation (0 steps): routing by chance", "untrained",
           dict(n_experts=8), dict(steps=0), order=9),
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
    """One model being trained, one optimizer step per `step()`: the one loop behind `train` (the CLI),
    the Training lab (which steps it by hand) and the expert-parallel trainer (which overrides the four
    methods that differ when the batch and the experts are split over processes: `batch`,
    `clip_gradients`, `losses` and `evaluate`)."""

    def __init__(self, model_cfg: MoEConfig, cfg: TrainConfig, *, data: TokenData | None = None,
                 model: MoEGPT | None = None):

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
        x, y = self.batch()
        out = model(x.to(self.device), y.to(self.device), return_logits=False)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.clip_gradients()
        self.opt.step()
        if model_cfg.bias_update_rate:
            model.update_expert_bias(out.routings)
        self.step_count += 1
        loss, ce_loss = self.losses(out)
        step_eval = None
        if (cfg.eval_interval and self.step_count % cfg.eval_interval == 0) or self.done:
            step_eval = self.eval_loss = self.evaluate()
        self.train_s += time.perf_counter() - t0
        return StepInfo(
            step=self.step_count, steps=cfg.steps, loss=loss, ce_loss=ce_loss,
            aux={k: v.item() for k, v in out.aux.items()}, lr=lr,
            tokens_per_s=self.tokens_per_step * self.step_count / self.train_s, elapsed_s=self.train_s,
            load=[r.load.tolist() for r in out.routings],
            top1_share=[(torch.bincount(r.top1[r.top1 >= 0], minlength=r.n_experts).float()
                         / max(1, int((r.top1 >= 0).sum()))).tolist() for r in out.routings],
            bias=[m.expert_bias.tolist() for m in model.moe_layers] if model_cfg.scheme == "deepseek" else None,
            eval_loss=step_eval,
        )


    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's training windows (inputs, next tokens)."""
        return self.data.batch("train", self.cfg.batch_size, self.model_cfg.block_size, self.gen)

    def clip_gradients(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)

    def losses(self, out) -> tuple[float, float]:
        """The step's (total, cross-entropy) loss over the whole batch."""
        return out.loss.item(), out.ce_loss.item()

    def evaluate(self) -> float:
        return evaluate(self.model, self.data, self.cfg.eval_batches)


def train(
    model_cfg: MoEConfig,
    cfg: TrainConfig,
    *,
    data: TokenData | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
    model: MoEGPT | None = None,
    trainer: Trainer | None = None,
) -> TrainResult:
    """Train a fresh model (or continue `model`, or run a `trainer` made elsewhere, such as the
    expert-parallel one) and return it with its history."""
    trainer = trainer or Trainer(model_cfg, cfg, data=data, model=model)
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
        trainer.eval_loss = trainer.evaluate()
    trainer.model.eval()
    return TrainResult(trainer.model, model_cfg, cfg, history, trainer.eval_loss, wall,
                       trainer.tokens_per_step * len(history), stopped)


def train_and_save(preset: Preset, model_cfg: MoEConfig, cfg: TrainConfig, out_dir: Path, *,
                   progress: bool = True, name: str | None = None) -> Path:
    """Train a preset, measure it (analysis.model_card) and save checkpoint + card."""


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
