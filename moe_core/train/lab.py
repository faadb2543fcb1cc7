"""The training lab's engine: live training jobs with play / pause / step / cancel, and a server-wide cap.

No Panel here: the app polls `Job.snapshot()` and draws. A job trains one or two
recipes (two = side-by-side compare, same seed and batches) in a background
thread with the ordinary `moe_core.train.loop.train` loop.

Classroom limits (one server, many students):
- `JobManager(max_running)`: at most `max_running` jobs train at once (env
  MOE_LAB_MAX_JOBS, default 1); the rest wait in a queue and know their position.
- `MAX_STEPS` per job; one job per session is the app's rule (it cancels the old one).
- Training threads use a bounded number of torch threads (env MOE_LAB_TRAIN_THREADS, default 1).
"""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field

import torch

from ..data.tokens import load_token_data
from ..model.gpt import MoEConfig
from ..model.routing import SCHEMES
from ..perf.pages import pages_kept
from .loop import StepInfo, TrainConfig, Trainer

MAX_STEPS = 2000
MAX_EXPERTS = 64
BALANCING = {
    "none": "No balancing",
    "load_balance": "Load-balancing loss (Switch)",
    "z_loss": "Router z-loss only (ST-MoE)",
    "cv": "CV\u00b2 importance + load losses (Shazeer 2017)",
    "deepseek_bias": "DeepSeek-V3 bias (auxiliary-loss-free)",
}
# The lab's model: the shipped architecture made smaller so ~60 s on 2 cores shows the dynamics.
LAB_MODEL = dict(n_layer=2, n_head=2, d_model=64, d_ff=64, block_size=128)
LAB_BATCH = 8
# Status thresholds on the busiest expert's share of first choices (any layer), N experts:
COLLAPSED_SHARE = 0.5          # one expert takes half of all first choices or more
UNEVEN_FACTOR = 2.0            # busiest expert takes more than twice the fair share 1/N


