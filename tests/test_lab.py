"""The training lab's engine: real training in a background thread, controls, queue cap, cancellation,
one job per recipe shared by its subscribers, lost pages, determinism."""
import time

import pytest
import torch

from moe_core.train.lab import RECIPES, JobManager, Recipe, status
from moe_core.train.loop import Trainer


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


def shown(sub) -> int:
    return sub.snapshot()["runs"][0]["shown"]


def test_pause_step_resume_and_cancel():
    m = JobManager(max_running=1)
    job = m.submit([Recipe(steps=500)])
    wait_until(lambda: shown(job) >= 2)
    job.pause()
    assert job.state == "paused"
    n = shown(job)
    time.sleep(0.5)
    assert shown(job) == n                      # paused means paused
    job.step(3)
    wait_until(lambda: job.state == "paused" and shown(job) == n + 3)
    time.sleep(0.5)
    assert shown(job) == n + 3                  # exactly three more steps
    job.resume()
    wait_until(lambda: shown(job) > n + 5)
    job.cancel()
    wait_until(lambda: m.running() == 0)        # the slot is freed
    assert job.state == "cancelled"
    k = len(job.runs[0].steps)
    time.sleep(0.5)
    assert len(job.runs[0].steps) <= k + 1      # the worker stopped
    job._thread.join(5)
    assert not job._thread.is_alive()


def test_queue_cap_holds_and_positions_are_reported():
    m = JobManager(max_running=1)
    first = m.submit([Recipe(steps=400, seed=1)])
    second = m.submit([Recipe(steps=5, seed=2)])
    third = m.submit([Recipe(steps=5, seed=3)])
    wait_until(lambda: first.state == "running")
    assert m.running() == 1
    assert (second.state, second.queue_position()) == ("queued", 1)
    assert third.queue_position() == 2
    second.cancel()                              # leaving the queue moves the others up
    assert third.queue_position() == 1
    first.cancel()
    wait_until(lambda: third.finished)
    assert third.state == "done" and second.state == "cancelled" and second.runs[0].steps == []


def test_a_paused_job_gives_up_its_slot_and_resuming_requeues_it():
    m = JobManager(max_running=1)
    a = m.submit([Recipe(steps=500, seed=11)])
    b = m.submit([Recipe(steps=5, seed=12)])
    wait_until(lambda: shown(a) >= 1)
    assert (b.state, b.queue_position()) == ("queued", 1)
    a.pause()
    wait_until(lambda: b.finished)              # the next job got the slot
    assert b.state == "done" and a.state == "paused" and m.running() == 0
    c = m.submit([Recipe(steps=400, seed=13)])
    wait_until(lambda: c.state == "running")
    a.resume()                                  # back in the queue, behind the job now training
    assert (a.state, a.queue_position()) == ("queued", 1)
    c.cancel()
    wait_until(lambda: a.state == "running" and shown(a) > 0)
    a.cancel()


def test_a_job_whose_page_is_gone_stops_within_5_s():
    m = JobManager(max_running=1)
    page = {"open": True}
    job = m.submit([Recipe(steps=2000, seed=21)], alive=lambda: page["open"])
    wait_until(lambda: shown(job) >= 2)
    time.sleep(1.0)                             # the page is there: it keeps training
    assert job.state == "running"
    page["open"] = False                        # the tab closed: its websocket went away
    t0 = time.monotonic()
    wait_until(lambda: job.state == "cancelled" and m.running() == 0, timeout=5)
    job._thread.join(5)
    assert not job._thread.is_alive() and time.monotonic() - t0 < 5


def test_the_same_recipe_is_one_job_whose_subscribers_see_the_same_history():
    m = JobManager(max_running=1)
    a = m.submit([Recipe(steps=12, seed=31)])
    b = m.submit([Recipe(steps=12, seed=31, aux_loss_coef=0.5)])   # a weight this method does not use
    other = m.submit([Recipe(steps=12, seed=32)])
    assert a.job is b.job and other.job is not a.job
    assert b.queue_position() == 0 and other.queue_position() == 1
    wait_until(lambda: a.finished and b.finished)
    assert a.snapshot()["runs"] == b.snapshot()["runs"] and len(a.snapshot()["runs"][0]["steps"]) == 12
    late = m.submit([Recipe(steps=12, seed=31)])    # after it is done: the finished job, model and all
    assert late.job is a.job and late.state == "done" and late.runs[0].model is not None
    assert late.snapshot()["runs"][0]["steps"] == a.snapshot()["runs"][0]["steps"]
    wait_until(lambda: other.finished)


