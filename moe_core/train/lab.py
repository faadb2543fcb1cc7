"""The training lab's engine: live training jobs shared by recipe, with play / pause / step / leave, and a server-wide cap.

No Panel here: the app polls `Subscription.snapshot()` and draws. A job trains one or
two recipes (two = side-by-side compare, same seed and batches) in a background
thread with the ordinary `moe_core.train.loop.Trainer`, one step at a time.

Classroom limits (one server, many students):
- Training is deterministic on CPU (same recipe and seed: the same losses and weights), so a
  recipe is computed once: `JobManager.submit` gives a session a `Subscription` to the job for
  its recipes, made if there is none. A class following the teacher's preset costs one job.
- `JobManager(max_running)`: at most `max_running` jobs hold a training slot (env
  MOE_LAB_MAX_JOBS, default 1); the rest wait in a queue and know their position and an ETA.
  A job that every subscriber has paused gives its slot up; resuming re-queues it.
- A subscriber whose page has lost its connection for LOST_AFTER_S leaves; a job stops when
  its last subscriber leaves.
- `MAX_STEPS` per job; one subscription per session is the app's rule (a new Train leaves the old one).
- Training threads use a bounded number of torch threads (env MOE_LAB_TRAIN_THREADS, default 1).
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.tokens import load_token_data
from ..inference import forward_windows
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
KEEP_DONE = 8                  # finished jobs kept (model and history) for sessions asking later
WATCH_S = 0.5                  # how often the manager looks whether subscribers' pages are still there
LOST_AFTER_S = 2.0             # a subscriber whose page has been gone this long leaves (its job stops if last)
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


PROBE_EVERY = 10     # steps between two looks at the router (router saturation, OLMoE Fig. 20)
PROBE_WINDOWS = 4    # held-out windows it routes each time (512 tokens at the lab's context of 128)


def probe_windows(block_size: int) -> torch.Tensor:
    """The fixed held-out windows on which a run's router is probed, the same for every run."""
    return load_token_data().eval_windows(block_size, PROBE_WINDOWS)[0]


@torch.no_grad()
def probe_choices(net, x: torch.Tensor) -> list[np.ndarray]:
    """Per layer, the router's top-k choices [T, k] (before capacity) for the probe windows x, as the model
    routes now (in eval mode: no training noise)."""
    was_training = net.training
    net.eval()
    try:
        routings, _ = forward_windows(net, x.to(next(net.parameters()).device), None, None)
    finally:
        net.train(was_training)
    return [r.choices.numpy() for r in routings]


@dataclass
class Run:
    """One recipe being trained: its live history."""

    recipe: Recipe
    steps: list[dict] = field(default_factory=list)
    model: object = None


def recipe_key(recipes: list[Recipe]) -> str:
    """What a job computes: two sessions asking for the same key get the same job. The balancing
    method is part of it (it names the run), fields a method does not use are not (a slider a
    student moved for another method changes nothing trained)."""
    return repr([(r.balancing, r.model_config(), r.train_config()) for r in recipes])


