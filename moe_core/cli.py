"""`moe-lab`: the command line of MoE Router Lab (also `python -m moe_core`).

    moe-lab params --model mixtral-8x7b --json     total vs active parameters
    moe-lab params --list                          every model it knows
    moe-lab route "def f(x): return 42" --json     route text through a trained model
    moe-lab generate "Once upon a" --json          the model writes on, token by token, with each token's experts
    moe-lab models --json                          the shipped checkpoints
    moe-lab experiment --list                      guided experiments: is there a code expert? ...
    moe-lab train --preset moe-n8                  reproduce a checkpoint
    moe-lab corpus                                 rebuild the corpus and tokenizer
    moe-lab bench --json                           MoE layer vs dense FFN timings
    moe-lab serve                                  the dashboard on http://localhost:5006

Bad input gives one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# The commands import the package's modules inside their functions, on purpose: they all import torch
# (about 1 s), which argument parsing, --help and a usage error never need.


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block too; we want one line
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _int_in(lo: int, hi: int):
    """An argparse type: a whole number from lo to hi (every count is decided before any work starts)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo:,} to {hi:,}, got {v:,}")
        return v
    return parse


_positive_int = _int_in(1, 4096)                # k, N, processes: far above any model here
MAX_THREADS = 4 * (os.cpu_count() or 1)         # more threads than that only thrash (1,000 ran 6x slower)


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a name, got an empty string")
    return text


