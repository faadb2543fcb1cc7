"""`moe-lab bench`: measured, not asserted.

1. layer: the MoE layer forward (k = 2, d_model 256, expert d_ff 512, 8192
   tokens) for N in 4..256 experts, against a dense SwiGLU FFN with the same
   ACTIVE parameters (d_ff = k * 512). Compute per token follows k, so the MoE
   time should stay flat as N grows; what grows is the memory holding the
   experts, and at large N the cost left is reading those weights once. We
   report that memory-bandwidth floor from a measured read bandwidth.
2. train: training tokens/s of the default model (the 10k tokens/s goal on 2 cores).
3. route: server-side routing of a 512-token text through the shipped model.
4. generate: greedy decoding tokens/s of the shipped model on ONE thread, with the KV cache and
   without (the goal: 100 tokens/s with it).
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ..data.corpus import load_text
from ..data.tokenizer import get_tokenizer
from ..data.tokens import load_token_data
from ..generate import generate
from ..inference import route_text
from ..model.checkpoint import load
from ..model.layer import DenseFFN, MoELayer, expert_loop, pick_device
from ..train.loop import make_configs, train
from .experts import PARALLEL_MIN_EXPERTS, PARALLEL_MIN_ROWS, run_experts

# Reference figures quoted in the project's issue: HF transformers' eager Mixtral
# expert loop on this kind of 2-core machine, 8192 tokens, d_model 256, d_ff 512, k = 2,
# float32 (not measured by this script; `hf_baseline` measures the real block here).
HF_MIXTRAL_EAGER_MS = {8: 95.0, 64: 124.0, 256: 255.0}

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory(trim_mb: int = 1024) -> str:
    """Have glibc's malloc keep freed memory for the next forward pass instead of returning it to the OS.

    Why: with glibc's defaults a forward pass over 8192 tokens gave its temporaries back to the OS
    when they were freed, and the next pass page-faulted them in again: a block above the mmap
    threshold (adaptive, 128 KiB to 32 MiB) is unmapped when freed, and the top of the heap is
    trimmed once it holds more free memory than twice that threshold. Measured: 8,000-15,000 page
    faults and 16-25 ms of kernel time per MoE forward, and 33,000 faults per dense FFN forward (its
    [8192, 2048] hidden state is 64 MB, above any mmap threshold glibc accepts) — 30-40 ms of its
    ~90 ms. So big blocks come from the heap too (M_MMAP_MAX 0) and the heap is trimmed only
    past `trim_mb`. A long-running process (a server, a training loop) reuses that memory; this is
    the glibc setting for it, the effect PyTorch's CPU tuning guide gets by preloading jemalloc or
    tcmalloc. It applies to the whole process, so every configuration timed (ours, the dense FFN,
    the HF baseline) gets it alike. Returns what was set ("" where the C library is not glibc)."""

    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_mb << 20) and libc.mallopt(_M_MMAP_MAX, 0)
    except (OSError, AttributeError):
        return ""
    if not ok:
        return ""
    return f"glibc malloc keeps freed memory (M_TRIM_THRESHOLD {trim_mb} MiB, M_MMAP_MAX 0: big blocks from the heap)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, repeats: int) -> float:
    """Median wall time in ms over `repeats` runs, after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def interleaved_times(fns: dict, repeats: int, device: torch.device, clock=time.perf_counter,
                      on_round=None) -> dict:
    """ms of each fn in each of `repeats` rounds; every round runs every fn once, in turn.

    Unlike `timeit` (one fn, back to back), rounds interleave the configurations, so a burst of
    other work on a shared machine (this one shares its cores: up to 50 % steal time seen) slows
    all of them alike instead of bending the curve at one N, and a ratio taken within a round
    compares two configurations under the same conditions.
    """
    for fn in fns.values():                             # warm-up, as timeit does
        fn()
    _sync(device)
    times: dict = {key: [] for key in fns}
    for r in range(repeats):
        for key, fn in fns.items():
            t = clock()
            fn()
            _sync(device)
            times[key].append((clock() - t) * 1e3)
        if on_round is not None:
            on_round(r + 1, repeats)
    return times


def interleaved_medians(fns: dict, repeats: int, device: torch.device, clock=time.perf_counter,
                        on_round=None) -> dict:
    """Median ms of each fn over `repeats` interleaved rounds (see `interleaved_times`)."""
    return {key: statistics.median(v) for key, v in interleaved_times(fns, repeats, device, clock, on_round).items()}


