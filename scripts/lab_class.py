"""Training lab under a class: many sessions training at once, measured against a real `panel serve`.

    python scripts/lab_class.py [--sessions 30] [--others 5] [--browsers 0] [--out docs/measurements/lab_class.json]
    python scripts/lab_class.py --url http://127.0.0.1:5731/main --server-pid PID   # a server already running

The students are websocket-level sessions (scripts/loadtest.py's LightSession: the page is
fetched, the document pulled and changed the way BokehJS does, nothing rendered) that open the
Training lab tab, pick a preset and a seed and press Train; each reads the lab's status line as
the server sends it. `--browsers K` makes the first K of them real chromium pages (Playwright).
`--others` more sessions stay on the Router tab and change k every 1-2 s throughout.

Phases (after everyone has opened the lab):
  idle      the others' k updates with nothing training (the baseline)
  one_job   one student trains the first preset alone: "one job" (click until done)
  a         every student presses Train on the same preset within 10 s: each sees it start
            (click until the status says running or done) within 2 s?
  b         the students use 5 different recipes (6 each), within 10 s: all done within
            5 x one job + 10 s?
  c         the others' k updates while a and b train: p95 <= 0.5 s?
  lost      a student starts a long job alone and its page closes: seconds until the
            server's CPU falls back to idle (the job stopped)
Writes the figures as JSON (--out) and prints them.
"""
from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from loadtest import (
    LightSession,
    Server,
    cpu_s,
    free_port,
    machine,
    process_tree,
    summary,
    walk_objects,
)

from moe_core.train.lab import RECIPES

PRESETS = list(RECIPES)
STATUS = re.compile(r"lab-status'>(?:(\w+): step (\d+)/(\d+)|(Waiting for a free training slot))")
# Phase b: five different recipes, none trained before in this run (phase a trains seed 0 of the first preset)
RECIPES_B = [(p, 1) for p in PRESETS] + [(PRESETS[0], 2)]