class Job:
    """One or two recipes trained once (in lockstep, in a background thread) for every session
    that asked for them: its subscribers. The manager's lock guards all of its state."""

    _ids = itertools.count(1)

    def __init__(self, recipes: list[Recipe], manager: "JobManager"):
        if not 1 <= len(recipes) <= 2:
            raise ValueError("a job trains one recipe, or two to compare")
        self.id = next(self._ids)
        self.runs = [Run(r.validate()) for r in recipes]
        self.key = recipe_key(recipes)
        self.manager = manager
        self.state = "queued"           # queued | running | paused | done | cancelled | failed
        self.error = ""
        self.subscribers: list[Subscription] = []
        self.rounds = max(r.steps for r in recipes)   # each run steps once a round (until its own end)
        self.trained = 0                # rounds made
        self.sec_per_round: float | None = None       # measured (wall), for ETAs
        self._thread: threading.Thread | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")

    def demand(self) -> int:
        """Rounds some subscriber still wants to see (a paused one wants what it has)."""
        return max((self.rounds if s.target is None else s.target for s in self.subscribers), default=0)

    # -- the worker -----------------------------------------------------------------

    def _work(self) -> None:
        m = self.manager
        try:
            torch.set_num_threads(m.threads)      # per thread: the server's routings keep theirs
            trainers = None
            while self._wait_for_slot():
                # the steps free and re-allocate the same big buffers: keep their pages while training
                # (a quarter of a step's time under the server's jemalloc went to mapping them again;
                # see moe_core/perf/pages.py), and give them back while paused
                with pages_kept():
                    if trainers is None:
                        data = load_token_data()
                        trainers = [Trainer(r.recipe.model_config(), r.recipe.train_config(), data=data)
                                    for r in self.runs]
                        rng = torch.get_rng_state()     # as the trainers' seeded init left it
                        probe = probe_windows(trainers[0].model_cfg.block_size)
                    while self._wants_round():
                        t0 = time.perf_counter()
                        # noisy top-k draws its training noise from torch's global generator: this job's
                        # draws continue its own stream, whatever other jobs drew while it was paused or
                        # queued (with one slot, the default, no other job steps meanwhile)
                        torch.set_rng_state(rng)
                        recs = [(run, _record(t.step()), t) for run, t in zip(self.runs, trainers) if not t.done]
                        rng = torch.get_rng_state()
                        for _, rec, t in recs:            # after the rng is kept: probing draws nothing of it
                            if t.step_count % PROBE_EVERY == 0 or t.done:
                                rec["probe"] = probe_choices(t.model, probe)
                        dt = time.perf_counter() - t0
                        with m._lock:
                            for run, rec, _ in recs:
                                run.steps.append(rec)
                            self.trained += 1
                            self.sec_per_round = dt if self.sec_per_round is None else 0.8 * self.sec_per_round + 0.2 * dt
            if self.trained >= self.rounds:
                for run, trainer in zip(self.runs, trainers):
                    trainer.model.eval()
                    run.model = trainer.model
                with m._lock:
                    self.state = "done"
        except Exception as e:  # a failing recipe must not take the server down
            with m._lock:
                self.state, self.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            m._release(self)

    def _wait_for_slot(self) -> bool:
        """Wait until the manager gives this job a slot; False when it has nothing left to do."""
        m = self.manager
        with m._changed:
            while self.state != "cancelled" and self.trained < self.rounds:
                if self in m._running:
                    return True
                m._changed.wait()
            return False

    def _wants_round(self) -> bool:
        """Whether to train another round now. When every subscriber has what it wants (all paused),
        the job gives its slot to the next in the queue; a subscriber wanting more re-queues it."""
        m = self.manager
        with m._lock:
            if self.state == "cancelled" or self.trained >= self.rounds or self not in m._running:
                return False
            if self.trained < self.demand():
                return True
            m._running.remove(self)
            self.state = "paused"
            m._pump()
            return False


