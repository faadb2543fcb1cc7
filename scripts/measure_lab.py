"""Measure what ~60 s of training-lab time shows, for the lab's explainer and the README.

    python scripts/measure_lab.py [--seconds 60] [--json]

For each lab preset (and the load-balancing loss on softmax top-k), trains the
lab model with the lab's settings (1 torch thread, seed 0) for --seconds of
wall time and reports the busiest expert's share of first choices (any layer,
mean over the last 20 steps), the steps reached and the final training loss.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from moe_core.train.lab import RECIPES, Recipe, verdict  # noqa: E402
from moe_core.data.tokens import load_token_data  # noqa: E402
from moe_core.train.loop import Trainer  # noqa: E402


def measure(name: str, recipe: Recipe, seconds: float) -> dict:
    data = load_token_data()
    trainer = Trainer(recipe.model_config(), recipe.train_config(), data=data)
    t0 = time.perf_counter()
    history = []
    while not trainer.done and time.perf_counter() - t0 < seconds:
        history.append(trainer.step())
    tail = history[-20:]
    busiest = sum(max(max(layer) for layer in s.top1_share) for s in tail) / len(tail)
    return {"recipe": name, "steps": len(history), "seconds": round(time.perf_counter() - t0, 1),
            "busiest_top1_share": round(busiest, 3), "status": verdict(busiest, recipe.n_experts)[0],
            "train_loss": round(sum(s.ce_loss for s in tail) / len(tail), 3),
            "tokens_per_s": round(tail[-1].tokens_per_s)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipes = {k: Recipe(**{**v.__dict__, "steps": 2000}) for k, v in RECIPES.items()}
    recipes["Load-balancing loss (softmax top-k)"] = Recipe(balancing="load_balance", steps=2000)
    rows = [measure(name, r, args.seconds) for name, r in recipes.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['recipe']:38s} {r['steps']:5d} steps  busiest {r['busiest_top1_share']:.0%}  "
                  f"{r['status']:9s} loss {r['train_loss']:.2f}  {r['tokens_per_s']:,} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
