"""No per-session memory retention (issues #7 and #8).

A classroom server opens and closes hundreds of sessions in a day; anything
that keeps a closed session reachable (a callback on a process-wide object, a
timer armed from the session's context, a cache keyed by document) grows the
server until it dies. These tests serve `app/main.py` IN THIS PROCESS (the
same server `scripts/memprobe.py` uses), open and close sessions, and then
count the live objects a session owns after `gc.collect()`. Counting objects,
not RSS, is what makes them exact: a closed session either is garbage or is
not, whatever the allocator and the machine's load do.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from scripts.memprobe import AppServer, Opener, live_counts

pytestmark = pytest.mark.serving

SESSION_TYPES = ("Dashboard", "RouterState", "TrainingLab", "Document", "ServerSession", "BokehSessionContext")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def server():
    from bokeh.io.state import curstate

    curstate()      # bokeh's process-wide default document: made once, lazily, by the first session; not a leak
    before = live_counts(SESSION_TYPES)         # what other tests in this process may still hold
    threads, gc_threshold = torch.get_num_threads(), gc.get_threshold()
    srv = AppServer(unused_lifetime_ms=1000, check_ms=200)
    yield srv, before
    srv.stop()
    # app/main.py tunes the process for serving (one PyTorch thread per routing, deferred full GCs):
    # the tests that follow in this process get the defaults back
    torch.set_num_threads(threads)
    gc.set_threshold(*gc_threshold)


def cycle(srv, mode: str, n: int, batch: int) -> None:
    """Open n sessions (batch at a time, so several are usually alive together), then close them."""
    opener = Opener(mode, srv.url)
    try:
        done = 0
        while done < n:
            handles = [opener.open() for _ in range(min(batch, n - done))]
            for h in handles:
                opener.close(h)
            done += len(handles)
            assert srv.wait_sessions(0, timeout_s=120), f"{srv.n_sessions()} session(s) never got destroyed"
    finally:
        opener.shutdown()


def destroyed_document_shells() -> int:
    """Documents that Bokeh has destroyed (destroy() deletes their roots) but something still references.

    After browser sessions, one such empty shell stays referenced by a contextvars Context inside the
    server's event loop (Panel keeps curdoc in a ContextVar); each newer session replaces it, so it is
    bounded at one, holds no models, and is not counted as a leak below."""
    from bokeh.document import Document

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Document and not hasattr(o, "_roots"))


def assert_nothing_kept(before: dict) -> None:
    gc.collect()
    after = live_counts(SESSION_TYPES)
    after["Document"] -= destroyed_document_shells()
    kept = {k: after[k] - before[k] for k in SESSION_TYPES if after[k] > before[k]}
    assert not kept, (f"closed sessions are still alive: {kept} more than before the server started; "
                      f"run `python scripts/memprobe.py --referrers Dashboard` to see what holds them")
    assert destroyed_document_shells() <= 1, "destroyed documents pile up: something keeps every session's"


def test_twenty_closed_sessions_leave_nothing_alive(server):
    srv, before = server
    cycle(srv, "http", 20, batch=4)
    assert_nothing_kept(before)


def test_the_first_session_is_not_kept_by_process_wide_tasks(server):
    """The first session runs the once-per-process setup (schedule_task, caches); it must not stay behind.

    Regression: `pn.state.schedule_task` arms an IOLoop timer, which copies the current contextvars context,
    i.e. the first session's document, and re-arms itself from it every period."""
    srv, before = server
    cycle(srv, "http", 1, batch=1)
    assert_nothing_kept(before)


@pytest.mark.ui
def test_closed_browser_sessions_leave_nothing_alive(server):
    """Real chromium pages: the websocket, onload callbacks and every tab rendered, then the page closed."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}; set CHROMIUM_PATH", pytrace=False)
    srv, before = server
    cycle(srv, "browser", 4, batch=2)
    assert_nothing_kept(before)


def test_release_freed_memory_is_safe_to_call():
    from app.allocator import release_freed_memory

    assert isinstance(release_freed_memory(), bool)
    assert isinstance(release_freed_memory(), bool)     # twice: nothing left to release is not an error
