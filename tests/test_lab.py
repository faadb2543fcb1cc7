"""The training lab's engine: real training in a background thread, controls, queue cap, cancellation."""
import time

import pytest

from moe_core.train.lab import RECIPES, JobManager, Recipe, status


def wait_until(cond, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_a_job_trains_and_reduces_loss():
    m = JobManager(max_running=1)
    job = m.submit([Recipe(steps=30, balancing="load_balance")])
    wait_until(lambda: job.finished)
    assert job.state == "done", job.error
    steps = job.snapshot()["runs"][0]["steps"]
    assert [s["step"] for s in steps] == list(range(1, 31))
    assert sum(s["loss"] for s in steps[-3:]) / 3 < sum(s["loss"] for s in steps[:3]) / 3 - 0.5
    assert steps[-1]["eval_loss"] is not None and job.runs[0].model is not None


@pytest.mark.slow
def test_no_balancing_and_bias_balancing_differ_in_max_load():
    """Seeded short runs: the router without balancing concentrates first choices; DeepSeek's bias spreads them."""
    m = JobManager(max_running=1)
    job = m.submit([Recipe(steps=120, seed=0, balancing="none"),
                    Recipe(steps=120, seed=0, scheme="deepseek", balancing="deepseek_bias", bias_update_rate=0.01)])
    wait_until(lambda: job.finished, timeout=300)
    assert job.state == "done", job.error
    runs = job.snapshot()["runs"]

    def busiest(run):  # mean over the last 20 steps of the busiest expert's share of first choices
        tail = run["steps"][-20:]
        return sum(max(max(layer) for layer in s["top1_share"]) for s in tail) / len(tail)

    collapsed, biased = busiest(runs[0]), busiest(runs[1])
    assert collapsed > biased + 0.1, (collapsed, biased)
    assert runs[1]["steps"][-1]["bias"] is not None


def test_pause_step_resume_and_cancel():
    m = JobManager(max_running=1)
    job = m.submit([Recipe(steps=500)])
    wait_until(lambda: len(job.runs[0].steps) >= 2)
    job.pause()
    wait_until(lambda: job.state == "paused")
    time.sleep(0.3)
    n = len(job.runs[0].steps)
    time.sleep(0.5)
    assert len(job.runs[0].steps) == n          # paused means paused
    job.step(3)
    wait_until(lambda: len(job.runs[0].steps) >= n + 3)
    time.sleep(0.5)
    assert len(job.runs[0].steps) == n + 3      # exactly three more steps
    job.resume()
    wait_until(lambda: len(job.runs[0].steps) > n + 5)
    job.cancel()
    wait_until(lambda: m.running() == 0)        # the slot is freed
    assert job.state == "cancelled"
    k = len(job.runs[0].steps)
    time.sleep(0.5)
    assert len(job.runs[0].steps) <= k + 1      # the worker stopped


def test_queue_cap_holds_and_positions_are_reported():
    m = JobManager(max_running=1)
    first = m.submit([Recipe(steps=400)])
    second = m.submit([Recipe(steps=5)])
    third = m.submit([Recipe(steps=5)])
    wait_until(lambda: first.state == "running")
    assert m.running() == 1
    assert (second.state, second.queue_position()) == ("queued", 1)
    assert third.queue_position() == 2
    second.cancel()                              # leaving the queue moves the others up
    assert third.queue_position() == 1
    first.cancel()
    wait_until(lambda: third.finished)
    assert third.state == "done" and second.state == "cancelled" and second.runs[0].steps == []


@pytest.mark.parametrize("kw, message", [
    (dict(n_experts=1), "N must be"),
    (dict(n_experts=65), "N must be"),
    (dict(top_k=9), "top_k"),
    (dict(scheme="magic"), "unknown routing scheme"),
    (dict(balancing="hope"), "unknown balancing"),
    (dict(balancing="deepseek_bias"), "DeepSeek"),
    (dict(steps=0), "steps"),
    (dict(steps=10**6), "steps"),
    (dict(aux_loss_coef=float("nan")), "aux_loss_coef"),
])
def test_bad_recipes_are_refused_with_a_clear_message(kw, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**kw).validate()


def test_presets_are_valid_and_status_thresholds():
    for r in RECIPES.values():
        r.validate()
    assert status([[0.6, 0.2, 0.1, 0.1]])[0] == "Collapsed"
    assert status([[0.3] + [0.1] * 7])[0] == "Uneven"
    assert status([[0.125] * 8])[0] == "Balanced"


def test_same_seed_same_curve():
    m = JobManager(max_running=2)
    a = m.submit([Recipe(steps=8, seed=3)])
    b = m.submit([Recipe(steps=8, seed=3)])
    wait_until(lambda: a.finished and b.finished)
    la = [s["loss"] for s in a.snapshot()["runs"][0]["steps"]]
    lb = [s["loss"] for s in b.snapshot()["runs"][0]["steps"]]
    assert la == lb and len(la) == 8