class Subscription:
    """One session's view of a shared job: its own pause, step and leave. Pausing freezes what this
    session sees (`target`); the job trains while any subscriber wants more, and is cancelled when
    its last subscriber leaves. Anything else (runs, error, ...) is the job's."""

    def __init__(self, job: Job, alive: Callable[[], bool] | None = None):
        self.job = job
        self.alive = alive              # False once the session's page has gone (checked by the manager)
        self.target: int | None = None  # None: show every round; n: stop showing at round n
        self.left = False
        self.lost_since: float | None = None

    def __getattr__(self, name):
        if name == "job":
            raise AttributeError(name)
        return getattr(self.job, name)

    def shown(self) -> int:
        """Rounds this session sees."""
        return self.job.trained if self.target is None else min(self.job.trained, self.target)

    @property
    def state(self) -> str:
        j = self.job
        if self.left:
            return "cancelled"
        if j.state in ("failed", "cancelled"):
            return j.state
        if self.target is not None and j.trained >= self.target and self.target < j.rounds:
            return "paused"
        return "queued" if j.state == "paused" else j.state

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")

    # -- controls (any thread) -----------------------------------------------------

    def pause(self) -> None:
        with self.job.manager._lock:
            if self.target is None:
                self.target = self.job.trained
            self.job.manager._update(self.job)

    def resume(self) -> None:
        with self.job.manager._lock:
            self.target = None
            self.job.manager._update(self.job)

    def step(self, n: int = 1) -> None:
        """While paused: see exactly n more steps (trained now if nobody has yet), then pause again."""
        with self.job.manager._lock:
            if self.state != "paused":
                return
            self.target = min(self.shown() + n, self.job.rounds)
            self.job.manager._update(self.job)

    def cancel(self) -> None:
        """Leave: the job goes on for its other subscribers, and stops when none is left."""
        with self.job.manager._lock:
            if not self.left:
                self.left = True
                self.job.subscribers.remove(self)
                self.job.manager._update(self.job)

    def queue_position(self) -> int:
        return self.job.manager.queue_position(self.job)

    def snapshot(self, since: list[int] | None = None) -> dict:
        """Thread-safe copy of what this session sees: state, queue place, ETA and each run's steps after `since[i]`."""
        j, m = self.job, self.job.manager
        since = since or [0] * len(j.runs)
        with m._lock:
            shown = self.shown()
            wait_s, eta_s = m._eta(j)
            return {"state": self.state, "error": j.error, "queue_position": m.queue_position(j),
                    "wait_s": wait_s, "eta_s": eta_s, "others": len(j.subscribers) - (not self.left),
                    "runs": [{"label": r.recipe.label(), "steps": r.steps[s:min(shown, r.recipe.steps)],
                              "shown": min(shown, r.recipe.steps), "total": r.recipe.steps}
                             for r, s in zip(j.runs, since)]}


def _record(info: StepInfo) -> dict:
    """One step as plain data: losses, balance figures (worst layer) and per-layer shares."""
    max_over_mean = max(max(layer) / (sum(layer) / len(layer)) if sum(layer) else 0.0 for layer in info.load)
    dead = max(sum(1 for v in layer if v == 0) for layer in info.load)
    return {"step": info.step, "loss": info.ce_loss, "total_loss": info.loss, "eval_loss": info.eval_loss,
            "aux": info.aux, "load_balance": info.aux.get("load_balance"), "max_over_mean": max_over_mean,
            "dead_experts": dead, "tokens_per_s": info.tokens_per_s, "elapsed_s": info.elapsed_s,
            "top1_share": info.top1_share, "load": info.load, "bias": info.bias}