def writable_dir(path: Path, flag: str) -> Path:
    """`path` as a directory this process can write to (made if missing), checked before any work."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"moe-lab: {flag} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UsageError(f"moe-lab: {flag} {path} cannot be written to ({e.strerror or e})") from None
    return path


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


# ----------------------------------------------------------------------------- params


def cmd_params(args) -> int:
    from .model import published

    if args.list:
        rows = [published.compute(name).as_dict() for name in published.published_models()]
        shipped = _shipped_names()
        if args.json:
            print(json.dumps({"published": rows, "shipped": shipped}, indent=2))
        else:
            print(f"{'model':22} {'total':>10} {'active':>10}  source")
            for r in rows:
                print(f"{r['model']:22} {_human(r['total']):>10} {_human(r['active_per_token']):>10}  {r['source']}")
            print("shipped checkpoints (counted from the loaded module): " + ", ".join(shipped))
        return 0
    if not args.model:
        raise UsageError("moe-lab params: give --model NAME or --list (see moe-lab params --help)")
    if args.model in published.published_models():
        if args.top_k is not None:
            raise UsageError("moe-lab params: --top-k applies to the shipped checkpoints, not to published models")
        d = published.compute(args.model).as_dict()
        d["memory_bytes"] = {dt: published.memory_bytes(d["total"], dt) for dt in ("fp32", "bf16", "fp8")}
    else:
        from .model.checkpoint import load
        from .model.params import count_params, memory_bytes

        m = load(args.model)
        r = count_params(m.model, top_k=args.top_k)
        d = {"model": args.model, "total": r.total, "active_per_token": r.active_per_token,
             "published_total": None, "published_active_per_token": None,
             "source": "counted from the loaded PyTorch module", **r.as_dict(),
             "memory_bytes": {dt: memory_bytes(r.total, dt) for dt in ("fp32", "bf16", "fp8")}}
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        active = d["active_per_token"]
        print(f"{d['model']}: total {_human(d['total'])} ({d['total']:,}), active per token "
              f"{_human(active)} ({active:,}), {active / d['total']:.1%} active")
        if d.get("published_total"):
            act = _human(d["published_active_per_token"]) if d["published_active_per_token"] else "not published"
            print(f"published: total {_human(d['published_total'])}, active {act} ({d['source']})")
        print("memory for the weights: " + ", ".join(f"{dt} {v / 2**30:.1f} GiB" for dt, v in d["memory_bytes"].items()))
    return 0


def _shipped_names() -> list[str]:
    from .model.checkpoint import list_checkpoints

    return [d["name"] for d in list_checkpoints()]


# ----------------------------------------------------------------------------- models / route


def cmd_models(args) -> int:
    from .model.checkpoint import list_checkpoints

    rows = list_checkpoints()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no checkpoints found; train one with: moe-lab train --preset moe-n8")
    for d in rows:
        c, card = d["config"], d["card"]
        loss = card.get("eval_loss")
        print(f"{d['name']:18} N={c['n_experts']:<3} {c['scheme']:13} k={c['top_k']}  "
              f"held-out loss {loss:.3f}  {d['recipe'].get('description', '')}" if loss is not None else d["name"])
    return 0


def _resolve_model_name(args) -> str:
    if args.model and args.experts:
        raise UsageError("moe-lab route: give --model or --experts, not both")
    if args.experts:
        name = f"moe-n{args.experts}"
        names = _shipped_names()
        if name not in names:
            ns = sorted(int(n[5:]) for n in names if n[5:].isdigit())
            raise UsageError(f"moe-lab route: no trained model with {args.experts} experts; "
                             f"choose --experts from {', '.join(map(str, ns))}")
        return name
    return args.model or "moe-n8"


def cmd_route(args) -> int:
    import torch

    from .inference import MAX_TOKENS, route_text
    from .model.checkpoint import load
    from .model.layer import pick_device
    from .model.request import RoutingRequest

    text = sys.stdin.read() if args.text == "-" else args.text
    if args.expert_parallel:  # experts spread over P torchrun processes (moe_core/parallel/expert_parallel.py)
        from .parallel.expert_parallel import cmd_route as route_expert_parallel

        return route_expert_parallel(args, text, _resolve_model_name(args), _route_table)
    device = pick_device(args.device)
    model = load(_resolve_model_name(args), device=device)
    request = RoutingRequest.make(model.config, args.scheme, args.top_k, args.capacity_factor)
    torch.manual_seed(args.seed or 0)         # random routing draws from torch's generator: repeatable
    res = route_text(model, text, request, max_tokens=MAX_TOKENS)
    if args.json:
        from .analysis.export import (
            trace_json,  # one code path with the dashboard's JSON download
        )

        out = trace_json(res, model)
        if not _encodable(out):               # a terminal that cannot show the text: JSON's own \u escapes
            out = json.dumps(json.loads(out))
    else:
        out = _route_table(res, model)
    print(out)
    return 0


def _encodable(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def _route_table(res, model) -> str:
    layers = [res.layer_dict(i) for i in range(len(res.routings))]
    info = model.info()
    lines = [f"model {info['name']} (N={info['n_experts']}, trained: {info['trained']}, recipe: {info['recipe']}), "
             f"scheme {res.scheme}" + (f", k={res.top_k}" if res.top_k else "")
             + (f", capacity factor {res.capacity_factor}" if res.capacity_factor else "")]
    head = f"{'#':>4}  {'token':16}" + "".join(f"  {'layer ' + str(i):22}" for i in range(len(layers)))
    lines += [head, "-" * len(head)]
    for t, tok in enumerate(res.tokens):
        shown = json.dumps(tok.text, ensure_ascii=True)[1:-1][:16]
        cells = []
        for L in layers:
            cell = " ".join(f"{e}({w:.2f})" for e, w in zip(L["experts"][t], L["weights"][t]))
            if L["dropped"][t]:
                cell += " drop:" + ",".join(map(str, L["dropped"][t]))
            cells.append(f"  {cell or '-':22}")
        lines.append(f"{t:>4}  {shown:16}" + "".join(cells))
    lines.append("")
    for L in layers:
        m = L["metrics"]
        cap = f", capacity {L['capacity']}" if L["capacity"] else ""
        lines.append(f"layer {L['layer']}: tokens per expert {L['load']}{cap}; load-balance {m['load_balance']:.3f}, "
                     f"effective experts {m['n_eff']:.2f}, drop rate {m['drop_rate']:.1%}")
    p = res.params
    lines.append(f"parameters: total {p.total:,}, active per token {p.active_per_token:,} ({p.active_share:.1%})")
    lines.append(f"next-token loss on this text: {res.loss:.3f} nats" if res.loss is not None else
                 "next-token loss: needs at least 2 tokens")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- generate


def _temperature(text: str) -> float:
    v = _number(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 = greedy), got {text!r}")
    return v


def cmd_generate(args) -> int:
    import torch

    # one decode step is a few tiny matmuls: split over cores they only wait for each other (and, on a
    # shared machine, for the other work), so it runs on one thread (put back after: tests call main())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _generate(args)
    finally:
        torch.set_num_threads(threads)


def _generate(args) -> int:
    import codecs
    import time

    from .data.tokenizer import get_tokenizer
    from .generate import generate, prompt_ids
    from .model.checkpoint import load
    from .model.request import RoutingRequest

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load(args.model or "moe-n8")
    request = RoutingRequest.make(model.config, args.scheme, args.top_k)
    tok = get_tokenizer()
    ids = prompt_ids(text, model.model, tok)
    room = model.config.block_size - len(ids)
    if args.max_new_tokens > room:
        raise UsageError(f"moe-lab generate: --max-new-tokens must be from 1 to {room}: the context is "
                         f"{model.config.block_size} tokens and the prompt has {len(ids)} (got {args.max_new_tokens})")
    seed = args.seed
    if seed is None and args.temperature > 0:     # a seed picked here is reported, so the run can be repeated
        seed = int.from_bytes(os.urandom(8), "little")
    stream = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=seed,
                      request=request, tokenizer=tok)
    if not args.json:
        print(f"({model.name} is a small model trained for a few minutes: expect babble, not sense.)")
        print(text, end="", flush=True)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a character may span two tokens
    prefill, new = [], []
    start = time.perf_counter()
    prefilled = start
    for t in stream:
        if t.phase == "prefill":
            prefill.append(t)
            prefilled = time.perf_counter()
            continue
        new.append(t)
        if not args.json:
            print(utf8.decode(tok.token_bytes(t.id)), end="", flush=True)
    seconds = time.perf_counter() - prefilled
    tokens_per_s = round(len(new) / seconds, 1) if seconds > 0 else None
    if args.json:
        out = json.dumps({
            "model": model.info(), **request.as_dict(), "temperature": args.temperature, "seed": seed,
            "max_new_tokens": args.max_new_tokens, "context": model.config.block_size,
            "prompt": text, "text": tok.decode(t.id for t in new),
            "prefill": [t.as_dict() for t in prefill], "tokens": [t.as_dict() for t in new],
            "prefill_ms": round((prefilled - start) * 1e3, 2), "tokens_per_s": tokens_per_s,
        }, indent=2)
        if not _encodable(out):
            out = json.dumps(json.loads(out))
        print(out)
        return 0
    print(utf8.decode(b"", final=True))
    print(_generate_summary(prefill, new, request, args.temperature, seed, tokens_per_s, prefilled - start))
    return 0


def cmd_experiment(args) -> int:
    from .experiments import EXPERIMENTS, OWN_MODELS, run_experiment
    from .model.checkpoint import load

    if args.list or not args.name:
        if args.json:
            print(json.dumps([{"name": e.name, "title": e.title, "question": e.question, "choices": list(e.choices),
                               "source": e.source} for e in EXPERIMENTS.values()], indent=2))
        else:
            for e in EXPERIMENTS.values():
                print(f"{e.name:16} {e.title}  ({e.source})")
        return 0
    if args.name not in EXPERIMENTS:
        raise UsageError(f"moe-lab experiment: unknown experiment {args.name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    if args.model and args.name in OWN_MODELS:
        raise UsageError(f"moe-lab experiment: {args.name} uses its own models ({OWN_MODELS[args.name]}); "
                         f"--model does not apply")
    if args.token is not None and args.name != "same_token":
        raise UsageError("moe-lab experiment: --token applies to same_token only")
    options = {"token": args.token} if args.token is not None else {}
    model = None if args.name in OWN_MODELS else load(args.model or "moe-n8")
    res = run_experiment(args.name, model, **options)
    if args.json:
        out = json.dumps(res, indent=2)
        print(out if _encodable(out) else json.dumps(json.loads(out)))
        return 0
    print(f"{res['title']} ({res['source']})\n{res['question']}")
    for i, c in enumerate(res["choices"]):
        print(f"  {'*' if i == res['answer'] else ' '} {c}")
    print(f"\n{res['finding']}")
    return 0


def _generate_summary(prefill, new, request, temperature, seed, tokens_per_s, prefill_s) -> str:
    how = "greedy" if temperature == 0 else f"temperature {temperature:g}, seed {seed}"
    k = f", k={request.top_k}" if request.top_k else ""
    lines = [(f"\n{len(prefill)} prompt tokens routed in one pass ({prefill_s * 1e3:.1f} ms), then {len(new)} new "
              f"tokens one at a time ({tokens_per_s} tokens/s); {how}; scheme {request.scheme}{k}"),
             "experts used by the new tokens (share of tokens), per layer:"]
    for layer in range(len(new[0].experts)):
        counts: dict[int, int] = {}
        for t in new:
            for e in t.experts[layer]:
                counts[e] = counts.get(e, 0) + 1
        top = sorted(counts.items(), key=lambda ec: (-ec[1], ec[0]))[:4]
        lines.append(f"  layer {layer}: " + ", ".join(f"expert {e} {c / len(new):.0%}" for e, c in top))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- train / corpus / bench / serve


def cmd_train(args) -> int:

    from .model.checkpoint import CHECKPOINT_DIR
    from .model.layer import pick_device
    from .train.loop import make_configs, train_and_save

    pick_device(args.device)                  # a device this machine lacks fails here, not after loading data
    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.seed is not None:
        overrides["seed"] = args.seed
    overrides["device"] = args.device
    if args.threads:
        overrides["threads"] = args.threads
    model_cfg, train_cfg, preset = make_configs(args.preset, **overrides)
    out = writable_dir(Path(args.out) if args.out else CHECKPOINT_DIR, "--out")
    if args.expert_parallel:  # experts spread over P torchrun processes (moe_core/parallel/expert_parallel.py)
        from .parallel.expert_parallel import cmd_train as train_expert_parallel

        return train_expert_parallel(args, model_cfg, train_cfg, preset, out)
    path = train_and_save(preset, model_cfg, train_cfg, out, progress=not args.quiet)
    print(f"saved {path}.safetensors and {path}.json")
    return 0


def cmd_corpus(args) -> int:
    from .data import corpus

    return corpus.run(args)


def cmd_bench(args) -> int:
    from .perf.bench import run_bench

    return run_bench(args)


def cmd_serve(args) -> int:

    app = Path(__file__).resolve().parent.parent / "app" / "main.py"
    # app.allocator launches Panel with jemalloc when the machine has it, so memory comes back after a class
    cmd = [sys.executable, "-m", "app.allocator", "panel", "serve", str(app),
           "--address", args.address, "--port", str(args.port),
           "--allow-websocket-origin", f"localhost:{args.port}", "--allow-websocket-origin", f"127.0.0.1:{args.port}",
           "--index", "main", "--num-procs", "1",
           # classroom defaults (docs/serving.md): warm the app before the first student, expire unused
           # session tokens after an hour, drop sessions whose tab was closed, keep websockets alive
           "--warm", "--session-token-expiration", "3600", "--unused-session-lifetime", "300000",
           "--check-unused-sessions", "30000", "--keep-alive", "30000"]
    if args.behind_proxy:
        cmd.append("--use-xheaders")
    for origin in args.allow_origin or []:
        cmd += ["--allow-websocket-origin", origin]
    if args.show:
        cmd.append("--show")
    env = dict(os.environ)
    if args.allocator:
        env["MOE_LAB_ALLOCATOR"] = args.allocator
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)      # the server replaces this process: a SIGTERM to moe-lab reaches it
    return 0                         # pragma: no cover - execve does not return


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moe-lab", description="MoE Router Lab: route text through a real Mixture-of-Experts model.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    q = sub.add_parser("params", help="total vs active parameters of a published or shipped model")
    q.add_argument("--model", type=_name,
                   help="published model (e.g. mixtral-8x7b) or shipped checkpoint (e.g. moe-n8)")
    q.add_argument("--top-k", type=_positive_int, help="experts per token (shipped checkpoints only)")
    q.add_argument("--list", action="store_true", help="list every model")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(fn=cmd_params)

    q = sub.add_parser("models", help="list the shipped checkpoints")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_models)

    q = sub.add_parser("route", help="route text through every layer of a trained model")
    q.add_argument("text", help='the text to route ("-" reads standard input)')
    q.add_argument("--model", type=_name, help="checkpoint name (moe-lab models); default moe-n8")
    q.add_argument("--experts", type=_positive_int, help="pick the balanced checkpoint with N experts")
    q.add_argument("--top-k", type=_positive_int, help="experts per token (top-k schemes)")
    q.add_argument("--scheme", type=_name, help="routing scheme: softmax_topk, noisy_topk, switch, gshard, expert_choice, base, deepseek, "
                                                "hash, random")
    q.add_argument("--capacity-factor", type=_number, help="slots per expert = ceil(factor * tokens / N)")
    q.add_argument("--seed", type=_int_in(0, 2**63 - 1), help="seed of random routing (--scheme random); default 0")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda")
    q.add_argument("--json", action="store_true", help="print JSON (schema in README)")
    q.add_argument("--expert-parallel", type=_positive_int, metavar="P",
                   help="spread the experts over P processes (torchrun; launched for you) and report the traffic")
    q.set_defaults(fn=cmd_route)

    q = sub.add_parser("generate", help="a trained model continues a prompt token by token, showing each token's experts")
    q.add_argument("prompt", help='the text to continue ("-" reads standard input)')
    q.add_argument("--max-new-tokens", type=_int_in(1, 4096), default=64,
                   help="tokens to write (at most the context, 256, minus the prompt's tokens); default 64")
    q.add_argument("--temperature", type=_temperature, default=0.0,
                   help="0 (default): greedy, always the most probable token; above 0: sampled, higher = more random")
    q.add_argument("--seed", type=_int_in(0, 2**64 - 1), help="seed of the sampling (temperature > 0); default random")
    q.add_argument("--model", type=_name, help="checkpoint name (moe-lab models); default moe-n8")
    q.add_argument("--scheme", type=_name, help="routing scheme: softmax_topk, noisy_topk, deepseek, hash or random "
                                                "(the schemes that route each token on its own)")
    q.add_argument("--top-k", type=_positive_int, help="experts per token")
    q.add_argument("--json", action="store_true", help="print JSON: every token with its experts per layer")
    q.set_defaults(fn=cmd_generate)

    q = sub.add_parser("experiment", help="guided experiments on what the experts learned (predict, run, see)")
    q.add_argument("name", nargs="?", help="the experiment (moe-lab experiment --list)")
    q.add_argument("--list", action="store_true", help="list the experiments")
    q.add_argument("--model", type=_name, help="checkpoint name; default moe-n8")
    q.add_argument("--token", type=_name, help="same_token: the token to follow (one token, e.g. ' the')")
    q.add_argument("--json", action="store_true", help="print JSON: the numbers, the finding and the figure's data")
    q.set_defaults(fn=cmd_experiment)

    q = sub.add_parser("train", help="train a model from a preset and save a checkpoint")
    q.add_argument("--preset", required=True, help="e.g. moe-n8, moe-n8-nobalance, tiny")
    q.add_argument("--steps", type=_int_in(1, 1_000_000))
    q.add_argument("--seed", type=_int_in(0, 2**63 - 1))
    q.add_argument("--out", help="output directory (default assets/checkpoints)")
    q.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    q.add_argument("--threads", type=_int_in(1, MAX_THREADS), help=f"torch CPU threads (at most {MAX_THREADS})")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.add_argument("--expert-parallel", type=_positive_int, metavar="P",
                   help="train with the experts spread over P processes (torchrun; launched for you)")
    q.set_defaults(fn=cmd_train)

    q = sub.add_parser("corpus", help="rebuild the training corpus and the tokenizer from their sources")
    try:
        from .data import corpus

        corpus.add_arguments(q)
    except ImportError:  # pragma: no cover - corpus builder is part of the package
        pass
    q.set_defaults(fn=cmd_corpus)

    q = sub.add_parser("bench", help="time the MoE layer against a dense FFN, and training/routing/generation throughput")
    q.add_argument("--json", action="store_true")
    q.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    q.add_argument("--experts", default="4,8,16,64,256", help="comma-separated N values")
    q.add_argument("--tokens", type=_int_in(1, 10_000_000), default=8192)
    q.add_argument("--repeats", type=_int_in(1, 1000), default=7)
    q.add_argument("--quick", action="store_true", help="fewer repeats and sizes (smoke test)")
    q.add_argument("--skip", default="", help="comma-separated parts to skip: layer,train,route,generate")
    q.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc returning freed memory to the OS after every pass "
                        "(see bench.keep_freed_memory)")
    q.set_defaults(fn=cmd_bench)

    q = sub.add_parser("serve", help="serve the dashboard (panel serve app/main.py)")
    q.add_argument("--port", type=_int_in(0, 65535), default=5006, help="0: any free port")
    q.add_argument("--address", default="127.0.0.1")
    q.add_argument("--allow-origin", action="append", help="extra allowed websocket origin host[:port]")
    q.add_argument("--show", action="store_true", help="open a browser")
    q.add_argument("--behind-proxy", action="store_true",
                   help="trust X-Forwarded-* headers (when nginx or another proxy is in front, see deploy/)")
    q.add_argument("--allocator", choices=("auto", "jemalloc", "system"),
                   help="memory allocator of the server: jemalloc gives a finished class's memory back to the OS "
                        "(auto, the default: jemalloc when installed; see docs/serving.md)")
    q.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    if not _encodable("\u00e9\u2192"):         # e.g. PYTHONIOENCODING=ascii: text the terminal cannot show is escaped
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "fn", None):
            parser.print_help()
            return 2
        return args.fn(args) or 0
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"moe-lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-lab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug, not bad input: still one line, traceback on request
        if os.environ.get("MOE_LAB_DEBUG"):
            raise
        print(f"moe-lab: internal error: {type(e).__name__}: {e} (set MOE_LAB_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