def test_one_subscriber_pausing_or_leaving_does_not_stop_the_others():
    m = JobManager(max_running=1)
    a = m.submit([Recipe(steps=60, seed=41)])
    b = m.submit([Recipe(steps=60, seed=41)])
    wait_until(lambda: shown(a) >= 3)
    a.pause()                                    # a's view stops; b's goes on
    n = shown(a)
    wait_until(lambda: shown(b) >= n + 5)
    assert shown(a) == n and a.state == "paused" and b.state == "running"
    a.step(2)                                    # steps made already: seen at once
    assert shown(a) == n + 2 and a.state == "paused"
    a.cancel()                                   # a leaves: b's job goes on to the end
    wait_until(lambda: b.finished)
    assert a.state == "cancelled" and b.state == "done" and shown(b) == 60
    assert len(b.snapshot()["runs"][0]["steps"]) == 60


def test_a_shared_job_pauses_only_when_every_subscriber_has():
    m = JobManager(max_running=1)
    a = m.submit([Recipe(steps=500, seed=51)])
    b = m.submit([Recipe(steps=500, seed=51)])
    wait_until(lambda: shown(a) >= 2)
    a.pause()
    assert a.job.state == "running" and m.running() == 1
    b.pause()
    wait_until(lambda: a.job.state == "paused" and m.running() == 0)
    a.cancel()
    b.cancel()
    wait_until(lambda: a.job.state == "cancelled")
    a._thread.join(5)
    assert not a._thread.is_alive()


def test_the_queue_says_the_position_and_an_eta_from_the_measured_step_time():
    m = JobManager(max_running=1)
    first = m.submit([Recipe(steps=400, seed=61)])
    assert m.submit([Recipe(steps=5, seed=62)]).snapshot()["wait_s"] is None   # nothing measured yet
    wait_until(lambda: shown(first) >= 10)
    second = m.submit([Recipe(steps=50, seed=63)])
    snap = second.snapshot()
    assert snap["state"] == "queued" and snap["queue_position"] == 2
    per_step = first.job.sec_per_round
    ahead = (400 - shown(first)) + 5            # what the running job and the one ahead have left
    assert 0.5 * ahead * per_step < snap["wait_s"] < 2 * ahead * per_step, (snap["wait_s"], ahead, per_step)
    assert snap["eta_s"] > snap["wait_s"]
    running = first.snapshot()
    assert running["wait_s"] == 0 and running["eta_s"] > 0
    first.cancel()
    second.cancel()


def test_training_is_deterministic_on_cpu():
    """Same recipe and seed, trained twice on CPU: the same losses and the same weights, bit for bit
    (which is why a recipe is computed once and shared)."""
    r = Recipe(steps=6, seed=3, balancing="load_balance")
    runs = []
    for _ in range(2):
        t = Trainer(r.model_config(), r.train_config())
        runs.append(([t.step().loss for _ in range(6)], t.model.state_dict()))
    (la, wa), (lb, wb) = runs
    assert la == lb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_noisy_training_is_deterministic_whatever_trains_in_between():
    """Noisy top-k draws from torch's global generator: a job paused while another trains (and
    seeds it) gets the same noise as one trained straight through."""
    noisy = Recipe(steps=8, seed=71, scheme="noisy_topk", balancing="cv")
    ref = JobManager(max_running=1).submit([noisy])
    wait_until(lambda: ref.finished)
    m = JobManager(max_running=1)
    a = m.submit([noisy])
    wait_until(lambda: shown(a) >= 2)
    a.pause()
    b = m.submit([Recipe(steps=4, seed=72, scheme="noisy_topk", balancing="cv")])
    wait_until(lambda: b.finished)
    a.resume()
    wait_until(lambda: a.finished)
    assert [s["loss"] for s in a.snapshot()["runs"][0]["steps"]] == [s["loss"] for s in ref.snapshot()["runs"][0]["steps"]]


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
