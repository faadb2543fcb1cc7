"""What keeping a thread's freed pages (moe_core/perf/pages.py) changes, under the server's allocator.

    python -m app.allocator .venv/bin/python scripts/pages_kept.py [--rounds 2] [--out FILE.json]

Run it through the launcher, as the server runs (jemalloc for every object); without
jemalloc `pages_kept` does nothing and both columns measure the same thing. For each
round, in turn with and without `pages_kept`: a 300-step training-lab job (the lab's
default recipe, seed 1, 1 torch thread: wall time, and the tokens/s of its last step) and
the Scale tab's measurement (`measure_scale`, its default sizes: dense FFN and MoE ms).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import moe_core.train.lab as lab  # noqa: E402
import moe_core.perf.scale as scale  # noqa: E402
from moe_core.perf.bench import machine  # noqa: E402
from moe_core.perf.pages import mallctl, pages_kept  # noqa: E402


def lab_job() -> dict:
    t = time.perf_counter()
    job = lab.JobManager(max_running=1, threads=1).submit([lab.Recipe(steps=300, seed=1)])
    job._thread.join()
    if job.state != "done":
        raise RuntimeError(f"the lab job ended {job.state}: {job.error}")
    return {"wall_s": round(time.perf_counter() - t, 2), "last_step_tokens_per_s": round(job.runs[0].steps[-1]["tokens_per_s"])}


def scale_run() -> dict:
    r = scale.measure_scale()
    return {"dense_ms": r["dense"]["ms"], "moe_ms": {row["n_experts"]: row["ms"] for row in r["rows"]},
            "freed_pages": r["machine"]["freed_pages"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(1)
    out = {"allocator": "jemalloc" if mallctl() is not None else "not jemalloc: pages_kept does nothing",
           "machine": machine(), "kept": [], "default": []}
    for _ in range(args.rounds):
        for key, ctx in (("kept", pages_kept), ("default", contextlib.nullcontext)):
            lab.pages_kept = scale.pages_kept = ctx
            out[key].append({"lab_300_steps": lab_job(), "scale": scale_run()})
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
