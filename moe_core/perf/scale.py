"""Scale it up: what more experts cost, measured on the machine this runs on.

A token visits top_k experts whatever N is, so the arithmetic of an MoE layer
per token is fixed by k (plus a router that grows by d_model weights per
expert); what grows with N is the memory holding the experts. Shazeer et al.
(2017, arXiv:1701.06538) and Switch Transformers (Fedus et al. 2021,
arXiv:2101.03961) scale parameters this way "at constant compute". This module
measures both sides on the real `MoELayer`:

    measure_scale()                  time per forward (median) and weight memory for each N
    start_background_measurement()   the same in a low-priority thread, once per process, cached on disk
    load_reference()                 a measurement shipped with the project (assets/scale/reference.json)

    python -m moe_core.perf.scale --out assets/scale/reference.json   re-measure the shipped reference

The sizes are small on purpose (a few seconds on one CPU thread) so the app can
measure the server it runs on while students use it. Like `moe-lab bench`
(whose helpers it reuses) it reports a median after a warm-up, but it
interleaves the sizes and counts the measuring thread's CPU time, so the
students' own requests do not bend the curve.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..model.checkpoint import ASSETS
from ..model.layer import DenseFFN, MoELayer
from .bench import interleaved_medians, machine
from .pages import describe, mallctl, pages_kept

ROOT = Path(__file__).resolve().parents[2]
CACHE_PATH = Path(os.environ.get("MOE_LAB_SCALE_CACHE", ROOT / "artifacts" / "scale_cache.json"))
REFERENCE_PATH = ASSETS / "scale" / "reference.json"
REFERENCE_LABEL = "this CI-class 2-core VM"

# Small enough for ~10 s on one thread of a 2-core VM, big enough that matmuls dominate the overhead.
DEFAULT_CONFIG = {"n_values": [2, 4, 8, 16, 32, 64], "top_k": 2, "d_model": 128, "d_ff": 256,
                  "tokens": 4096, "repeats": 7}
FORMAT = "moe-router-lab/scale/1"


def _check_config(n_values, top_k, d_model, d_ff, tokens, repeats) -> list[int]:
    ns = list(n_values)
    if not ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in ns):
        raise ValueError(f"n_values must be whole numbers >= 1, got {n_values!r}")
    if ns != sorted(set(ns)):
        raise ValueError(f"n_values must be increasing and distinct, got {n_values!r}")
    for name, v in (("top_k", top_k), ("d_model", d_model), ("d_ff", d_ff), ("tokens", tokens),
                    ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
    if top_k > ns[0]:
        raise ValueError(f"top_k = {top_k} is larger than the smallest N = {ns[0]}: a token cannot pick more "
                         f"experts than exist")
    return ns


def _load_avg() -> float | None:
    """The 1-minute load average when measuring: other work on the machine slows the timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def measure_scale(n_values=tuple(DEFAULT_CONFIG["n_values"]), *, top_k: int = DEFAULT_CONFIG["top_k"],
                  d_model: int = DEFAULT_CONFIG["d_model"], d_ff: int = DEFAULT_CONFIG["d_ff"],
                  tokens: int = DEFAULT_CONFIG["tokens"], repeats: int = DEFAULT_CONFIG["repeats"],
                  device: str = "cpu", progress=None) -> dict:
    """Time the MoE layer forward and count its weights for each N at fixed k, on this machine.

    For each N: a fresh `MoELayer(d_model, d_ff, N, top_k)` (softmax top-k,
    float32) runs `tokens` random tokens as one routing group; `ms` is the
    median over `repeats` interleaved rounds after a warm-up, in CPU time of
    the measuring thread (see `interleaved_medians`), with the thread's freed
    memory kept for reuse where the allocator allows (`pages.pages_kept`). Beside it, a dense SwiGLU
    FFN with the same ACTIVE expert width (d_ff = top_k * d_ff): the dense
    layer with the MoE's arithmetic per token. Weights are counted from the
    modules' tensors, never from a formula. `progress(done, total)` is called
    after each timing round. Returns a JSON-ready dict.
    """
    ns = _check_config(n_values, top_k, d_model, d_ff, tokens, repeats)
    dev = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model, device=dev)
    dense = DenseFFN(d_model, top_k * d_ff).to(dev).eval()
    layers = {}
    for n in ns:
        layers[n] = MoELayer(d_model, d_ff, n, top_k).to(dev).eval()
    fns = {"dense": lambda: dense(x), **{n: (lambda m=m: m(x)) for n, m in layers.items()}}
    # thread CPU time counts only this thread's work: right for one torch thread, not for more
    cpu_clock = dev.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if cpu_clock else time.perf_counter
    with pages_kept() as kept:          # else the allocator's page faults bend the curve (moe_core/perf/pages.py)
        ms = interleaved_medians(fns, repeats, dev, clock, on_round=progress)
    bytes_per = x.element_size()
    rows = []
    for n, layer in layers.items():
        total = _params(layer)
        # per token: the whole router (it scores every expert) + top_k experts' weights
        active = _params(layer.router) + top_k * layer.experts.params_per_expert()
        rows.append({"n_experts": n, "ms": round(ms[n], 3), "total_params": total,
                     "active_params_per_token": active, "weight_mb": round(total * bytes_per / 2**20, 6),
                     "active_weight_mb": round(active * bytes_per / 2**20, 6)})
    dense_params = _params(dense)
    del layers, fns
    return {
        "format": FORMAT,
        "kind": "measured",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"n_values": ns, "top_k": top_k, "d_model": d_model, "d_ff": d_ff, "tokens": tokens,
                   "repeats": repeats, "device": str(dev), "dtype": "float32", "scheme": "softmax_topk",
                   "clock": "CPU time of the measuring thread" if cpu_clock else "wall time"},
        "machine": {**machine(), "load_avg_1min": _load_avg(), "freed_pages": describe(kept)},
        "dense": {"ms": round(ms["dense"], 3), "params": dense_params, "d_ff": top_k * d_ff,
                  "weight_mb": round(dense_params * bytes_per / 2**20, 6)},
        "rows": rows,
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }


def summary(result: dict) -> dict:
    """Smallest vs largest N: how much memory and time grew (the two numbers the view states)."""
    rows = result["rows"]
    a, b = rows[0], rows[-1]
    return {"n_from": a["n_experts"], "n_to": b["n_experts"],
            "memory_ratio": b["weight_mb"] / a["weight_mb"],
            "time_ratio": b["ms"] / a["ms"] if a["ms"] > 0 else math.nan,
            "active_ratio": b["active_params_per_token"] / a["active_params_per_token"]}


# ----------------------------------------------------------------------------- files


def _valid(doc) -> bool:
    try:
        return (doc.get("format") == FORMAT and isinstance(doc["rows"], list) and len(doc["rows"]) > 0
                and all(r["ms"] > 0 and r["weight_mb"] > 0 for r in doc["rows"]) and doc["dense"]["ms"] > 0)
    except (AttributeError, KeyError, TypeError):
        return False


def read_result(path: str | Path) -> dict | None:
    """A saved measurement, or None when the file is missing, too big or not one of ours."""
    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size > 1_000_000:
            return None
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if _valid(doc) else None


def write_result(result: dict, path: str | Path) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load_reference(path: str | Path = REFERENCE_PATH) -> dict | None:
    """The measurement shipped with the project (labelled with where and when it was made)."""
    return read_result(path)


def _same_setup(doc: dict, config: dict) -> bool:
    """A cached result counts only for the same sizes, CPU, core count, torch version and handling of
    freed memory (a cache made before that was recorded is measured again)."""
    here = machine()
    m, c = doc.get("machine", {}), doc.get("config", {})
    return (all(c.get(k) == v for k, v in config.items())
            and m.get("processor") == here["processor"] and m.get("cpu_threads") == here["cpu_threads"]
            and m.get("torch") == here["torch"] and m.get("freed_pages") == describe(mallctl() is not None))


# ----------------------------------------------------------------------------- background


