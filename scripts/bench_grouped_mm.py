"""The CPU's expert paths timed against torch.nn.functional.grouped_mm (docs/performance.md).

    python scripts/bench_grouped_mm.py [--rounds 7] [--experts 8,256]
"""
import argparse
import json

from moe_core.perf.bench import bench_grouped_mm, keep_freed_memory

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--rounds", type=int, default=7)
p.add_argument("--experts", default="8,256")
args = p.parse_args()
malloc = keep_freed_memory()                   # as `moe-lab bench` does, for every path alike
result = bench_grouped_mm(tuple(int(n) for n in args.experts.split(",")), repeats=args.rounds)
print(json.dumps({**result, "malloc": malloc}, indent=2))
