"""Pages of a class that arrives at once are built in turn, so the first students start first (issue #7).

Building a session's page holds the server's event loop for about a second of CPU
(the whole document, the first routing). When a class opens the link within a few
seconds, the page requests queue up and tornado runs them back to back: the pages
already built cannot send their document down their websockets in between, and
every student got their page at about the same late time (load test: 60 pages, all
usable 92-97 s in).

`BuildGate` is a Bokeh application handler. Bokeh awaits every handler's
`on_session_created` before it builds a session's document, so the gate takes an
asyncio lock there and gives it back SHARE x (that build's duration) after the
build: the websockets of the pages already built (their handshake, the document
pull of ~0.8 MB, the first updates) run in that window, while the next page waits.
Measured on 2 cores: 20 lightweight sessions arriving within 2 s, page load p50
11.7 s instead of 18.0 s (max 20.7 instead of 18.4 s); 6 chromium pages, p50 7.0
instead of 9.1 s. A lone student waits for nobody: with no other build the lock is
free.

`skip_document_validation` takes another per-page cost off the server: Bokeh's check of
every new session's document (the tests run it on a served page instead).
"""
from __future__ import annotations

import asyncio
import os
import time

from bokeh.application.handlers.handler import Handler
from bokeh.settings import settings

SHARE = 0.4   # the pause after a build, as a share of that build's time (the window for built pages)


class BuildGate(Handler):
    """A Bokeh handler that builds nothing and lets one session's page be built at a time."""

    def __init__(self, share: float = SHARE) -> None:
        super().__init__()
        self.share = share
        self._lock: asyncio.Lock | None = None
        self.builds = 0               # sessions that went through the gate
        self.waited = 0               # ... and of them, those that found another build in progress

    def modify_document(self, doc) -> None:       # the app's own handler builds the page
        pass

    async def on_session_created(self, session_context) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        self.builds += 1
        if self._lock.locked():
            self.waited += 1
        await self._lock.acquire()
        loop, t0 = asyncio.get_running_loop(), time.monotonic()
        # Bokeh builds the document as soon as this returns, in the same callback: the first callback
        # scheduled here runs once that build is done, and holds the gate a while longer
        loop.call_soon(lambda: loop.call_later(self.share * (time.monotonic() - t0), self._lock.release))


def install(session_context) -> BuildGate | None:
    """Add one BuildGate to the application being served (idempotent; the session being built now is not gated).

    `session_context` is the current Bokeh session's (pn.state.curdoc.session_context); None
    outside a server (`--warm`, tests that build the dashboard directly), where there is nothing to gate.
    """
    try:
        app = session_context.server_context.application_context.application
    except AttributeError:
        return None
    for h in app.handlers:
        if isinstance(h, BuildGate):
            return h
    gate = BuildGate()
    app.add(gate)
    return gate


def skip_document_validation() -> bool:
    """Bokeh checks every new session's whole document for mistakes (missing renderers, columns of
    unequal length...) and only logs what it finds: 9 % of a session's server CPU here (0.87 -> 0.79 s
    per session opened, 15 sessions, median of two runs). The server skips it;
    tests/test_serving.py runs the same checks on a served page instead. BOKEH_VALIDATE_DOC=true
    turns them back on (a developer's choice wins). Returns whether validation is now off."""
    if "BOKEH_VALIDATE_DOC" not in os.environ:
        settings.perform_document_validation.set_value(False)
    return not settings.perform_document_validation()