class LabSession(LightSession):
    """A LightSession that opens the Training lab tab and presses Train; it keeps the lab's status line."""

    def _index(self, objs: dict) -> None:
        super()._index(objs)
        self.lab: dict = {}
        self.statuses: list[tuple[float, str, int]] = []     # (time, state, step) as the server sent them
        self.tabs = next(i for i, (k, a) in objs.items()
                         if str(k).endswith("RadioButtonGroup") and "Training lab" in (a.get("labels") or []))
        self.tab_labels = objs[self.tabs][1]["labels"]
        consume = self.receiver.consume

        async def read(frag):           # every document patch: the lab's models once built, its status line
            msg = await consume(frag)
            if msg is not None and msg.msgtype == "PATCH-DOC":
                self._lab_patch(msg.content.get("events", []))
            return msg
        self.receiver.consume = read

    def _lab_patch(self, events: list) -> None:
        if not self.lab:
            found: dict = {}
            walk_objects(events, found)
            for i, (k, a) in found.items():
                title = str(a.get("title") or "")
                if "lab-status" in str(a.get("text", "")):
                    self.lab["status"] = i
                elif str(k).endswith("Button") and a.get("label") == "Train":
                    self.lab["train"] = i
                elif title == "Preset":
                    self.lab["preset"] = i
                elif title == "Seed":
                    self.lab["seed"] = i
            if len(self.lab) < 4:
                self.lab = {}
        now = time.monotonic()
        for ev in events:
            if (ev.get("model") or {}).get("id") == self.lab.get("status") and ev.get("attr") == "text":
                m = STATUS.search(html.unescape(str(ev.get("new"))))
                if m:
                    self.statuses.append((now, m.group(1) or "queued", int(m.group(2) or 0)))

    async def open_lab(self) -> float:
        t0 = time.monotonic()
        await self.open()
        await self._send("PATCH-DOC", {"events": [{"kind": "ModelChanged", "model": {"id": self.tabs},
                                                   "attr": "active", "new": self.tab_labels.index("Training lab")}]})
        while not self.lab:
            if self.closed or time.monotonic() - t0 > self.timeout_s:
                raise RuntimeError("the Training lab tab did not arrive")
            await asyncio.sleep(0.05)
        return time.monotonic() - t0

    async def choose(self, preset: str, seed: int) -> None:
        await self._send("PATCH-DOC", {"events": [
            {"kind": "ModelChanged", "model": {"id": self.lab["preset"]}, "attr": "value", "new": preset},
            {"kind": "ModelChanged", "model": {"id": self.lab["seed"]}, "attr": "value", "new": seed}]})

    async def train(self) -> float:
        """Press Train; returns the time it was pressed."""
        t = time.monotonic()
        await self._send("PATCH-DOC", {"events": [{"kind": "MessageSent", "msg_type": "bokeh_event", "msg_data": {
            "type": "event", "name": "button_click",
            "values": {"type": "map", "entries": [["model", {"id": self.lab["train"]}]]}}}]})
        return t

    async def until(self, since: float, states: tuple[str, ...], timeout_s: float) -> float:
        """The first time after `since` that the status said one of `states` (running/done: with a step made)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t, st, step in self.statuses:
                if t >= since and st in states and (st == "queued" or step > 0 or st == "done"):
                    return t
            await asyncio.sleep(0.05)
        raise TimeoutError(f"status not {states} within {timeout_s} s; last {self.statuses[-3:]}")


# ----------------------------------------------------------------------------- browser pages

BROWSER_STATUS = """() => { for (const m of Bokeh.documents[0].all_models)
    if (typeof m.text === 'string' && m.text.includes('lab-status')) return m.text; return null; }"""


class BrowserStudent:
    """A chromium page: opens the lab tab, picks a preset and seed in its widgets, presses Train."""

    def __init__(self, browser, url: str, timeout_s: float):
        self.browser, self.url, self.timeout_s = browser, url, timeout_s
        self.statuses: list[tuple[float, str, int]] = []

    async def open_lab(self) -> float:
        t0 = time.monotonic()
        self.ctx = await self.browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = await self.ctx.new_page()
        self.page.set_default_timeout(self.timeout_s * 1000)
        await self.page.goto(self.url + "?tab=lab")
        await self.page.wait_for_function(f"() => window.Bokeh && Bokeh.documents.length && ({BROWSER_STATUS})()")
        self.watcher = asyncio.create_task(self._watch())
        return time.monotonic() - t0

    async def _watch(self):
        """The status line each time it changes (as the light sessions see it: the page keeps showing
        the last job's status until the server sends the new one)."""
        last = None
        while True:
            text = await self.page.evaluate(BROWSER_STATUS)
            m = STATUS.search(html.unescape(text or ""))
            if m and text != last:
                self.statuses.append((time.monotonic(), m.group(1) or "queued", int(m.group(2) or 0)))
            last = text
            await asyncio.sleep(0.1)

    async def choose(self, preset: str, seed: int) -> None:
        group = self.page.locator(".bk-input-group")
        await group.filter(has_text="Preset").locator("select").first.select_option(preset)
        seed_box = group.filter(has_text="Seed").locator("input").first
        await seed_box.fill(str(seed))
        await seed_box.press("Enter")

    async def train(self) -> float:
        t = time.monotonic()
        await self.page.get_by_role("button", name="Train", exact=True).click()
        return t

    until = LabSession.until

    def close(self):
        self.watcher.cancel()
        return self.ctx.close()


# ----------------------------------------------------------------------------- the run


async def k_changer(sessions: list[LightSession], log: list, stop: asyncio.Event, seed: int):
    """The other students: each changes k every 1-2 s; every update is logged with its time."""
    async def one(i, s):
        r = random.Random(seed + i)
        while not stop.is_set():
            await asyncio.sleep(r.uniform(1, 2))
            try:
                t = time.monotonic()
                log.append((t, await s.act("k", r)))
            except Exception as e:  # noqa: BLE001 - counted, the student carries on
                log.append((time.monotonic(), None, f"{type(e).__name__}: {str(e)[:120]}"))
    await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))


def window(log: list, t0: float, t1: float) -> dict:
    xs = [x[1] for x in log if t0 <= x[0] < t1 and x[1] is not None]
    out = summary(xs)
    out["failed"] = sum(1 for x in log if t0 <= x[0] < t1 and x[1] is None)
    return out


