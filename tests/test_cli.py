"""The `moe-lab` CLI: JSON schemas, and one-line errors with exit code 2."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args, stdin=None):
    p = subprocess.run([sys.executable, "-m", "moe_core", *args], capture_output=True, text=True, input=stdin,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code, out, err):
    assert code == 2, (code, out, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_params_json_for_a_published_model():
    code, out, err = run("params", "--model", "mixtral-8x7b", "--json")
    assert code == 0, err
    d = json.loads(out)
    for key in ("model", "total", "active_per_token", "published_total", "published_active_per_token", "source"):
        assert key in d
    assert d["model"] == "mixtral-8x7b" and isinstance(d["total"], int) and d["total"] > d["active_per_token"] > 0
    assert abs(d["total"] / d["published_total"] - 1) < 0.03


def test_params_list(capsys):
    assert main(["params", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("mixtral-8x7b", "deepseek-v3", "qwen3-235b-a22b", "olmoe-1b-7b"):
        assert name in out


def test_params_of_a_shipped_checkpoint_follow_k(capsys):
    assert main(["params", "--model", "moe-n8", "--json"]) == 0
    k2 = json.loads(capsys.readouterr().out)
    assert main(["params", "--model", "moe-n8", "--top-k", "4", "--json"]) == 0
    k4 = json.loads(capsys.readouterr().out)
    assert k4["total"] == k2["total"] and k4["active_per_token"] > k2["active_per_token"]


@pytest.mark.parametrize("args", [
    ["params", "--model", "gpt-17"],
    ["params"],
    ["params", "--model", "moe-n8", "--top-k", "0"],
    ["params", "--model", "moe-n8", "--top-k", "99"],
    ["route", ""],
    ["route", "hello", "--model", "nope"],
    ["route", "hello", "--experts", "7"],
    ["route", "hello", "--top-k", "9"],
    ["route", "hello", "--scheme", "magic"],
    ["route", "hello", "--scheme", "switch", "--capacity-factor", "-1"],
    ["route", "hello", "--scheme", "switch", "--capacity-factor", "abc"],
    ["route", "hello", "--scheme", "switch", "--top-k", "2"],
    ["route", "hello", "--capacity-factor", "1.5"],
    ["route", "hello", "--device", "tpu"],
    ["train", "--preset", "gigantic"],
    ["bench", "--skip", "everything"],
    ["serve", "--allocator", "tcmalloc"],
    ["frobnicate"],
    # every count, path and device is decided before any work (issue #23)
    ["route", "hello", "--device", "mps"],
    ["route", "hello", "--model", ""],
    ["route", "hello", "--scheme", ""],
    ["params", "--model", ""],
    ["train", "--preset", "tiny", "--out", "/dev/null"],
    ["train", "--preset", "tiny", "--out", "/etc/passwd/sub"],
    ["train", "--preset", "tiny", "--out", "/proc/moe-lab-out"],
    ["train", "--preset", "tiny", "--steps", "10000000000000"],
    ["train", "--preset", "tiny", "--threads", "5000"],
    ["train", "--preset", "tiny", "--threads", "100000"],
    ["train", "--preset", "tiny", "--seed", "1180591620717411303424"],
    ["train", "--preset", "tiny", "--seed", "-1"],
    ["train", "--preset", "tiny", "--device", "mps"],
    ["bench", "--experts", "1000000"],
    ["bench", "--experts", "4096", "--tokens", "9000000"],
    ["bench", "--tokens", "10000000000"],
    ["bench", "--device", "mps"],
    ["serve", "--port", "70000"],
    ["serve", "--port", "-1"],
    # generate (issue #24): counts, temperature and seed decided before work; group-routed schemes refused
    ["generate", "hello", "--max-new-tokens", "0"],
    ["generate", "hello", "--max-new-tokens", "256"],
    ["generate", "hello", "--max-new-tokens", "99999"],
    ["generate", "hello", "--temperature", "-1"],
    ["generate", "hello", "--temperature", "nan"],
    ["generate", "hello", "--temperature", "inf"],
    ["generate", "hello", "--seed", "-1"],
    ["generate", "hello", "--seed", "18446744073709551616"],
    ["generate", "hello", "--scheme", "switch"],
    ["generate", "hello", "--scheme", "expert_choice"],
    ["generate", "hello", "--model", "moe-n8-switch"],
    ["generate", "hello", "--top-k", "9"],
    ["generate", "hello", "--model", ""],
    ["generate", "hello", "--model", "nope"],
    ["generate", ""],
])
def test_bad_arguments_give_one_line_and_exit_2(args, capsys):
    code = main(args)          # in process (fast); the subprocess tests below cover the real entry point
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err)


def test_bad_arguments_from_the_real_entry_point():
    assert_one_line_error(*run("route", "hello", "--top-k", "9"))


def test_a_terminal_that_cannot_show_the_text_still_gets_valid_json():
    """PYTHONIOENCODING=ascii: the JSON escapes what the terminal cannot show (it is still the same JSON)."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    p = subprocess.run([sys.executable, "-m", "moe_core", "route", "h\u00e9llo \u2192 \u4e16", "--json"],
                       capture_output=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout.decode("ascii"))
    assert "".join(t["text"] for t in d["tokens"]) == "h\u00e9llo \u2192 \u4e16"
    table = subprocess.run([sys.executable, "-m", "moe_core", "route", "h\u00e9llo"], capture_output=True, env=env,
                           cwd=ROOT)
    assert table.returncode == 0 and b"\\u00e9" in table.stdout


