"""moe_core.perf.pages.pages_kept: a thread's freed memory kept for its own reuse, then given back.

Checked for real in child processes run under jemalloc (what the server runs with; `make test`
installs Debian's libjemalloc2): page faults per pass of a big buffer with and without it, the
private arena purged on the way out, objects made inside intact, and the lab's training job and
the Scale tab's measurement run inside it. In this process (glibc) it must do nothing and say so.
"""
from __future__ import annotations

import pytest

from moe_core.perf import pages
from moe_core.perf.scale import _same_setup, machine
from tests.test_allocator import need_jemalloc, run_fragment


def run_under_jemalloc(code: str) -> dict:
    need_jemalloc()
    return run_fragment("jemalloc", code)


FAULTS = r"""
import ctypes, json, resource, torch
from moe_core.perf.pages import mallctl, pages_kept
m = mallctl()

def faults_per_pass(passes=8):
    def one():
        x = torch.empty(8 << 20)          # 32 MiB, freed at the end of the pass
        x.fill_(1.0)
    one()
    f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(passes):
        one()
    return (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0) / passes

def arena():
    v, n = ctypes.c_uint(), ctypes.c_size_t(4)
    assert m(b"thread.arena", ctypes.byref(v), ctypes.byref(n), None, 0) == 0
    return v.value

def dirty_pages(i):
    e, n = ctypes.c_uint64(1), ctypes.c_size_t(8)
    m(b"epoch", ctypes.byref(e), ctypes.byref(n), ctypes.byref(e), 8)        # refresh the statistics
    v, n = ctypes.c_size_t(), ctypes.c_size_t(8)
    assert m(f"stats.arenas.{i}.pdirty".encode(), ctypes.byref(v), ctypes.byref(n), None, 0) == 0
    return v.value

own = arena()
outside = faults_per_pass()
with pages_kept() as kept:
    private = arena()
    inside = faults_per_pass()
    made_inside = torch.arange(1 << 20, dtype=torch.float32)        # outlives the block
    dirty_inside = dirty_pages(private)
after_exit = arena()
dirty_after = dirty_pages(private)
with pages_kept() as kept_again:
    reused = arena()
# what was made inside and is freed later, by any thread, goes back to the private arena: the
# server's housekeeping (app.allocator.release_freed_memory, every arena) gives it back
from app.allocator import release_freed_memory
intact = bool((made_inside == torch.arange(1 << 20, dtype=torch.float32)).all())
del made_inside
dirty_freed_later = dirty_pages(private)
release_freed_memory()
dirty_after_housekeeping = dirty_pages(private)
print(json.dumps({"kept": kept, "outside": outside, "inside": inside, "own": own, "private": private,
                  "after_exit": after_exit, "dirty_inside": dirty_inside, "dirty_after": dirty_after,
                  "reused": reused, "kept_again": kept_again, "intact": intact,
                  "dirty_freed_later": dirty_freed_later, "dirty_after_housekeeping": dirty_after_housekeeping}))
"""


def test_freed_pages_are_kept_inside_and_given_back_on_exit():
    r = run_under_jemalloc(FAULTS)
    assert r["kept"] is True and r["kept_again"] is True
    # jemalloc's defaults: the 32 MiB buffer (8,192 pages) is mapped again on most passes
    assert r["outside"] > 2000, r
    assert r["inside"] < 50, r                          # kept: mapped once, reused
    assert r["private"] != r["own"] and r["after_exit"] == r["own"], r   # back to its own arena on exit
    # freed pages wait in the private arena (less the 4 MiB reused by made_inside), and go back on exit
    assert r["dirty_inside"] >= 4096 and r["dirty_after"] == 0, r
    assert r["reused"] == r["private"], r               # one private arena serves the next user
    assert r["intact"], r                               # what was made inside lives on
    assert r["dirty_freed_later"] >= 1024 and r["dirty_after_housekeeping"] == 0, r   # its 4 MiB, then none


LAB = r"""
import json, time, contextlib
from pathlib import Path
import moe_core.train.lab as lab

def faults_per_step(keep):
    if not keep:
        lab.pages_kept = contextlib.nullcontext
    job = lab.JobManager().submit([lab.Recipe(steps=40, seed=1)])
    stat = lambda: int(Path(f"/proc/self/task/{job._thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()[7])
    while len(job.runs[0].steps) < 10:
        time.sleep(0.01)
    s0, f0 = len(job.runs[0].steps), stat()
    while len(job.runs[0].steps) < 35:
        time.sleep(0.01)
    s1, f1 = len(job.runs[0].steps), stat()
    job.cancel()
    job._thread.join()
    return (f1 - f0) / (s1 - s0)

print(json.dumps({"kept": faults_per_step(True), "default": faults_per_step(False)}))
"""


@pytest.mark.slow
def test_the_labs_training_job_keeps_its_freed_pages():
    """The lab's steps re-allocate the same buffers: under jemalloc's defaults ~8,800 page faults a step
    (a quarter of its time); inside pages_kept a handful."""
    r = run_under_jemalloc(LAB)
    assert r["default"] > 1000, r
    assert r["kept"] < r["default"] / 20, r


def test_elsewhere_it_does_nothing_and_says_so():
    if pages.mallctl() is not None:
        pytest.skip("this test process runs under jemalloc")
    with pages.pages_kept() as kept:
        x = [0] * 1000
    assert kept is False and len(x) == 1000
    assert pages.describe(kept) == "the allocator's defaults"


def test_a_scale_cache_counts_only_for_the_same_handling_of_freed_memory():
    config = {"n_values": [2, 4], "top_k": 2, "d_model": 8, "d_ff": 16, "tokens": 64, "repeats": 1}
    here = {**machine(), "freed_pages": pages.describe(pages.mallctl() is not None)}
    assert _same_setup({"config": config, "machine": here}, config)
    before = {k: v for k, v in here.items() if k != "freed_pages"}      # a cache made before it was recorded
    assert not _same_setup({"config": config, "machine": before}, config)
    other = {**here, "freed_pages": pages.describe(pages.mallctl() is None)}
    assert not _same_setup({"config": config, "machine": other}, config)


SCALE = r"""
import json
from moe_core.perf.scale import measure_scale
r = measure_scale((2, 4), top_k=2, d_model=128, d_ff=256, tokens=4096, repeats=5)
print(json.dumps({"freed_pages": r["machine"]["freed_pages"], "dense": r["dense"]["ms"],
                  "moe": [row["ms"] for row in r["rows"]]}))
"""


def test_the_scale_measurement_records_that_it_kept_freed_pages():
    r = run_under_jemalloc(SCALE)
    assert r["freed_pages"] == pages.describe(True), r