def paired_ratio(times: dict, a, b) -> float:
    """Median over rounds of time(a) / time(b), each ratio taken within one round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def read_bandwidth_gbs(device: torch.device, mb: int = 256) -> float:
    """Measured memory read bandwidth: sum over a large float32 tensor."""
    x = torch.ones(mb * 1024 * 1024 // 4, device=device)
    ms = timeit(lambda: x.sum(), device, 5)
    return (x.numel() * 4 / 1e9) / (ms / 1e3)


def machine() -> dict:
    d = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
         "cpu_threads": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": _cpu_name()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class HFStyleEagerMoE(torch.nn.Module):
    """The fallback baseline where transformers is not installed: our transcription of the eager
    expert loop of Hugging Face transformers' Mixtral sparse-MoE block (softmax -> top-k ->
    renormalise; one_hot expert mask; a Python loop over the experts that got tokens;
    w2(silu(w1 x) * w3 x) with separate Linear layers). For timing only; not used by the app.
    `hf_baseline` gives it a layer's weights."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, k: int):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(d_model, n_experts, bias=False)
        self.w1 = torch.nn.ModuleList(torch.nn.Linear(d_model, d_ff, bias=False) for _ in range(n_experts))
        self.w3 = torch.nn.ModuleList(torch.nn.Linear(d_model, d_ff, bias=False) for _ in range(n_experts))
        self.w2 = torch.nn.ModuleList(torch.nn.Linear(d_ff, d_model, bias=False) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(dim=-1, dtype=torch.float)
        weights, chosen = probs.topk(self.k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(chosen, num_classes=len(self.w1)).permute(2, 1, 0)
        for e in torch.nonzero(mask.sum(dim=(-1, -2)) > 0).flatten().tolist():
            slot, tok = torch.where(mask[e])
            h = x[tok]
            h = self.w2[e](torch.nn.functional.silu(self.w1[e](h)) * self.w3[e](h)) * weights[tok, slot, None]
            out.index_add_(0, tok, h)
        return out


@torch.no_grad()
def hf_baseline(layer: MoELayer) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The baseline the issue names, holding `layer`'s weights, so both route every token alike and
    give each expert the same tokens: Hugging Face transformers' `MixtralSparseMoeBlock` with its
    experts in the eager loop, where transformers is installed (`pip install -e ".[bench]"`), else
    `HFStyleEagerMoE`. Returns (a function of x [T, d_model], what it is). Only a layer that computes
    what Mixtral's block does has one: softmax top-k, renormalised, SwiGLU, no shared experts."""
    if (layer.scheme, layer.experts.activation, layer.n_shared) != ("softmax_topk", "swiglu", 0) \
            or layer.router_options.get("normalize", True) is not True:
        raise ValueError("the HF Mixtral baseline computes softmax top-k (renormalised) with SwiGLU experts "
                         "and no shared experts; this layer computes something else")
    ex, f, device = layer.experts, layer.d_ff, layer.router.weight.device
    try:  # transformers is an optional benchmark dependency, deferred on purpose
        import transformers
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        hf = HFStyleEagerMoE(layer.d_model, f, layer.n_experts, layer.top_k).to(device, ex.w_in.dtype)
        hf.gate.weight.copy_(layer.router.weight)
        for e in range(layer.n_experts):
            hf.w1[e].weight.copy_(ex.w_in[e, :, :f].T)
            hf.w3[e].weight.copy_(ex.w_in[e, :, f:].T)
            hf.w2[e].weight.copy_(ex.w_out[e].T)
        return hf.eval(), "HF-style eager loop (our transcription; transformers is not installed)"
    cfg = MixtralConfig(hidden_size=layer.d_model, intermediate_size=f, num_local_experts=layer.n_experts,
                        num_experts_per_tok=layer.top_k, hidden_act="silu")
    cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg).to(device, ex.w_in.dtype).eval()
    block.gate.weight.copy_(layer.router.weight)
    block.experts.gate_up_proj.copy_(ex.w_in.transpose(1, 2))    # [N, 2 d_ff, d_model], gate rows first
    block.experts.down_proj.copy_(ex.w_out.transpose(1, 2))      # [N, d_model, d_ff]

    # the block takes [B, T, d_model]
    return (lambda x: block(x[None])[0]), f"transformers {transformers.__version__} MixtralSparseMoeBlock, eager experts"


@torch.no_grad()
def bench_layer(n_experts=(4, 8, 16, 64, 256), *, k=2, d_model=256, d_ff=512, tokens=8192,
                device="cpu", repeats=7, dtype=torch.float32) -> dict:
    """Every configuration (dense, and per N our layer, its router alone, the HF baseline) is
    timed once per round over `repeats` interleaved rounds: times are medians over rounds, ratios
    medians of the ratios taken within each round (see `interleaved_times`)."""
    device = pick_device(device)
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype)
    dense = DenseFFN(d_model, k * d_ff).to(device, dtype).eval()
    bw = read_bandwidth_gbs(device)
    fns, layers = {"dense": lambda: dense(x)}, {}
    for N in n_experts:
        layer = layers[N] = MoELayer(d_model, d_ff, N, k).to(device, dtype).eval()
        hf, hf_label = hf_baseline(layer)
        fns[("moe", N)] = lambda layer=layer: layer(x)
        fns[("hf", N)] = lambda hf=hf: hf(x)
        fns[("route", N)] = lambda layer=layer: layer.route(x)
    times = interleaved_times(fns, repeats, device)
    # the issue's HF figures are for this configuration only
    quoted_config = (k, d_model, d_ff, tokens, device.type, dtype) == (2, 256, 512, 8192, "cpu", torch.float32)
    med = {key: statistics.median(v) for key, v in times.items()}
    dense_ms = med["dense"]
    rows = []
    for N, layer in layers.items():
        ms = med[("moe", N)]
        weight_bytes = (layer.experts.w_in.numel() + layer.experts.w_out.numel()) * x.element_size()
        rows.append({
            "n_experts": N, "ms": round(ms, 2), "route_ms": round(med[("route", N)], 2),
            "over_dense": round(paired_ratio(times, ("moe", N), "dense"), 3),
            "expert_weights_mb": round(weight_bytes / 2**20, 1),
            "weight_read_floor_ms": round(weight_bytes / 1e9 / bw * 1e3, 2),
            "hf_ms": round(med[("hf", N)], 2),
            "over_hf": round(paired_ratio(times, ("moe", N), ("hf", N)), 3),
            "hf_mixtral_eager_ms_quoted": HF_MIXTRAL_EAGER_MS.get(N) if quoted_config else None,
        })
    by_n = {r["n_experts"]: r for r in rows}
    ratios = {}
    if 64 in by_n:
        ratios["moe64_over_dense"] = by_n[64]["over_dense"]
    if 256 in by_n and 8 in by_n:
        ratios["n256_over_n8"] = round(paired_ratio(times, ("moe", 256), ("moe", 8)), 3)
        ratios["n256_extra_ms"] = round(by_n[256]["ms"] - by_n[8]["ms"], 2)
        ratios["n256_extra_weight_read_ms"] = round(by_n[256]["weight_read_floor_ms"] - by_n[8]["weight_read_floor_ms"], 2)
    return {"config": {"k": k, "d_model": d_model, "d_ff": d_ff, "tokens": tokens, "device": str(device),
                       "dtype": str(dtype).replace("torch.", ""), "rounds": repeats},
            "dense_ms": round(dense_ms, 2), "read_bandwidth_gbs": round(bw, 1), "hf_baseline": hf_label,
            "moe": rows, "ratios": ratios}


