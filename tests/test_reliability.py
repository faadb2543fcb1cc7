"""Reliability: shared weights are never mutated, faults leave the server serving and free their
resources, checkpoints are written atomically, and a closed session's training job is cancelled."""
import hashlib
import shutil
import time

import pytest
import torch

from app.lab import TrainingLab
from app.state import RouterState
from moe_core.model import checkpoint
from moe_core.train import lab as lab_mod
from moe_core.model.checkpoint import CHECKPOINT_DIR, list_checkpoints, load, load_file, save
from moe_core.train.lab import JobManager, Recipe
from moe_core.model.routing import SCHEMES


def weights_hash() -> str:
    h = hashlib.sha256()
    for d in list_checkpoints():
        m = load(d["name"]).model
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def wait_until(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_shared_weights_are_never_mutated_by_any_feature():
    before = weights_hash()
    s = RouterState(text="def f(x):\n    return x * 42  # the answer")
    for n in s.param.n_experts.objects:
        s.n_experts = n
        for choice in list(s.param.balancing.objects):
            s.balancing = choice
            for scheme in SCHEMES:
                s.scheme = scheme
                for k in (1, 2, n):
                    if s.scheme_info.uses_k:
                        s.top_k = k
                    s.route()
                    assert s.error == "", s.error
    lab = TrainingLab(router_state=s)
    lab.job = lab_mod.manager().submit([Recipe(steps=5)])
    lab._since = [0]
    wait_until(lambda: lab.job.finished)
    lab.poll()
    lab.use_model()
    s.route()
    assert weights_hash() == before
    for d in list_checkpoints():
        assert not any(p.requires_grad for p in load(d["name"]).model.parameters())


def test_a_training_job_that_raises_fails_cleanly_and_frees_its_slot(monkeypatch):
    m = JobManager(max_running=1)
    calls = {"n": 0}
    real_step = lab_mod.Trainer.step

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated out-of-memory")
        return real_step(self)

    monkeypatch.setattr(lab_mod.Trainer, "step", flaky)
    bad = m.submit([Recipe(steps=10)])
    queued = m.submit([Recipe(steps=4)])
    wait_until(lambda: bad.finished)
    assert bad.state == "failed" and "simulated out-of-memory" in bad.error
    assert len(bad.runs[0].steps) == 2                 # what it did before failing is kept
    wait_until(lambda: queued.finished)                # the next job got the slot
    assert queued.state == "done" and m.running() == 0


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    shutil.copy(CHECKPOINT_DIR / "moe-n8.json", tmp_path / "m.json")
    shutil.copy(CHECKPOINT_DIR / "moe-n8.safetensors", tmp_path / "m.safetensors")
    good = (tmp_path / "m.safetensors").read_bytes()
    model = load("moe-n8").model

    def exploding_save(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "m", name="m", recipe={}, card={})
    assert (tmp_path / "m.safetensors").read_bytes() == good          # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]   # no temp files left
    assert load_file(tmp_path / "m").config.n_experts == 8


def test_oversized_or_malformed_files_get_a_clear_error(tmp_path, monkeypatch):
    shutil.copy(CHECKPOINT_DIR / "moe-n8.json", tmp_path / "m.json")
    with open(tmp_path / "m.safetensors", "wb") as f:
        f.truncate(checkpoint.MAX_WEIGHTS_BYTES + 1)                  # sparse: no real disk use
    with pytest.raises(ValueError, match="larger than"):
        load_file(tmp_path / "m")
    (tmp_path / "m.json").write_text('{"format": "moe-router-lab/1", "name": 3}')
    with pytest.raises(ValueError, match="name"):
        load_file(tmp_path / "m")


@pytest.mark.serving
def test_closing_a_session_cancels_its_training_job():
    """A real Panel server session: when the session is destroyed, its lab job is cancelled."""
    import socket

    import panel as pn
    from app.dashboard import Dashboard
    from tests.conftest import wait_until_served

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    jobs = []

    def app():
        d = Dashboard()
        layout = d.main()                 # builds the lab, which registers its session-destroyed hook
        d.lab.job = lab_mod.manager().submit([Recipe(steps=2000)])
        jobs.append(d.lab.job)
        return layout

    pn.serve({"main": app}, port=port, address="127.0.0.1", threaded=True, show=False,
                      check_unused_sessions_milliseconds=200, unused_session_lifetime_milliseconds=500)
    try:
        assert wait_until_served(f"http://127.0.0.1:{port}/main", 30)
        # that GET made a session no browser ever connects to: the server destroys it as unused
        wait_until(lambda: jobs, 30)
        wait_until(lambda: all(j.state == "cancelled" for j in jobs), 30)
        wait_until(lambda: lab_mod.manager().running() == 0, 30)
    finally:
        pn.state.reset()          # stops the server (calling server.stop() as well raises in Panel 1.9)


def test_browser_test_guard_skips_only_writes_to_closed_pages():
    """tests/conftest.py fails a browser test on any server traceback except tornado's write to a page that
    had already closed (both of its blocks); an app traceback in the next log record still fails it."""
    from tests.conftest import _closed_page_write

    log = ["2026-12-06 05:00:00,000 Task exception was never retrieved\n",
           "future: <Task finished name='Task-1' coro=<WebSocketProtocol13.write_message.<locals>.wrapper() done, "
           "defined at tornado/websocket.py:1138> exception=WebSocketClosedError()>\n",
           "Traceback (most recent call last):\n", "tornado.iostream.StreamClosedError: Stream is closed\n", "\n",
           "During handling of the above exception, another exception occurred:\n", "\n",
           "Traceback (most recent call last):\n", "tornado.websocket.WebSocketClosedError\n",
           "2026-12-06 05:00:01,000 ERROR: a callback raised\n",
           "Traceback (most recent call last):\n", "ValueError: boom\n"]
    verdicts = [_closed_page_write(log, i) for i, line in enumerate(log) if "Traceback" in line]
    assert verdicts == [True, True, False]
