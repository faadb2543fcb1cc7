"""app/gate.py: page builds of sessions created at once run one at a time, with a pause after each."""
import asyncio
import time

from app.gate import BuildGate, install


def test_builds_run_one_at_a_time_and_pause_after_each():
    gate = BuildGate(share=0.5)
    spans = []

    async def session(build_s: float):
        await gate.on_session_created(None)
        t0 = time.monotonic()
        time.sleep(build_s)                 # Bokeh builds the document synchronously right after the hook
        spans.append((t0, time.monotonic()))

    async def main():
        await asyncio.gather(*(session(0.1) for _ in range(3)))

    asyncio.run(main())
    spans.sort()
    assert len(spans) == 3 and gate.builds == 3 and gate.waited == 2
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        assert s1 >= e0 + 0.5 * (e0 - s0) * 0.9       # no overlap, and the pause after each build


def test_a_lone_session_waits_for_nobody():
    gate = BuildGate()

    async def main():
        t0 = time.monotonic()
        await gate.on_session_created(None)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 0.05 and gate.waited == 0


class _App:
    def __init__(self):
        self.handlers = []

    def add(self, h):
        self.handlers.append(h)


class _Ctx:
    def __init__(self, app):
        self.server_context = type("S", (), {"application_context": type("A", (), {"application": app})()})()


def test_install_adds_one_gate_per_application_and_ignores_no_server():
    app = _App()
    g1, g2 = install(_Ctx(app)), install(_Ctx(app))
    assert g1 is g2 and isinstance(g1, BuildGate) and app.handlers == [g1]
    assert install(None) is None