class JobManager:
    """Server-wide: at most `max_running` jobs hold a training slot; the rest queue (FIFO). A job
    is keyed by its recipes: a session asking for a job that exists (queued, training, paused or
    recently done) subscribes to it instead of starting another."""

    def __init__(self, max_running: int | None = None, threads: int | None = None):
        self.max_running = max_running or int(os.environ.get("MOE_LAB_MAX_JOBS", "1"))
        # one torch thread a job (set in its own thread: torch's setting is per thread, so the server's
        # routings keep theirs); nothing else slows a job for the routings: with one job training,
        # router updates kept p95 0.14 s (0.11 s idle; scripts/lab_class.py, docs/serving.md), and a
        # sleep of half a step's time after each step made steps 65 % slower to take 3 ms off a routing's median
        self.threads = threads or int(os.environ.get("MOE_LAB_TRAIN_THREADS", "1"))
        if self.max_running < 1 or self.threads < 1:
            raise ValueError("max_running and threads must be at least 1")
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)   # slots given, jobs cancelled: parked workers look
        self._running: list[Job] = []
        self._queue: list[Job] = []
        self._jobs: dict[str, Job] = {}     # by recipe key: unfinished jobs, and the last KEEP_DONE done
        self._sec_per_step: float | None = None   # the latest measured, for ETAs when nothing trains
        self._watching = False

    def submit(self, recipes: list[Recipe], alive: Callable[[], bool] | None = None) -> Subscription:
        """Subscribe to the job for these recipes (made if there is none). `alive()`: whether the
        asking session still has its page; a subscriber without one for LOST_AFTER_S leaves."""
        recipes = [r.validate() for r in recipes]
        with self._lock:
            job = self._jobs.get(recipe_key(recipes))
            if job is None or job.state in ("cancelled", "failed"):
                job = Job(recipes, self)
                self._jobs[job.key] = job
                self._queue.append(job)
            sub = Subscription(job, alive)
            job.subscribers.append(sub)
            self._update(job)
            if alive is not None and not self._watching:
                self._watching = True
                threading.Thread(target=self._watch, daemon=True, name="lab-watch").start()
        return sub

    def queue_position(self, job: Job) -> int:
        """0 when it holds a slot (or is paused or finished); 1 = next in line."""
        with self._lock:
            return self._queue.index(job) + 1 if job in self._queue else 0

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    # -- with the lock held ------------------------------------------------------------

    def _update(self, job: Job) -> None:
        """After a subscriber came, left, paused or asked for more: cancel, park or re-queue the job."""
        if job.finished:
            return
        if not job.subscribers:
            job.state = "cancelled"
            if job in self._queue:
                self._queue.remove(job)
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]
        elif job.state == "paused" and job.trained < job.demand():
            job.state = "queued"                 # resuming re-queues it, at the back
            self._queue.append(job)
        elif job.state == "queued" and job.trained >= job.demand():
            job.state = "paused"                 # paused while waiting: it needs no slot yet
            self._queue.remove(job)
        self._pump()

    def _pump(self) -> None:
        while self._queue and len(self._running) < self.max_running:
            job = self._queue.pop(0)
            self._running.append(job)
            job.state = "running"
            if job._thread is None:
                job._thread = threading.Thread(target=job._work, daemon=True, name=f"lab-job-{job.id}")
                job._thread.start()
        self._changed.notify_all()

    def _eta(self, job: Job) -> tuple[float | None, float | None]:
        """(seconds until the job starts, seconds until it is done), from the measured time per step
        of the jobs training now (or of the last one); None while nothing has been measured."""
        measured = [j.sec_per_round / len(j.runs) for j in self._running if j.sec_per_round]
        if measured:
            self._sec_per_step = sum(measured) / len(measured)
        per_step = self._sec_per_step
        if per_step is None or job.finished:
            return None, None

        def left(j):   # steps still to train, every run
            return (j.rounds - j.trained) * len(j.runs)

        own = left(job) * (job.sec_per_round / len(job.runs) if job.sec_per_round else per_step)
        if job not in self._queue:
            return 0.0, own
        ahead = sum(left(j) for j in self._running) + sum(left(j) for j in self._queue[:self._queue.index(job)])
        wait = ahead * per_step / self.max_running
        return wait, wait + own

    # -- from the workers and the watcher --------------------------------------------------

    def _release(self, job: Job) -> None:
        """A job's worker has ended (done, cancelled or failed): free its slot; keep the last done jobs."""
        with self._lock:
            if job in self._running:
                self._running.remove(job)
            if job in self._queue:
                self._queue.remove(job)
            if job.state != "done" and self._jobs.get(job.key) is job:
                del self._jobs[job.key]
            done = [k for k, j in self._jobs.items() if j.state == "done"]
            for k in done[:-KEEP_DONE]:
                del self._jobs[k]
            self._pump()

    def _watch(self) -> None:
        """Every WATCH_S: a subscriber whose page has been gone for LOST_AFTER_S leaves (Panel's
        session-destroyed hook comes only when the server discards the session: 5 min in the Procfile)."""
        while True:
            time.sleep(WATCH_S)
            with self._lock:
                subs = [s for j in self._jobs.values() if not j.finished for s in j.subscribers if s.alive]
                if not subs:
                    self._watching = False
                    return
            now = time.monotonic()
            for s in subs:
                try:
                    ok = s.alive()
                except Exception:  # a session torn down under us is gone
                    ok = False
                if ok:
                    s.lost_since = None
                elif s.lost_since is None:
                    s.lost_since = now
                elif now - s.lost_since >= LOST_AFTER_S:
                    s.cancel()


_manager: JobManager | None = None
_manager_lock = threading.Lock()


def manager() -> JobManager:
    """The process-wide job manager (shared by all sessions of a server)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = JobManager()
        return _manager


__all__ = ["Recipe", "RECIPES", "BALANCING", "Job", "JobManager", "Subscription", "manager", "status", "MAX_STEPS"]