@dataclass(frozen=True)
class Recipe:
    """What a student picks in the lab."""

    n_experts: int = 8
    top_k: int = 2
    scheme: str = "softmax_topk"
    balancing: str = "none"
    aux_loss_coef: float = 0.01          # load-balancing loss weight
    z_loss_coef: float = 0.001           # router z-loss weight
    cv_loss_coef: float = 0.01           # Shazeer CV^2 weight
    bias_update_rate: float = 0.01       # DeepSeek bias update rate (gamma)
    capacity_factor: float = 1.25   # for capacity schemes
    steps: int = 300
    seed: int = 0
    lr: float = 3e-3

    def validate(self) -> "Recipe":
        if not isinstance(self.n_experts, int) or not 2 <= self.n_experts <= MAX_EXPERTS:
            raise ValueError(f"N must be a whole number from 2 to {MAX_EXPERTS}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown routing scheme {self.scheme!r}")
        if self.balancing not in BALANCING:
            raise ValueError(f"unknown balancing method {self.balancing!r}; choose one of: {', '.join(BALANCING)}")
        if self.balancing == "deepseek_bias" and self.scheme != "deepseek":
            raise ValueError("DeepSeek bias balancing needs the DeepSeek-V3 routing scheme")
        if self.balancing == "cv" and self.scheme != "noisy_topk":
            raise ValueError("the CV\u00b2 losses belong to noisy top-k gating (Shazeer 2017): pick that scheme")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be from 1 to {MAX_STEPS}")
        for name in ("aux_loss_coef", "z_loss_coef", "cv_loss_coef", "bias_update_rate", "capacity_factor", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v or v < 0 or v > 100:
                raise ValueError(f"{name} must be a number from 0 to 100, got {v!r}")
        self.model_config()   # k vs N and the rest
        return self

    def model_config(self) -> MoEConfig:
        s = SCHEMES[self.scheme]
        return MoEConfig(
            **LAB_MODEL,
            n_experts=self.n_experts,
            top_k=(s.fixed_k or self.top_k) if not s.uses_k else self.top_k,
            scheme=self.scheme,
            capacity_factor=float(self.capacity_factor) if s.uses_capacity else None,
            aux_loss_coef=float(self.aux_loss_coef) if self.balancing == "load_balance" else 0.0,
            z_loss_coef=float(self.z_loss_coef) if self.balancing in ("z_loss", "load_balance") else 0.0,
            cv_loss_coef=float(self.cv_loss_coef) if self.balancing == "cv" else 0.0,
            bias_update_rate=float(self.bias_update_rate) if self.balancing == "deepseek_bias" else 0.0,
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=LAB_BATCH, lr=self.lr, min_lr=self.lr / 10,
                           warmup_steps=min(20, self.steps), seed=self.seed, eval_interval=25, eval_batches=1)

    def label(self) -> str:
        s = SCHEMES[self.scheme]
        k = f", k={self.top_k}" if s.uses_k else ""
        return f"{s.label}{k}, N={self.n_experts}, {BALANCING[self.balancing]}"


RECIPES: dict[str, Recipe] = {
    "Collapse (no balancing)": Recipe(balancing="none"),
    "Switch aux loss": Recipe(scheme="switch", top_k=1, balancing="load_balance"),
    "DeepSeek bias": Recipe(scheme="deepseek", balancing="deepseek_bias"),
    "Expert Choice": Recipe(scheme="expert_choice", balancing="none", capacity_factor=1.0),
}


def status(top1_share_by_layer: list[list[float]]) -> tuple[str, str]:
    """Balanced / Uneven / Collapsed from the busiest expert's share of first choices, with the reason."""
    return verdict(max(max(layer) for layer in top1_share_by_layer), len(top1_share_by_layer[0]))


def verdict(busiest: float, n: int) -> tuple[str, str]:
    """The status word for a busiest-expert share of first choices among n experts."""
    if busiest >= COLLAPSED_SHARE:
        return "Collapsed", f"one expert takes {busiest:.0%} of first choices (\u2265 {COLLAPSED_SHARE:.0%})"
    if busiest > UNEVEN_FACTOR / n:
        return "Uneven", f"busiest expert takes {busiest:.0%}, more than {UNEVEN_FACTOR:g}\u00d7 the fair {1 / n:.0%}"
    return "Balanced", f"busiest expert takes {busiest:.0%}; fair share is {1 / n:.0%}"


@dataclass
class Run:
    """One recipe being trained: its live history."""

    recipe: Recipe
    steps: list[dict] = field(default_factory=list)
    model: object = None


class Job:
    """One training job (one or two recipes trained in lockstep in a background thread)."""

    _ids = itertools.count(1)

    def __init__(self, recipes: list[Recipe], manager: "JobManager"):
        if not 1 <= len(recipes) <= 2:
            raise ValueError("a job trains one recipe, or two to compare")
        self.id = next(self._ids)
        self.runs = [Run(r.validate()) for r in recipes]
        self.manager = manager
        self.state = "queued"           # queued | running | paused | done | cancelled | failed
        self.error = ""
        self._lock = threading.Lock()
        self._resume = threading.Event()
        self._resume.set()
        self._step_budget: int | None = None    # steps left while stepping by hand
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # -- controls (any thread) -----------------------------------------------------

    def pause(self) -> None:
        with self._lock:
            if self.state in ("running", "queued"):
                self._resume.clear()
                if self.state == "running":
                    self.state = "paused"

    def resume(self) -> None:
        with self._lock:
            self._step_budget = None
            if self.state == "paused":
                self.state = "running"
            self._resume.set()

    def step(self, n: int = 1) -> None:
        """While paused: train exactly n more steps, then pause again."""
        with self._lock:
            if self.state != "paused":
                return
            self._step_budget = n
            self._resume.set()

    def cancel(self) -> None:
        self._cancel.set()
        self._resume.set()
        with self._lock:
            if self.state in ("queued", "running", "paused"):
                self.state = "cancelled"
        self.manager._forget(self)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")

    def queue_position(self) -> int:
        return self.manager.queue_position(self)

    def snapshot(self, since: list[int] | None = None) -> dict:
        """Thread-safe copy of the state and of each run's steps after `since[i]`."""
        since = since or [0] * len(self.runs)
        with self._lock:
            return {"state": self.state, "error": self.error, "queue_position": self.queue_position(),
                    "runs": [{"label": r.recipe.label(), "steps": list(r.steps[s:]), "total": r.recipe.steps}
                             for r, s in zip(self.runs, since)]}

    # -- the worker -----------------------------------------------------------------

    def _gate(self) -> bool:
        """Called before each step: wait while paused, count hand-steps; False when cancelled."""
        while True:
            while not self._resume.wait(0.1):
                if self._cancel.is_set():
                    return False
            if self._cancel.is_set():
                return False
            with self._lock:
                if self._step_budget is None:
                    return True
                if self._step_budget > 0:
                    self._step_budget -= 1
                    return True
                self._step_budget = None          # hand-steps used up: pause again
                self._resume.clear()

    def _work(self) -> None:
        # the steps free and re-allocate the same big buffers: keep their pages (a quarter of a step's
        # time under the server's jemalloc went to mapping them again; see moe_core/perf/pages.py)
        with pages_kept():
            self._train()

    def _train(self) -> None:
        try:
            torch.set_num_threads(self.manager.threads)
            data = load_token_data()
            trainers = [Trainer(r.recipe.model_config(), r.recipe.train_config(), data=data) for r in self.runs]
            with self._lock:
                if self.state == "queued":
                    self.state = "running" if self._resume.is_set() else "paused"
            # lockstep: every run steps once per round, so compared curves advance together
            while not all(t.done for t in trainers) and self._gate():
                for run, trainer in zip(self.runs, trainers):
                    if not trainer.done:
                        rec = _record(trainer.step())
                        with self._lock:
                            run.steps.append(rec)
            for run, trainer in zip(self.runs, trainers):
                trainer.model.eval()
                run.model = trainer.model
            with self._lock:
                if self.state in ("running", "paused"):
                    self.state = "done"
        except Exception as e:  # a failing recipe must not take the server down
            with self._lock:
                self.state, self.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            self.manager._release(self)


def _record(info: StepInfo) -> dict:
    """One step as plain data: losses, balance figures (worst layer) and per-layer shares."""
    max_over_mean = max(max(layer) / (sum(layer) / len(layer)) if sum(layer) else 0.0 for layer in info.load)
    dead = max(sum(1 for v in layer if v == 0) for layer in info.load)
    return {"step": info.step, "loss": info.ce_loss, "total_loss": info.loss, "eval_loss": info.eval_loss,
            "aux": info.aux, "load_balance": info.aux.get("load_balance"), "max_over_mean": max_over_mean,
            "dead_experts": dead, "tokens_per_s": info.tokens_per_s, "elapsed_s": info.elapsed_s,
            "top1_share": info.top1_share, "load": info.load, "bias": info.bias}


class JobManager:
    """Server-wide: at most `max_running` jobs train at once; the rest queue (FIFO)."""

    def __init__(self, max_running: int | None = None, threads: int | None = None):
        self.max_running = max_running or int(os.environ.get("MOE_LAB_MAX_JOBS", "1"))
        self.threads = threads or int(os.environ.get("MOE_LAB_TRAIN_THREADS", "1"))
        if self.max_running < 1 or self.threads < 1:
            raise ValueError("max_running and threads must be at least 1")
        self._lock = threading.Lock()
        self._running: list[Job] = []
        self._queue: list[Job] = []

    def submit(self, recipes: list[Recipe]) -> Job:
        job = Job(recipes, self)
        with self._lock:
            self._queue.append(job)
        self._pump()
        return job

    def queue_position(self, job: Job) -> int:
        """0 when running (or finished); 1 = next in line."""
        with self._lock:
            return self._queue.index(job) + 1 if job in self._queue else 0

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def _pump(self) -> None:
        with self._lock:
            while self._queue and len(self._running) < self.max_running:
                job = self._queue.pop(0)
                if job.state == "cancelled":
                    continue
                self._running.append(job)
                job._thread = threading.Thread(target=job._work, daemon=True, name=f"lab-job-{job.id}")
                job._thread.start()

    def _release(self, job: Job) -> None:
        with self._lock:
            if job in self._running:
                self._running.remove(job)
        self._pump()

    def _forget(self, job: Job) -> None:
        with self._lock:
            if job in self._queue:
                self._queue.remove(job)
        self._pump()


_manager: JobManager | None = None
_manager_lock = threading.Lock()


def manager() -> JobManager:
    """The process-wide job manager (shared by all sessions of a server)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = JobManager()
        return _manager


__all__ = ["Recipe", "RECIPES", "BALANCING", "Job", "JobManager", "manager", "status", "MAX_STEPS"]