@torch.no_grad()
def bench_grouped_mm(n_experts=(8, 256), *, k=2, d_model=256, d_ff=512, tokens=8192, repeats=7) -> dict:
    """The routed experts alone on the CPU (routing done once, untimed): `run_experts` as it runs here
    (threads from PARALLEL_MIN_EXPERTS experts on, else one expert at a time) against the same function
    made to use torch.nn.functional.grouped_mm, and against DeepSeek's loop (`expert_loop`), in
    interleaved rounds (`interleaved_times`). `scripts/bench_grouped_mm.py` runs it."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model)
    fns, paths = {}, {}
    for N in n_experts:
        layer = MoELayer(d_model, d_ff, N, k).eval()
        r = layer.route(x)
        a = (layer.experts, x, r.indices, r.weights)
        fns[("ours", N)] = lambda a=a: run_experts(*a)
        fns[("grouped_mm", N)] = lambda a=a: run_experts(*a, grouped_mm=True)
        fns[("loop", N)] = lambda a=a: expert_loop(*a)
        active, pairs = len(r.indices[r.indices >= 0].unique()), int((r.indices >= 0).sum())
        on_threads = torch.get_num_threads() > 1 and active >= PARALLEL_MIN_EXPERTS and pairs >= PARALLEL_MIN_ROWS
        paths[N] = f"threads ({torch.get_num_threads()})" if on_threads else "one expert at a time"
    times = interleaved_times(fns, repeats, cpu)
    rows = []
    for N in n_experts:
        med = {f"{key}_ms": round(statistics.median(times[(key, N)]), 1) for key in ("ours", "grouped_mm", "loop")}
        rows.append({"n_experts": N, "path": paths[N], **med,
                     "grouped_mm_over_ours": round(paired_ratio(times, ("grouped_mm", N), ("ours", N)), 3),
                     "loop_over_ours": round(paired_ratio(times, ("loop", N), ("ours", N)), 3)})
    return {"config": {"k": k, "d_model": d_model, "d_ff": d_ff, "tokens": tokens, "device": "cpu",
                       "dtype": "float32", "rounds": repeats}, "machine": machine(), "experts": rows}


def bench_train(preset: str = "moe-n8", steps: int = 12, device: str = "cpu") -> dict:
    """Training tokens/s of a preset's model on the real corpus (median over steps after warm-up)."""

    model_cfg, cfg, _ = make_configs(preset, steps=steps, eval_interval=0, eval_batches=1, device=device)
    stamps = []
    res = train(model_cfg, cfg, data=load_token_data(), callback=lambda info: stamps.append(info.elapsed_s))
    per_step = [b - a for a, b in zip(stamps[2:], stamps[3:])]  # skip warm-up steps
    tokens = cfg.batch_size * model_cfg.block_size
    med = statistics.median(per_step)
    return {"preset": preset, "steps": steps, "tokens_per_step": tokens, "step_ms": round(med * 1e3, 1),
            "tokens_per_s": round(tokens / med), "final_loss": round(res.history[-1]["ce_loss"], 3)}