def test_route_over_the_token_limit_is_refused_cleanly():
    assert_one_line_error(*run("route", "-", stdin="7 " * 5000))


def test_route_json_schema():
    code, out, err = run("route", "def add(a, b):\n    return a + b  # 42", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert set(d["model"]) >= {"name", "n_experts", "top_k_trained", "n_layer", "trained", "recipe"}
    assert d["scheme"] == "softmax_topk" and d["top_k"] == 2
    text = "def add(a, b):\n    return a + b  # 42"
    assert "".join(t["text"] for t in d["tokens"]) == text
    for t in d["tokens"]:
        assert text[t["start"]:t["end"]] == t["text"]
    T, N = len(d["tokens"]), d["model"]["n_experts"]
    assert len(d["layers"]) == d["model"]["n_layer"]
    for L in d["layers"]:
        assert len(L["experts"]) == len(L["weights"]) == len(L["dropped"]) == len(L["probs"]) == T
        assert all(len(row) == 2 for row in L["experts"])
        assert all(len(p) == N and abs(sum(p) - 1) < 1e-4 for p in L["probs"])
        assert sum(L["load"]) == 2 * T and L["capacity"] is None
        assert set(L["metrics"]) == {"load_balance", "z_loss", "cv", "entropy", "entropy_norm", "jain", "n_eff",
                                     "gini", "max_over_mean", "dead_experts", "drop_rate", "top1_max_share"}
    assert d["params"]["total"] > d["params"]["active_per_token"] > 0
    assert isinstance(d["loss"], float) and d["loss"] > 0


def test_route_with_capacity_reports_drops():
    code, out, _ = run("route", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15", "--scheme", "switch",
                       "--capacity-factor", "0.5", "--json")
    assert code == 0
    d = json.loads(out)
    L = d["layers"][0]
    T = len(d["tokens"])
    assert L["capacity"] == math.ceil(0.5 * T / d["model"]["n_experts"])
    assert max(L["load"]) <= L["capacity"]
    assert sum(len(x) for x in L["dropped"]) > 0
    assert sum(L["load"]) + sum(len(x) for x in L["dropped"]) == T



def test_loss_changes_with_k(capsys):
    losses = []
    for k in ("1", "2", "8"):
        assert main(["route", "The quick brown fox jumps over the lazy dog.", "--top-k", k, "--json"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert len(set(losses)) == 3


def test_route_table_is_readable():
    code, out, err = run("route", "Hola, mundo 123", "--experts", "4")
    assert code == 0, err
    assert "layer 0" in out and "tokens per expert" in out and "next-token loss" in out


def test_models_json_lists_shipped_checkpoints():
    code, out, _ = run("models", "--json")
    assert code == 0
    names = {d["name"] for d in json.loads(out)}
    assert {"moe-n4", "moe-n8", "moe-n16", "moe-n32", "moe-n8-nobalance", "moe-n8-bias",
            "moe-n8-switch", "moe-n8-untrained"} <= names


@pytest.mark.slow
def test_bench_smoke_json():
    code, out, err = run("bench", "--json", "--quick", "--skip", "train,route", "--experts", "4,8", "--tokens", "512")
    assert code == 0, err
    d = json.loads(out)
    assert [r["n_experts"] for r in d["layer"]["moe"]] == [4, 8]
    assert d["layer"]["dense_ms"] > 0 and all(r["ms"] > 0 for r in d["layer"]["moe"])
    assert all(r["over_hf"] > 0 and r["hf_ms"] > 0 for r in d["layer"]["moe"]) and d["layer"]["config"]["rounds"] == 2
    assert "MixtralSparseMoeBlock" in d["layer"]["hf_baseline"] or "transcription" in d["layer"]["hf_baseline"]
    assert d["machine"]["malloc"].startswith("glibc malloc keeps freed memory")   # said in the report


# Big temporaries freed together, as a forward pass frees them: glibc (defaults) may give them back to
# the OS and page-fault them in again on the next pass; bench.keep_freed_memory keeps them for reuse.
FAULTS = """
import resource, sys, torch
from moe_core.perf.bench import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
x = torch.ones(4096, 1024)
def step():
    tmp = [x * 2 for _ in range(4)]     # 4 x 16 MB
    big = x.repeat(4, 1)                # 64 MB: above any mmap threshold glibc accepts (a dense FFN's hidden state)
    del tmp, big
for _ in range(10):
    step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.slow
def test_bench_keeps_freed_memory_instead_of_faulting_it_back_in():
    faults = {}
    for mode in ("keep", "default"):
        r = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        faults[mode] = int(r.stdout.strip())
    # 20 passes of 128 MB = 655,360 pages. glibc's defaults faulted the 64 MB block in again every pass
    # (16,384 pages) and the 16 MB ones in all or some passes, by its adaptive thresholds; kept, the heap
    # is reused: 0 faults in most runs, in one of ten a few one-time extensions (4,096 pages each) where
    # small allocations split the freed space, never as much as one pass's 64 MB block
    assert faults["default"] >= 20 * 16384, faults
    assert faults["keep"] < 16384, faults
    print(f"page faults in 20 passes: {faults}")


def test_bench_rounds_interleave_and_ratios_are_taken_within_a_round():
    """Every round runs every configuration once, in turn (so a burst of other work on a shared
    machine slows them alike), and a ratio is the median of the within-round ratios."""
    import torch

    from moe_core.perf.bench import interleaved_medians, interleaved_times, paired_ratio

    calls, now = [], [0.0]
    cost = {"a": 2.0, "b": 1.0}

    def fn(name):
        def run():
            calls.append(name)
            now[0] += cost[name] * (3 if len(calls) in (5, 6) else 1)   # the second round runs 3x slower
        return run

    times = interleaved_times({"a": fn("a"), "b": fn("b")}, 3, torch.device("cpu"), clock=lambda: now[0] / 1e3)
    assert calls == ["a", "b"] * 4                                # one warm-up round, then 3 timed rounds
    assert times == {"a": pytest.approx([2.0, 6.0, 2.0]), "b": pytest.approx([1.0, 3.0, 1.0])}
    assert paired_ratio(times, "a", "b") == pytest.approx(2.0)                  # the slow round slowed both alike
    calls.clear()
    assert interleaved_medians({"a": fn("a"), "b": fn("b")}, 3, torch.device("cpu"),
                               clock=lambda: now[0] / 1e3) == {"a": pytest.approx(2.0), "b": pytest.approx(1.0)}