class ScaleRunner:
    """Measures once per process in a background thread, or reuses a cached measurement.

    The thread uses ONE torch thread (torch's thread count is per calling
    thread with the OpenMP backend, so routing for the students is untouched)
    and lowers its own scheduling priority (on Linux `os.nice` applies to the
    calling thread only), so a class using the server is barely slowed.
    """

    def __init__(self, cache_path: str | Path = CACHE_PATH, config: dict | None = None, nice: int = 10):
        self.cache_path = Path(cache_path)
        self.config = dict(DEFAULT_CONFIG if config is None else config)
        self.config["n_values"] = list(self.config["n_values"])
        _check_config(**self.config)
        self.nice = nice
        self._lock = threading.Lock()
        self._state, self._result, self._error = "idle", None, ""
        self._progress = (0, self.config["repeats"])
        self._started_at: str | None = None
        self._thread: threading.Thread | None = None

    def status(self) -> dict:
        """{"state": idle | running | done | failed, "result", "error", "progress": (rounds done, rounds), "started_at",
        "cached": whether the result came from the cache file}."""
        with self._lock:
            return self._status()

    def start(self) -> dict:
        """Start measuring unless it is running, done or failed already (then nothing happens)."""
        with self._lock:
            if self._state != "idle":
                return self._status()
            cached = read_result(self.cache_path)
            if cached is not None and _same_setup(cached, self.config):
                self._state, self._result = "done", {**cached, "from_cache": True}
                return self._status()
            self._state = "running"
            self._started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._thread = threading.Thread(target=self._work, daemon=True, name="moe-scale-measurement")
            self._thread.start()
            return self._status()

    def _status(self) -> dict:
        return {"state": self._state, "result": self._result, "error": self._error, "progress": self._progress,
                "started_at": self._started_at, "cached": bool(self._result and self._result.get("from_cache"))}

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the measurement ends (for scripts and tests)."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return self.status()

    def _on_progress(self, done: int, total: int) -> None:
        with self._lock:
            self._progress = (done, total)

    def _work(self) -> None:
        try:
            if self.nice:
                try:
                    os.nice(self.nice)          # this thread only (Linux)
                except (OSError, AttributeError):
                    pass
            torch.set_num_threads(1)            # this thread only (OpenMP backend)
            result = measure_scale(**self.config, progress=self._on_progress)
            try:
                write_result(result, self.cache_path)
            except OSError:
                pass                            # a read-only checkout: keep the result in memory
            with self._lock:
                self._state, self._result = "done", result
        except Exception as e:                  # noqa: BLE001 - reported to the view, never raised in a thread
            with self._lock:
                self._state, self._error = "failed", f"{type(e).__name__}: {e}"


_runner: ScaleRunner | None = None
_runner_lock = threading.Lock()


def default_runner() -> ScaleRunner:
    """The one runner of this process (shared by every session)."""
    global _runner
    with _runner_lock:
        if _runner is None:
            _runner = ScaleRunner()
        return _runner


def start_background_measurement() -> dict:
    """Measure this server once per process (or reuse artifacts/scale_cache.json); returns the status."""
    return default_runner().start()


def measurement_status() -> dict:
    return default_runner().status()


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m moe_core.perf.scale", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REFERENCE_PATH),
                   help="where to write the JSON (default: the shipped reference)")
    p.add_argument("--label", default=REFERENCE_LABEL, help="where it was measured, shown in the app")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure_scale(**DEFAULT_CONFIG)
    result["kind"] = "reference"
    result["label"] = args.label
    write_result(result, args.out)
    s = summary(result)
    print(f"dense FFN {result['dense']['ms']} ms; " + ", ".join(f"N={r['n_experts']}: {r['ms']} ms {r['weight_mb']} MB"
                                                               for r in result["rows"]))
    print(f"N {s['n_from']} -> {s['n_to']}: memory x{s['memory_ratio']:.1f}, time x{s['time_ratio']:.2f} "
          f"({result['elapsed_s']} s); wrote {args.out}")
    return 0


__all__ = ["measure_scale", "summary", "ScaleRunner", "start_background_measurement", "measurement_status",
           "default_runner", "load_reference", "read_result", "write_result", "CACHE_PATH", "REFERENCE_PATH",
           "DEFAULT_CONFIG"]


if __name__ == "__main__":
    raise SystemExit(main())