class CpuMeter:
    """The server's CPU (cores-worth) between two marks."""

    def __init__(self, pids):
        self.pids = pids
        self.mark()

    def now(self) -> float:
        return sum(cpu_s(p) for p in self.pids)

    def mark(self):
        self.t, self.c = time.monotonic(), self.now()

    def cores(self) -> float | None:
        if not self.pids:
            return None
        return round((self.now() - self.c) / max(1e-6, time.monotonic() - self.t), 2)


async def run(url: str, pids: list[int], args) -> dict:
    res: dict = {}
    rng = random.Random(args.seed)
    pw = browser = None
    if args.browsers:
        from playwright.async_api import async_playwright
        pw = await async_playwright().start()
        browser = await pw.chromium.launch(executable_path=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"),
                                           args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
    students = [BrowserStudent(browser, url, args.timeout) if i < args.browsers else LabSession(url, timeout_s=args.timeout)
                for i in range(args.sessions)]
    others = [LightSession(url, timeout_s=args.timeout) for _ in range(args.others)]
    lone = LabSession(url, timeout_s=args.timeout)
    sem = asyncio.Semaphore(4)           # open a few at a time: arrival is not what this measures

    async def opened(s):
        async with sem:
            return await (s.open_lab() if hasattr(s, "open_lab") else s.open())
    t = time.monotonic()
    res["open_s"] = summary(list(await asyncio.gather(*(opened(s) for s in [*students, *others, lone]))))
    # the chromium pages stand for the students' own computers: lowest CPU priority, as in loadtest.py
    for pid in process_tree(os.getpid())[1:]:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, 19)
        except OSError:
            pass
    print(f"[{time.monotonic() - t:5.0f} s] {len(students)} students, {len(others)} others, 1 lone page open",
          file=sys.stderr)

    log: list = []
    stop = asyncio.Event()
    changer = asyncio.create_task(k_changer(others, log, stop, args.seed))
    cpu = CpuMeter(pids)
    phases: dict = {}

    # idle: nothing trains
    t0 = time.monotonic()
    await asyncio.sleep(args.idle)
    phases["idle"] = (t0, time.monotonic(), cpu.cores())

    # one job alone (the first preset, a seed nobody else uses)
    s0 = students[0]
    await s0.choose(PRESETS[0], 3)
    await asyncio.sleep(1.0)
    cpu.mark()
    t0 = await s0.train()
    done = await s0.until(t0, ("done",), args.timeout * 5)
    one_job = done - t0
    phases["one_job"] = (t0, done, cpu.cores())
    res["one_job_s"] = round(one_job, 1)
    print(f"one job: {one_job:.1f} s", file=sys.stderr)

    # a: everyone presses Train on the same preset (seed 0) within 10 s
    await asyncio.gather(*(s.choose(PRESETS[0], 0) for s in students))
    await asyncio.sleep(2.0)
    cpu.mark()
    t_a = time.monotonic()

    async def press(s, delay):
        await asyncio.sleep(delay)
        t = await s.train()
        started = await s.until(t, ("running", "done"), args.timeout * 5)
        finished = await s.until(t, ("done",), args.timeout * 5)
        return t, started - t, finished
    out = await asyncio.gather(*(press(s, rng.uniform(0, args.arrival)) for s in students),
                               return_exceptions=True)
    ok = [o for o in out if not isinstance(o, BaseException)]
    starts = [o[1] for o in ok]
    phases["a"] = (t_a, max(o[2] for o in ok) if ok else time.monotonic(), cpu.cores())
    res["a_same_preset"] = {"sessions": len(students), "start_s": summary(starts),
                            "within_2_s": sum(x <= 2.0 for x in starts), "failures": len(out) - len(ok),
                            "failure_samples": [repr(o)[:160] for o in out if isinstance(o, BaseException)][:3],
                            "all_done_s": round(phases["a"][1] - t_a, 1)}
    print(f"a: {res['a_same_preset']}", file=sys.stderr)

    # b: five recipes, six students each, within 10 s
    await asyncio.gather(*(s.choose(*RECIPES_B[i % len(RECIPES_B)]) for i, s in enumerate(students)))
    await asyncio.sleep(2.0)
    cpu.mark()
    t_b = time.monotonic()
    out = await asyncio.gather(*(press(s, rng.uniform(0, args.arrival)) for s in students),
                               return_exceptions=True)
    ok = [o for o in out if not isinstance(o, BaseException)]
    phases["b"] = (t_b, max(o[2] for o in ok) if ok else time.monotonic(), cpu.cores())
    all_done = phases["b"][1] - t_b
    res["b_five_recipes"] = {"sessions": len(students), "recipes": len(RECIPES_B),
                             "start_s": summary([o[1] for o in ok]), "failures": len(out) - len(ok),
                             "failure_samples": [repr(o)[:160] for o in out if isinstance(o, BaseException)][:3],
                             "all_done_s": round(all_done, 1), "target_s": round(len(RECIPES_B) * one_job + 10, 1),
                             "met": all_done <= len(RECIPES_B) * one_job + 10}
    print(f"b: {res['b_five_recipes']}", file=sys.stderr)
    stop.set()
    await changer

    # c: the others' k updates, per phase (a and b: while jobs train)
    res["c_router_updates"] = {name: {**window(log, a, b), "server_cores": c} for name, (a, b, c) in phases.items()}
    training = [x[1] for x in log if x[1] is not None and any(a <= x[0] < b for n, (a, b, _) in phases.items()
                                                                if n != "idle")]
    res["c_router_updates"]["while_training"] = summary(training)
    res["c_met"] = bool(training) and summary(training)["p95_s"] <= 0.5

    # lost: a page alone starts a long job and goes away; how long until the server idles
    if pids:
        await lone.choose(PRESETS[0], 99)
        await asyncio.sleep(1.0)
        t = await lone.train()
        await lone.until(t, ("running",), args.timeout)
        await asyncio.sleep(2.0)
        lone.close()
        t_close = time.monotonic()
        stopped = None
        while time.monotonic() - t_close < 30:
            cpu.mark()
            await asyncio.sleep(0.5)
            if cpu.cores() < 0.3:
                stopped = round(time.monotonic() - t_close, 1)
                break
        res["lost_page_stopped_s"] = stopped
        print(f"lost page: job stopped after {stopped} s", file=sys.stderr)

    for s in [*students, *others]:
        r = s.close()
        if asyncio.iscoroutine(r):
            await r
    if browser is not None:
        await browser.close()
        await pw.stop()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=30, help="students training")
    ap.add_argument("--others", type=int, default=5, help="students on the Router tab changing k")
    ap.add_argument("--browsers", type=int, default=0, help="how many of the students are chromium pages")
    ap.add_argument("--arrival", type=float, default=10, help="students press Train within this many seconds")
    ap.add_argument("--idle", type=float, default=20, help="seconds of k updates with nothing training")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--port", type=int, default=5731)
    ap.add_argument("--url", help="an already running server (…/main) instead of starting one")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's pid, for its CPU figures")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON here (e.g. docs/measurements/lab_class.json)")
    args = ap.parse_args(argv)
    res: dict = {"machine": machine(), "sessions": args.sessions, "others": args.others, "browsers": args.browsers,
                 "arrival_s": args.arrival, "server_env": dict(kv.split("=", 1) for kv in args.server_env)}
    server = None
    try:
        if args.url:
            url, pids = args.url, [args.server_pid] if args.server_pid else []
        else:
            server = Server(port=args.port or free_port(), server_env=res["server_env"],
                            extra=["--unused-session-lifetime", "300000", "--check-unused-sessions", "30000"])
            server.wait_ready()
            url, pids = server.url, [server.proc.pid]
            res["server_cmd"] = " ".join(server.cmd[2:])
        res.update(asyncio.run(run(url, pids, args)))
        if server is not None:
            res["server_tracebacks"] = sum("Traceback" in x for x in server.lines)
    finally:
        if server is not None:
            server.stop()
            (ROOT / "artifacts").mkdir(exist_ok=True)
            (ROOT / "artifacts" / "lab_class_server.log").write_text("".join(server.lines))
    res["load_average_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