def bench_route(model_name: str = "moe-n8", n_tokens: int = 512, repeats: int = 7) -> dict:
    """Server-side routing latency of a text of `n_tokens` tokens through the shipped model."""

    tok = get_tokenizer()
    toks = tok.tokenize(load_text("eval")[:20000])[:n_tokens]
    text = load_text("eval")[: toks[-1].end]
    m = load(model_name)
    out = {"model": model_name, "tokens": len(tok.tokenize(text))}
    for scheme in ("softmax_topk", "switch", "expert_choice", "base"):
        out[f"{scheme}_ms"] = round(timeit(lambda: route_text(m, text, scheme=scheme), torch.device("cpu"), repeats), 1)
    return out


def bench_generate(model_name: str = "moe-n8", prompt: str = "Once upon a time", new_tokens: int = 128,
                   repeats: int = 3) -> dict:
    """Greedy generation on ONE thread (torch.set_num_threads(1), put back after): `new_tokens` tokens after
    a short prompt, with the KV cache and without it (every step runs the whole sequence again), in
    interleaved rounds (`interleaved_times`). tokens/s = new tokens / median time of a whole generation,
    the prompt's prefill included. Both paths must write the same tokens (`same_tokens`)."""
    m = load(model_name)
    written: dict[bool, list[int]] = {}

    def run(use_cache: bool) -> None:
        written[use_cache] = [t.id for t in generate(m, prompt, max_new_tokens=new_tokens, use_cache=use_cache)
                              if t.phase == "decode"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = interleaved_times({"cached": lambda: run(True), "uncached": lambda: run(False)}, repeats,
                                  torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    per_s = {key: round(new_tokens / (statistics.median(v) / 1e3), 1) for key, v in times.items()}
    return {"model": model_name, "prompt_tokens": len(get_tokenizer().encode(prompt)), "new_tokens": new_tokens,
            "threads": 1, "sampling": "greedy", "rounds": repeats,
            "cached_tokens_per_s": per_s["cached"], "uncached_tokens_per_s": per_s["uncached"],
            "cache_speedup": round(paired_ratio(times, "uncached", "cached"), 2),
            "same_tokens": written[True] == written[False]}


def free_bytes() -> int:
    """Memory the OS can give this process now (MemAvailable), or a large number where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 1 << 62


def check_memory(need: int, what: str) -> None:
    """Refuse work whose estimated memory is over half of what is free, before allocating any of it."""
    free = free_bytes()
    if need > free // 2:
        raise ValueError(f"{what} needs about {need / 2**30:,.1f} GiB and {free / 2**30:,.1f} GiB is free: "
                         f"choose fewer experts or tokens")


def run_bench(args) -> int:
    pick_device(args.device)                  # a device this machine lacks fails before any work
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"layer", "train", "route", "generate"}
    if unknown:
        raise ValueError(f"unknown part(s) to skip: {', '.join(sorted(unknown))}; use layer, train, route or generate")
    try:
        ns = tuple(int(n) for n in args.experts.split(","))
    except ValueError:
        raise ValueError(f"--experts must be comma-separated whole numbers, got {args.experts!r}") from None
    if any(not 1 <= n <= 4096 for n in ns):
        raise ValueError("--experts values must be whole numbers from 1 to 4,096")
    repeats = 2 if args.quick else args.repeats
    if args.quick:
        ns = tuple(n for n in ns if n <= 16) or ns[:1]
    if "layer" not in skip:   # weights of every N at once, and the biggest pass's activations (float32, k = 2)
        check_memory(4 * (sum(ns) * 256 * 3 * 512 + args.tokens * (256 + 2 * 4 * 512) * 4), "this benchmark")
    malloc = "the C library's defaults" if args.malloc_defaults else (keep_freed_memory() or "the C library's defaults")
    result = {"machine": {**machine(), "malloc": malloc}}
    if "layer" not in skip:
        result["layer"] = bench_layer(ns, tokens=args.tokens, device=args.device, repeats=repeats)
        dev = pick_device(args.device)
        if dev.type == "cuda":
            result["layer_bf16"] = bench_layer(ns, tokens=args.tokens, device=args.device, repeats=repeats,
                                               dtype=torch.bfloat16)
    if "train" not in skip:
        result["train"] = bench_train(steps=6 if args.quick else 12, device=args.device)
    if "route" not in skip:
        result["route"] = bench_route(repeats=repeats)
    if "generate" not in skip:
        result["generate"] = bench_generate(repeats=repeats)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_format(result))
    return 0


def _format(r: dict) -> str:
    m = r["machine"]
    lines = [f"machine: {m['processor']}, {m['cpu_threads']} CPU threads (torch uses {m['torch_threads']}), "
             f"torch {m['torch']}" + (f", GPU {m['gpu']}" if "gpu" in m else "") + f"; malloc: {m['malloc']}"]
    for key in ("layer", "layer_bf16"):
        if key not in r:
            continue
        L = r[key]
        c = L["config"]
        lines.append(f"\nMoE layer forward, {c['tokens']} tokens, d_model {c['d_model']}, expert d_ff {c['d_ff']}, "
                     f"k={c['k']}, {c['device']} {c['dtype']}; dense FFN (d_ff {c['k'] * c['d_ff']}) {L['dense_ms']} ms; "
                     f"read bandwidth {L['read_bandwidth_gbs']} GB/s")
        lines.append(f"{'N':>5} {'ms':>8} {'/dense':>7} {'route ms':>9} {'weights MB':>11} {'read floor ms':>14} "
                     f"{'HF here ms':>11} {'/HF':>6} {'HF quoted':>10}")
        for row in L["moe"]:
            hf = row["hf_mixtral_eager_ms_quoted"]
            lines.append(f"{row['n_experts']:>5} {row['ms']:>8} {row['over_dense']:>7} {row['route_ms']:>9} "
                         f"{row['expert_weights_mb']:>11} {row['weight_read_floor_ms']:>14} "
                         f"{row['hf_ms']:>11} {row['over_hf']:>6} {hf if hf else '':>10}")
        lines.append(f"  HF here: {L['hf_baseline']}, same weights and input, timed in the same rounds")
        lines.append(f"  ({c['rounds']} interleaved rounds: times are medians over rounds, ratios medians of "
                     f"within-round ratios)")
        for k_, v in L["ratios"].items():
            lines.append(f"  {k_}: {v}")
    if "train" in r:
        t = r["train"]
        lines.append(f"\ntraining {t['preset']}: {t['tokens_per_s']:,} tokens/s ({t['step_ms']} ms per {t['tokens_per_step']}-token step)")
    if "route" in r:
        lines.append("\nrouting a text: " + ", ".join(f"{k_} {v}" for k_, v in r["route"].items()))
    if "generate" in r:
        g = r["generate"]
        lines.append(f"\ngenerating with {g['model']} ({g['sampling']}, {g['threads']} thread, {g['new_tokens']} new tokens "
                     f"after a {g['prompt_tokens']}-token prompt, {g['rounds']} rounds): "
                     f"{g['cached_tokens_per_s']:,} tokens/s with the KV cache, {g['uncached_tokens_per_s']:,} without "
                     f"({g['cache_speedup']}x); same tokens: {'yes' if g['same_tokens'] else 'NO'}")
    return "\n".join(lines)
