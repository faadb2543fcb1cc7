"""Memory probe: open and close many sessions of the served app, then count what is still alive.

    python scripts/memprobe.py [--mode http|ws|browser] [--cycles 30] [--batch 5] [--tracemalloc] [--json]
                               [--referrers Dashboard]

Why this exists: a server that keeps a little of every closed session grows
without bound over a school day (issue #8). RSS alone cannot tell a leak from
the allocator keeping freed pages, so this probe serves `app/main.py` IN THIS
PROCESS (Panel's server on a background thread) and, after the sessions are
closed and destroyed and `gc.collect()` has run, counts the live objects of the
types a session owns: `app.dashboard.Dashboard`, `RouterState`, `TrainingLab`,
`bokeh.document.Document`, `ColumnDataSource`... With no leak those counts go
back to their idle values; a count that grows by one per cycle is a leak, and
`--referrers TYPE` prints what holds the survivors (gc.get_referrers chains).

Modes (how a session is opened and closed):
  http     GET /main (the server builds the whole document), never connect; the
           server destroys the session after --unused-session-lifetime.
  ws       `bokeh.client.pull_session`, then close the websocket (a connected session).
  browser  a real headless chromium page (CHROMIUM_PATH), then close its context.

Reports RSS (VmRSS of this process) idle, after all cycles, and after gc, and the
live-object counts before and after.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHED = ("Dashboard", "RouterState", "TrainingLab", "RouterScreen", "Document", "ColumnDataSource", "Figure",
           "ServerSession", "BokehSessionContext", "Template", "BootstrapTemplate", "Tabs", "HeatmapView",
           "FlowView", "Notification", "NotificationArea", "Location")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def live_counts(names=WATCHED) -> dict[str, int]:
    """Live objects per class name (gc-tracked objects only, i.e. every instance of a Python class)."""
    gc.collect()
    c = Counter(type(o).__name__ for o in gc.get_objects())
    return {n: c.get(n, 0) for n in names}


def full_gc() -> None:
    for _ in range(3):
        gc.collect()
    sys.path.insert(0, str(ROOT))
    from app.allocator import release_freed_memory

    release_freed_memory()        # as the server's housekeeping does: RSS then shows what is really held


class AppServer:
    """`app/main.py` served by Panel on a thread of this process (port chosen by the OS)."""

    def __init__(self, unused_lifetime_ms: int = 500, check_ms: int = 200):
        import panel as pn
        from panel.io.state import state

        sys.path.insert(0, str(ROOT))
        os.chdir(ROOT)
        self._thread = pn.serve({"main": str(ROOT / "app" / "main.py")}, port=0, address="127.0.0.1",
                                show=False, threaded=True, websocket_origin="*",
                                check_unused_sessions_milliseconds=check_ms,
                                unused_session_lifetime_milliseconds=unused_lifetime_ms)
        deadline = time.monotonic() + 60
        while self._thread.server_id not in state._servers:
            if time.monotonic() > deadline:
                raise RuntimeError("the Panel server did not start within 60 s")
            time.sleep(0.05)
        self.server = state._servers[self._thread.server_id][0]
        self.url = f"http://127.0.0.1:{self.server.port}/main"

    def n_sessions(self) -> int:
        return len(self.server.get_sessions("/main"))

    def wait_sessions(self, n: int = 0, timeout_s: float = 60.0) -> bool:
        """Wait until the server holds at most n sessions of /main (closed ones get destroyed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.n_sessions() <= n:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        self._thread.stop()


class Opener:
    """Opens and closes sessions in one of the three modes."""

    def __init__(self, mode: str, url: str):
        self.mode, self.url = mode, url
        self._pw = self._browser = None
        if mode == "browser":
            from playwright.sync_api import sync_playwright

            self._pw = sync_playwright().start()
            self._browser = self._pw.chromium.launch(
                executable_path=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"),
                args=["--headless", "--no-sandbox", "--disable-gpu"])

    def open(self):
        if self.mode == "http":
            import requests

            r = requests.get(self.url, timeout=120)
            r.raise_for_status()
            return None
        if self.mode == "ws":
            from bokeh.client import pull_session

            return pull_session(url=self.url)
        ctx = self._browser.new_context(viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        page.set_default_timeout(180_000)     # a loaded 2-core machine can take a minute to build a session
        page.goto(self.url)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length && "
                               "Bokeh.documents[0].get_model_by_name('router_screen') !== null", timeout=180_000)
        # open every tab once (a tab is built the first time it is shown), then back
        # to the first; through the tab bar's model, since a narrow window can hide tab buttons from a click
        find = ("Bokeh.documents.map(d => d.get_model_by_name('main_tabs')).find(t => t)")
        n_tabs = page.evaluate(f"() => {{ const t = {find}; return t ? t.labels.length : 0; }}")
        for i in [*range(1, n_tabs), 0]:
            page.evaluate(f"(i) => {{ const t = {find}; if (t) t.active = i; }}", i)
            page.wait_for_timeout(300)
        return ctx

    def close(self, handle) -> None:
        if handle is not None:
            handle.close()

    def use(self, ctx, rng, texts) -> None:
        """One soak-like action on an open browser session (the soak's own, scripts/soak.py)."""
        sys.path.insert(0, str(ROOT))
        from scripts.soak import student_action

        student_action(ctx.pages[0], rng, texts)

    def shutdown(self) -> None:
        if self._browser is not None:
            self._browser.close()
            self._pw.stop()


def backref_chain(obj, max_depth: int = 40) -> list:
    """The shortest chain of references from a module (a GC root that lives forever) down to obj.

    Builds the reverse reference graph of all gc-tracked objects once (gc.get_referrers per node would
    scan the whole heap each time), then searches it breadth-first -- the idea of
    objgraph.find_backref_chain. Frames are skipped (the probe's own locals). Returns [module, ..., obj],
    or [] when no module reaches obj (e.g. only a running thread's frame holds it)."""
    import types

    gc.collect()
    everything = gc.get_objects()
    by_id = {id(o): o for o in everything}
    back: dict[int, list[int]] = {}
    for o in everything:
        if isinstance(o, types.FrameType):
            continue
        for r in gc.get_referents(o):
            if id(r) in by_id:
                back.setdefault(id(r), []).append(id(o))
    skip = {id(everything), id(by_id), id(back)}
    parent = {id(obj): None}
    frontier = [id(obj)]
    for _ in range(max_depth):
        nxt = []
        for i in frontier:
            for j in back.get(i, ()):
                if j in parent or j in skip:
                    continue
                parent[j] = i
                o = by_id[j]
                if isinstance(o, types.ModuleType):
                    chain, k = [], j
                    while k is not None:
                        chain.append(by_id.get(k, obj))
                        k = parent[k]
                    return chain
                nxt.append(j)
        frontier = nxt
        if not frontier:
            break
    return []


def describe(o) -> str:
    import types

    if isinstance(o, types.ModuleType):
        return f"module {o.__name__}"
    if isinstance(o, dict):
        return f"dict(len={len(o)}, keys={[str(k)[:40] for k in list(o)[:5]]})"
    if isinstance(o, (list, tuple, set, frozenset)):
        return f"{type(o).__name__}(len={len(o)})"
    if isinstance(o, types.FunctionType):
        return f"function {o.__module__}.{o.__qualname__}"
    if isinstance(o, types.MethodType):
        return f"bound method {o.__qualname__}"
    if isinstance(o, types.CellType):
        return "cell"
    return f"{type(o).__module__}.{type(o).__qualname__}"


def referrer_chains(type_name: str, limit: int = 2) -> list[str]:
    """What keeps the first `limit` live instances of type_name alive, as module -> ... -> object chains."""
    gc.collect()
    objs = [o for o in gc.get_objects() if type(o).__name__ == type_name][-limit:]
    out = []
    for obj in objs:
        chain = backref_chain(obj)
        out.append("\n".join(["== chain:" if chain else "== no chain from a module (held by a thread/frame?)"]
                             + ["   " + describe(c) for c in chain]))
    del objs
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["http", "ws", "browser"], default="http")
    ap.add_argument("--cycles", type=int, default=30, help="sessions opened and closed in total")
    ap.add_argument("--batch", type=int, default=5, help="sessions open at once")
    ap.add_argument("--tracemalloc", action="store_true", help="print the top allocation growth (slow)")
    ap.add_argument("--use-minutes", type=float, default=0.0,
                    help="browser mode: after the cycles, keep --batch sessions open and busy this long "
                         "(what scripts/soak.py does) and report the growth while they are open")
    ap.add_argument("--frames", type=int, default=1, help="traceback depth for --tracemalloc")
    ap.add_argument("--referrers", default="", help="print what holds the live instances of this class name")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.cycles < 1 or args.batch < 1:
        print("memprobe: --cycles and --batch must be at least 1", file=sys.stderr)
        return 2

    srv = AppServer()
    opener = Opener(args.mode, srv.url)
    result: dict = {"mode": args.mode, "cycles": args.cycles, "batch": args.batch}
    try:
        # one warm-up session: imports, model loading and first-use caches are not a leak
        opener.close(opener.open())
        srv.wait_sessions(0)
        full_gc()
        idle = live_counts()
        result["rss_mb_idle"] = round(rss_mb(), 1)
        if args.tracemalloc:
            import tracemalloc

            tracemalloc.start(args.frames)
            snap0 = tracemalloc.take_snapshot()
            traced0 = tracemalloc.get_traced_memory()[0]
        t0 = time.monotonic()
        done = 0
        curve: list[float] = []
        while done < args.cycles:
            handles = [opener.open() for _ in range(min(args.batch, args.cycles - done))]
            for h in handles:
                opener.close(h)
            done += len(handles)
            # in ws mode each handle holds the client's own copy of the document (this process is also
            # the client): drop them, or the last batch's copies are counted as the server's survivors
            del handles, h
            srv.wait_sessions(0)
            curve.append(round(rss_mb(), 1))
        result["cycle_s"] = round((time.monotonic() - t0) / args.cycles, 2)
        result["rss_mb_after_cycles"] = round(rss_mb(), 1)
        result["rss_mb_per_batch"] = curve
        result["sessions_left"] = srv.n_sessions()
        time.sleep(1.0)
        full_gc()
        after = live_counts()
        result["rss_mb_after_gc"] = round(rss_mb(), 1)
        result["kb_per_session"] = round(1024 * (result["rss_mb_after_gc"] - result["rss_mb_idle"]) / args.cycles, 1)
        result["live_idle"] = {k: v for k, v in idle.items() if v or after[k]}
        result["live_after"] = {k: v for k, v in after.items() if v or idle[k]}
        if args.use_minutes > 0:
            if args.mode != "browser":
                raise SystemExit("memprobe: --use-minutes needs --mode browser")
            import random

            from app.state import examples

            rng = random.Random(0)
            texts = [*examples().values(), "<script>alert(1)</script>", "\u202eevil\u202c", "7 " * 400]
            handles = [opener.open() for _ in range(args.batch)]
            time.sleep(2)
            result["use_rss_mb_open_untrimmed"] = round(rss_mb(), 1)
            full_gc()
            result["use_live_open"] = {k: v for k, v in live_counts().items() if v}
            result["use_rss_mb_open"] = round(rss_mb(), 1)
            if args.tracemalloc:
                snap_open = tracemalloc.take_snapshot()
                traced_open = tracemalloc.get_traced_memory()[0]
            end = time.monotonic() + 60 * args.use_minutes
            actions = failures = 0
            while time.monotonic() < end:
                for h in handles:
                    try:
                        opener.use(h, rng, texts)
                        actions += 1
                    except Exception as e:  # noqa: BLE001 - counted; the probe measures memory, not the UI
                        failures += 1
                        print(f"action failed: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
                    time.sleep(0.2)
            time.sleep(2)
            result["use_rss_mb_end_untrimmed"] = round(rss_mb(), 1)
            full_gc()
            result["use_actions"] = [actions, failures]
            result["use_rss_mb_end"] = round(rss_mb(), 1)
            result["use_live_end"] = {k: v for k, v in live_counts().items() if v}
            if args.tracemalloc:
                snap_end = tracemalloc.take_snapshot()
                result["use_traced_mb_growth"] = round((tracemalloc.get_traced_memory()[0] - traced_open) / 2**20, 2)
                result["use_tracemalloc_top"] = []
                for st in snap_end.compare_to(snap_open, "traceback")[:10]:
                    result["use_tracemalloc_top"].append(f"{st.size_diff / 1024:+.0f} KiB in {st.count_diff:+d} blocks")
                    result["use_tracemalloc_top"].extend("    " + ln for ln in st.traceback.format()[-2 * args.frames:])
            for h in handles:
                opener.close(h)
            srv.wait_sessions(0)
            full_gc()
            result["use_rss_mb_after_close"] = round(rss_mb(), 1)
            result["use_live_after_close"] = {k: v for k, v in live_counts().items() if v}
        if args.tracemalloc:
            snap1 = tracemalloc.take_snapshot()
            result["traced_mb_growth"] = round((tracemalloc.get_traced_memory()[0] - traced0) / 2**20, 2)
            stats = snap1.compare_to(snap0, "traceback")[:10]
            result["tracemalloc_top"] = []
            for s in stats:
                result["tracemalloc_top"].append(f"{s.size_diff / 1024:+.0f} KiB in {s.count_diff:+d} blocks")
                result["tracemalloc_top"].extend("    " + ln for ln in s.traceback.format()[-8:])
        if args.referrers:
            result["referrers"] = referrer_chains(args.referrers)
    finally:
        opener.shutdown()
        srv.stop()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            if k in ("referrers", "tracemalloc_top", "use_tracemalloc_top"):
                print(f"{k}:")
                print("\n".join(v))
            else:
                print(f"{k:22s} {v}")
    leaked = result["live_after"].get("Dashboard", 0) > result["live_idle"].get("Dashboard", 0)
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
