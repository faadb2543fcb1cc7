"""Page weight of the Router tab's first screen (the RouterScreen component), against a real server.

    python scripts/page_weight.py [--light 10] [--pages 5] [--reps 10] [--class 60] [--json] [--out FILE]

The server is started the way the Procfile starts it (its `web:` line: `python -m app.allocator panel
serve app/main.py --num-procs 1 --warm --index main ...`, on loopback, --port P), and these are measured:

1. server CPU per page opened: --light lightweight sessions (scripts/loadtest.py's LightSession: GET the
   page, websocket, PULL-DOC, document_ready, until the RouterScreen has its data) opened one after
   another, each once the server is quiet; the server's CPU time (utime+stime of its process tree,
   reaped children included, /proc/PID/stat) from before the GET until it is quiet again. Also the pulled
   document's size (bytes of every websocket fragment of the reply), its model count, the HTML's size
   and the GET time, and the server's memory per open session.
2. one student on an idle server: chromium, a new browser context per page (a new session), --pages
   pages in turn; from navigation start (the page's performance.timeOrigin) until the first span.tok in
   the RouterScreen's .view-tokens is visible, polled every animation frame. The HTML GET alone comes
   from the page's navigation timing (requestStart to responseEnd).
3. control latency in chromium, on the page's own clock, from the input event (keydown on the k slider's
   handle, click on a button, change of the scheme select) until div.screen's data-seq went up (the new
   data drawn); for the layer switch, drawn in the browser alone, until the layer buttons and the token
   chips have changed, checked every animation frame. (a) a session's first action: a k change right
   after the first token is visible, on each fresh page of 2. (up to --reps of them); (b) k change,
   (c) layer switch, (d) N switch, (e) scheme switch: --reps each on one page, each started once the
   page and the server are quiet. Also the server's CPU per action, and redraws beyond the first.
4. a class (--class N): scripts/loadtest.py with N sessions (5 chromium pages, the rest lightweight)
   arriving within 10 s, its own server; page-ready and update latency.

The clients share the machine with the server (2 cores here): on a busy machine the figures are
indicative only. Exit status: 0 measured, 1 a measurement failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import loadtest  # noqa: E402  (scripts/ is not a package)

PORTS = range(5800, 5850)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
N_GROUP_LABEL = re.compile(r"^\s*\d+\s*$")
SCHEME_A = re.compile(r"^\s*" + re.escape(loadtest.SCHEMES[0]) + r"\s*$")
SCHEME_B = re.compile(r"^\s*" + re.escape(loadtest.SCHEMES[2]) + r"\s*$")


# ----------------------------------------------------------------------------- the server


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of pid and its descendants: utime+stime, plus cutime+cstime (children already reaped)."""
    total = 0
    for p in loadtest.process_tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


async def wait_quiet(pid: int, window_s: float = 0.4, max_cores: float = 0.05, timeout_s: float = 20.0) -> bool:
    """Wait until the server spends at most max_cores of CPU over window_s; False if it never did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        c0 = tree_cpu_s(pid)
        await asyncio.sleep(window_s)
        if tree_cpu_s(pid) - c0 <= max_cores * window_s + 1e-9:
            return True
    return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def pick_port(preferred: int, avoid: tuple[int, ...] = ()) -> int:
    for p in [preferred, *PORTS]:
        if p in PORTS and p not in avoid and port_free(p):
            return p
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


def procfile_command(port: int, app: str) -> list[str]:
    """The Procfile's `web:` command, bound to loopback on `port`, this Python, `app` as the script."""
    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("web:"))
    host = f"127.0.0.1:{port}"
    cmd = shlex.split(line[len("web:"):].replace("$PORT", str(port)).replace("$APP_HOST", host))
    if cmd[:5] != ["python", "-m", "app.allocator", "panel", "serve"]:
        raise RuntimeError(f"the Procfile no longer starts `python -m app.allocator panel serve`: {line}")
    cmd[cmd.index("--address") + 1] = "127.0.0.1"
    cmd[5] = app
    return [sys.executable, *cmd[1:]]


def summary_ms(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return {"n": len(xs), "p50_ms": round(statistics.median(xs), 1), "p95_ms": round(p95, 1),
            "min_ms": round(xs[0], 1), "max_ms": round(xs[-1], 1)}


# ----------------------------------------------------------------------------- 1. server CPU per page


async def light_pages(url: str, pid: int, m: int, timeout_s: float) -> dict:
    """Open m lightweight sessions one after another; server CPU, time and sizes per page."""
    sessions, rows = [], []
    rss0 = loadtest.rss_mb(pid)
    try:
        for _ in range(m):
            quiet = await wait_quiet(pid)
            c0, t0 = tree_cpu_s(pid), time.monotonic()
            s = loadtest.LightSession(url, timeout_s=timeout_s)
            sessions.append(s)
            open_s = await s.open()
            settled = await wait_quiet(pid, timeout_s=15)    # what the server does after the document went out
            rows.append({"cpu_s": tree_cpu_s(pid) - c0, "open_s": open_s, "get_s": s.get_s,
                         "until_quiet_s": time.monotonic() - t0, "html_bytes": s.html_bytes,
                         "doc_bytes": s.doc_bytes, "n_models": s.n_models, "quiet_before": quiet,
                         "quiet_after": settled})
        rss1 = loadtest.rss_mb(pid)
    finally:
        for s in sessions:
            s.close()
    med = lambda k: statistics.median(r[k] for r in rows)   # noqa: E731
    types = sorted(sessions[0].model_types.items(), key=lambda kv: -kv[1])
    return {"pages": m, "server_cpu_s_per_page_median": round(med("cpu_s"), 3),
            "server_cpu_s_per_page_min": round(min(r["cpu_s"] for r in rows), 3),
            "server_cpu_s_per_page_max": round(max(r["cpu_s"] for r in rows), 3),
            "open_s_median": round(med("open_s"), 3), "get_s_median": round(med("get_s"), 3),
            "html_bytes": int(med("html_bytes")), "doc_bytes": int(med("doc_bytes")),
            "doc_models": int(med("n_models")),
            "doc_model_types_top": {str(k).rsplit(".", 1)[-1]: v for k, v in types[:10]},
            "rss_mb_before": round(rss0, 1), "rss_mb_with_all_open": round(rss1, 1),
            "rss_mb_per_open_session": round((rss1 - rss0) / m, 1),
            "server_never_quiet": sum(not (r["quiet_before"] and r["quiet_after"]) for r in rows),
            "per_page": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}


# ----------------------------------------------------------------------------- 2./3. chromium

# Installed in every page before its own scripts (context.add_init_script): performance.now() is the page's
# clock, 0 at navigation start.
INIT = r"""(() => {
  const pw = window.__pw = { firstTok: null, firstTokCount: null, armed: false, t0: null, t0type: null };
  const deep = (root, sel) => { const hit = root.querySelector(sel); if (hit) return hit;
    for (const el of root.querySelectorAll('*')) if (el.shadowRoot) { const h = deep(el.shadowRoot, sel); if (h) return h; }
    return null; };
  pw.root = () => {            // the RouterScreen's shadow root (the one holding div.screen)
    if (pw._root && pw._root.host && pw._root.host.isConnected && pw._root.querySelector('div.screen')) return pw._root;
    const el = deep(document, 'div.screen'); pw._root = el ? el.getRootNode() : null; return pw._root; };
  pw.screen = () => { const r = pw.root(); return r ? r.querySelector('div.screen') : null; };
  pw.seq = () => { const s = pw.screen(); return s ? Number(s.getAttribute('data-seq')) : null; };
  pw.model = () => { if (!(window.Bokeh && Bokeh.documents.length)) return null;
    for (const m of Bokeh.documents[0].all_models) if (m.class_name === 'RouterScreen' && m.data) return m.data;
    return null; };
  const visible = (el) => { const b = el.getBoundingClientRect();
    return b.width > 0 && b.height > 0 && (!el.checkVisibility || el.checkVisibility()); };
  const poll = () => { const r = pw.root();
    if (r) { const toks = r.querySelectorAll('.view-tokens span.tok');
      for (let i = 0; i < Math.min(toks.length, 50); i++) if (visible(toks[i])) {
        pw.firstTok = performance.now(); pw.firstTokCount = toks.length; pw.seqAtFirstTok = pw.seq(); return; } }
    requestAnimationFrame(poll); };
  requestAnimationFrame(poll);
  // the input event that starts the clock (capture phase on window: it sees events inside shadow roots)
  for (const type of ['keydown', 'click', 'change'])
    window.addEventListener(type, (e) => { if (pw.armed && pw.t0 === null && e.type === pw.t0type) pw.t0 = e.timeStamp; }, true);
  // every data-seq seen, from arm() on
  pw.arm = (t0type) => {
    pw.armed = true; pw.t0 = null; pw.t0type = t0type; pw.t1 = null; pw.t1frame = null; pw.nSeq = 0; pw.tLastSeq = null;
    pw.seq0 = pw.seqSeen = pw.seq();
    if (pw.obs) pw.obs.disconnect();
    pw.obs = new MutationObserver(() => { const v = pw.seq();
      if (v !== null && v !== pw.seqSeen) { pw.seqSeen = v; pw.nSeq++; const now = performance.now(); pw.tLastSeq = now;
        if (pw.mode === 'seq' && pw.t1 === null && pw.t0 !== null) { pw.t1 = now;
          requestAnimationFrame(() => { pw.t1frame = performance.now(); }); } } });
    pw.obs.observe(pw.root(), { subtree: true, childList: true, attributes: true, attributeFilter: ['data-seq'] });
  };
  pw.armSeq = (t0type) => { pw.mode = 'seq'; pw.arm(t0type); };
  // the layer switch: drawn in the page alone; done when the layer buttons and the token chips have changed
  pw.armLayer = () => {
    pw.mode = 'layer'; pw.arm('click');
    const r = pw.root();
    const sig = () => Array.from(r.querySelectorAll('button.layer-btn')).map(b =>
      b.getAttributeNames().sort().map(n => n + '=' + b.getAttribute(n)).join(',')).join('|');
    const sig0 = sig(), tokEl0 = r.querySelector('.view-tokens');
    let tokMut = false;
    if (pw.tokObs) pw.tokObs.disconnect();
    pw.tokObs = new MutationObserver((muts) => { for (const m of muts) {
      const el = m.target.nodeType === 1 ? m.target : m.target.parentElement;
      if (el && el.closest && el.closest('.view-tokens')) tokMut = true; } });
    pw.tokObs.observe(r, { subtree: true, childList: true, attributes: true, characterData: true });
    const check = () => {
      if (pw.t0 !== null && (tokMut || r.querySelector('.view-tokens') !== tokEl0) && sig() !== sig0) {
        pw.t1 = pw.t1frame = performance.now(); pw.tokObs.disconnect(); return; }
      requestAnimationFrame(check); };
    requestAnimationFrame(check);
  };
})();"""

NAV = """() => { const n = performance.getEntriesByType('navigation')[0];
    return { request_start_ms: n.requestStart, response_start_ms: n.responseStart, response_end_ms: n.responseEnd,
             dom_content_loaded_ms: n.domContentLoadedEventEnd, load_ms: n.loadEventEnd,
             html_bytes: n.transferSize || n.encodedBodySize }; }"""


class Student:
    """One chromium page (its own context: its own Panel session) and the controls of the first screen."""

    def __init__(self, browser, url: str, pid: int, timeout_s: float):
        self.browser, self.url, self.pid, self.timeout_s = browser, url, pid, timeout_s
        self.ctx = self.page = None

    async def open(self) -> dict:
        self.ctx = await self.browser.new_context(viewport={"width": 1280, "height": 800})
        await self.ctx.add_init_script(INIT)
        self.page = await self.ctx.new_page()
        self.page.set_default_timeout(self.timeout_s * 1000)
        await self.page.goto(self.url, wait_until="commit")
        await self.page.wait_for_function("() => window.__pw && __pw.firstTok !== null", polling=50,
                                          timeout=self.timeout_s * 1000)
        first = await self.page.evaluate("() => [__pw.firstTok, __pw.firstTokCount, __pw.seqAtFirstTok]")
        nav = await self.page.evaluate(NAV)
        return {"first_tok_ms": first[0], "tokens_drawn": first[1], "data_seq_at_first_tok": first[2],
                "html_get_ms": nav["response_end_ms"] - nav["request_start_ms"], **nav}

    async def close(self) -> None:
        if self.ctx is not None:
            await self.ctx.close()
            self.ctx = None

    async def settle(self, stable_s: float = 0.5, timeout_s: float = 20) -> None:
        """Until data-seq has not moved for stable_s and the server is quiet."""
        deadline = time.monotonic() + timeout_s
        last = await self.page.evaluate("() => __pw.seq()")
        while time.monotonic() < deadline:
            await asyncio.sleep(stable_s)
            now = await self.page.evaluate("() => __pw.seq()")
            if now == last and await wait_quiet(self.pid, timeout_s=max(0.5, deadline - time.monotonic())):
                return
            last = now

    async def _measure(self, arm: str, act, after_s: float = 1.0) -> dict:
        c0 = tree_cpu_s(self.pid)
        await self.page.evaluate(arm)
        await act()
        try:
            await self.page.wait_for_function("() => __pw.t1 !== null && __pw.t1frame !== null", polling=20,
                                              timeout=self.timeout_s * 1000)
        except Exception:
            state = await self.page.evaluate("() => ({t0: __pw.t0, nSeq: __pw.nSeq, seq: __pw.seq(), mode: __pw.mode})")
            raise RuntimeError(f"no redraw within {self.timeout_s} s ({state})") from None
        await asyncio.sleep(after_s)               # redraws that follow the first one (counted)
        await wait_quiet(self.pid, timeout_s=10)
        r = await self.page.evaluate("() => ({t0: __pw.t0, t1: __pw.t1, t1frame: __pw.t1frame, n: __pw.nSeq})")
        await self.page.evaluate("() => { __pw.armed = false; if (__pw.obs) __pw.obs.disconnect(); }")
        if r["t0"] is None:
            raise RuntimeError("the input event was not seen")
        return {"ms": r["t1"] - r["t0"], "frame_ms": r["t1frame"] - r["t0"], "redraws": r["n"],
                "server_cpu_s": tree_cpu_s(self.pid) - c0}

    async def k_change(self) -> dict:
        k = await self.page.evaluate(loadtest.K_VALUE)
        group = self.page.locator(".bk-input-group").filter(
            has=self.page.locator(".bk-slider-title", has_text=loadtest.K_TITLE))
        handle = group.locator(".noUi-handle").first
        await handle.focus()
        key = "ArrowRight" if k is None or k < 3 else "ArrowLeft"
        return {"k_from": k, **await self._measure("() => __pw.armSeq('keydown')", lambda: handle.press(key))}

    async def layer_switch(self) -> dict:
        layers = await self.page.locator("button.layer-btn").evaluate_all("bs => bs.map(b => b.dataset.layer)")
        cur = await self.page.evaluate("() => { const m = __pw.model(); return m ? m.layer : null; }")
        if len(layers) < 2:
            raise RuntimeError(f"fewer than 2 layer buttons: {layers}")
        i = next((j for j, v in enumerate(layers) if str(v) == str(cur)), -1)
        target = layers[(i + 1) % len(layers)]
        btn = self.page.locator(f'button.layer-btn[data-layer="{target}"]').first
        return {"layer_from": cur, "layer_to": target,
                **await self._measure("() => __pw.armLayer()", lambda: btn.click(), after_s=1.5)}

    async def n_switch(self) -> dict:
        group = self.page.locator(".bk-btn-group").filter(
            has=self.page.locator("button", has_text=N_GROUP_LABEL)).first
        buttons = group.locator("button")
        states = await buttons.evaluate_all("bs => bs.map(b => [b.textContent.trim(), b.classList.contains('bk-active')])")
        i = next((j for j, (_, on) in enumerate(states) if on), -1)
        target = (i + 1) % len(states)
        return {"n_from": states[i][0] if i >= 0 else None, "n_to": states[target][0],
                **await self._measure("() => __pw.armSeq('click')", lambda: buttons.nth(target).click())}

    async def scheme_switch(self) -> dict:
        # the scheme's select: options labelled exactly as schemes (the lesson picker's titles may mention one)
        sel = self.page.locator("select").filter(has=self.page.locator("option", has_text=SCHEME_A)).filter(
            has=self.page.locator("option", has_text=SCHEME_B)).first
        values = await sel.evaluate("s => Array.from(s.options).map(o => o.value)")
        cur = await sel.input_value()
        # a select's change event (Playwright's, as a script's) is not composed: it never leaves the widget's
        # shadow root, so the clock is started by a listener on the select itself
        await sel.evaluate("""s => { if (!s.__pwHooked) { s.__pwHooked = true; s.addEventListener('change', e => {
            if (__pw.armed && __pw.t0 === null && __pw.t0type === 'change') __pw.t0 = e.timeStamp; }, true); } }""")
        target = values[(values.index(cur) + 1) % len(values)] if cur in values else values[0]
        return {"scheme_from": cur, "scheme_to": target,
                **await self._measure("() => __pw.armSeq('change')", lambda: sel.select_option(target))}


async def browser_part(url: str, pid: int, pages: int, reps: int, timeout_s: float) -> dict:
    from playwright.async_api import async_playwright

    res: dict = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"),
                                          headless=True, args=CHROMIUM_ARGS)
        try:
            # 2. fresh pages in turn on an idle server; (a) each one's first action
            loads, firsts = [], []
            for i in range(max(pages, reps)):
                await wait_quiet(pid)
                st = Student(browser, url, pid, timeout_s)
                try:
                    load = await st.open()
                    if i < pages:
                        loads.append(load)
                    if i < reps:
                        firsts.append(await st.k_change())
                finally:
                    await st.close()
                print(f"  fresh page {i + 1}: first token {load['first_tok_ms']:.0f} ms"
                      + (f", first k change {firsts[-1]['ms']:.0f} ms" if i < reps else ""), file=sys.stderr)
            if pages:
                res["first_token"] = summary_ms([x["first_tok_ms"] for x in loads])
                res["html_get"] = summary_ms([x["html_get_ms"] for x in loads])
                res["dom_content_loaded"] = summary_ms([x["dom_content_loaded_ms"] for x in loads])
                res["tokens_drawn_first"] = loads[0]["tokens_drawn"]
                res["fresh_pages"] = [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in x.items()}
                                      for x in loads]
            if reps:
                res["a_first_action_k"] = action_summary(firsts)
                # 3. one page, --reps of each control
                st = Student(browser, url, pid, timeout_s)
                try:
                    await st.open()
                    seq0 = await st.page.evaluate("() => __pw.seq()")
                    await asyncio.sleep(3)
                    res["redraws_without_input_3s_after_load"] = (await st.page.evaluate("() => __pw.seq()")) - seq0
                    await st.settle()
                    await st.k_change()                      # not counted: this page's first action
                    for name, act in [("b_k_change", st.k_change), ("c_layer_switch", st.layer_switch),
                                      ("d_n_switch", st.n_switch), ("e_scheme_switch", st.scheme_switch)]:
                        rows = []
                        for _ in range(reps):
                            await st.settle()
                            rows.append(await act())
                        res[name] = action_summary(rows)
                        print(f"  {name}: p50 {res[name]['p50_ms']} ms", file=sys.stderr)
                finally:
                    await st.close()
        finally:
            await browser.close()
    return res


def action_summary(rows: list[dict]) -> dict:
    out = summary_ms([r["ms"] for r in rows])
    out["frame_p50_ms"] = round(statistics.median(r["frame_ms"] for r in rows), 1)
    out["server_cpu_s_p50"] = round(statistics.median(r["server_cpu_s"] for r in rows), 3)
    out["redraws"] = [r["redraws"] for r in rows]
    out["per_rep"] = [{**{k: v for k, v in r.items() if k.endswith(("_from", "_to"))}, "ms": round(r["ms"], 1),
                       "server_cpu_s": round(r["server_cpu_s"], 3)} for r in rows]
    return out


# ----------------------------------------------------------------------------- 4. a class


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGINT to loadtest (its finally stops its server), then SIGKILL whatever of its tree is left."""
    if proc.poll() is not None:
        return
    tree = loadtest.process_tree(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        pass
    for pid in reversed(tree):
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()


def class_part(sessions: int, browsers: int, minutes: float, port: int, app: str) -> dict:
    with tempfile.NamedTemporaryFile(prefix="page_weight_class_", suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, "scripts/loadtest.py", "--sessions", str(sessions), "--browsers",
           str(browsers), "--arrival", "10", "--minutes", str(minutes), "--port", str(port), "--app", app,
           "--json", "--out", str(out)]
    print("  " + " ".join(shlex.quote(x) for x in cmd[1:]), file=sys.stderr)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=600 + minutes * 60 + sessions * 5)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        stop_tree(proc)
    try:
        full = json.loads(out.read_text())
    except (OSError, ValueError):
        raise RuntimeError(f"loadtest gave no result (exit status {rc})") from None
    finally:
        out.unlink(missing_ok=True)
    pick = lambda d: {k: d[k] for k in ("n", "p50_s", "p95_s", "max_s") if k in d}   # noqa: E731
    return {"command": " ".join(["python", *map(shlex.quote, cmd[1:-2])]), "exit_status": rc,
            "sessions": sessions, "browsers": browsers, "minutes_busy": minutes,
            "page_ready_all": pick(full.get("page_load_all", {})),
            "page_ready_browser": pick(full.get("page_load_browser", {})),
            "page_ready_light": pick(full.get("page_load_light", {})),
            "update_all": pick(full.get("update_all", {})),
            "update_once_all_arrived": pick(full.get("update_once_all_arrived", {})),
            "all_open_s": full.get("all_open_s"), "first_page_interactive_s": full.get("first_page_interactive_s"),
            "server_cpu_s_per_session_open": full.get("server_cpu_s_per_session_open"),
            "client_failures": full.get("client_failures"), "server_tracebacks": full.get("server_tracebacks"),
            "rss_mb_idle": full.get("rss_mb_idle"), "rss_mb_all_open": full.get("rss_mb_all_open"),
            "loadtest": full}


# ----------------------------------------------------------------------------- main


class Args(argparse.ArgumentParser):
    def error(self, message):                        # one line, exit status 2
        print(f"page_weight.py: {message}", file=sys.stderr)
        sys.exit(2)


def table(res: dict) -> str:
    rows = []
    L = res.get("light")
    if L:
        rows += [("server CPU per page (light session), median", f"{L['server_cpu_s_per_page_median']:.3f} s "
                  f"(min {L['server_cpu_s_per_page_min']:.3f}, max {L['server_cpu_s_per_page_max']:.3f}; n={L['pages']})"),
                 ("pulled document", f"{L['doc_bytes'] / 1e3:.0f} kB, {L['doc_models']} models"),
                 ("HTML page / GET (python client)", f"{L['html_bytes'] / 1e3:.0f} kB / {L['get_s_median'] * 1e3:.0f} ms"),
                 ("light session open (GET..data), median", f"{L['open_s_median'] * 1e3:.0f} ms"),
                 ("server memory per open session", f"{L['rss_mb_per_open_session']:.1f} MB")]
    B = res.get("browser", {})
    if "first_token" in B:
        rows += [("first token visible (chromium, idle server)", f"p50 {B['first_token']['p50_ms']:.0f} ms "
                  f"(min {B['first_token']['min_ms']:.0f}, max {B['first_token']['max_ms']:.0f}; n={B['first_token']['n']})"),
                 ("HTML GET (navigation timing)", f"p50 {B['html_get']['p50_ms']:.0f} ms")]
    for key, label in [("a_first_action_k", "(a) first action: k change"), ("b_k_change", "(b) k change"),
                       ("c_layer_switch", "(c) layer switch (in page)"), ("d_n_switch", "(d) N switch"),
                       ("e_scheme_switch", "(e) scheme switch")]:
        if key in B:
            x = B[key]
            rows.append((label, f"p50 {x['p50_ms']:.0f} ms (max {x['max_ms']:.0f}; n={x['n']}; "
                                f"server CPU {x['server_cpu_s_p50'] * 1e3:.0f} ms)"))
    C = res.get("class")
    if C:
        pr, up = C["page_ready_all"], C["update_all"]
        rows += [(f"class of {C['sessions']}: page ready", f"p50 {pr.get('p50_s')} s, p95 {pr.get('p95_s')} s, "
                  f"max {pr.get('max_s')} s (n={pr.get('n')})"),
                 (f"class of {C['sessions']}: update", f"p50 {up.get('p50_s')} s, p95 {up.get('p95_s')} s (n={up.get('n')})"),
                 (f"class of {C['sessions']}: failures", f"clients {C['client_failures']}, "
                  f"server tracebacks {C['server_tracebacks']}")]
    w = max(len(a) for a, _ in rows) if rows else 0
    return "\n".join(f"{a:{w}s}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    ap = Args(description=__doc__.splitlines()[0])
    ap.add_argument("--light", type=int, default=10, metavar="M", help="lightweight pages for server CPU per page (0: skip)")
    ap.add_argument("--pages", type=int, default=5, help="fresh chromium pages for the first token (0: skip)")
    ap.add_argument("--reps", type=int, default=10, help="repetitions of each control in chromium (0: skip)")
    ap.add_argument("--class", dest="class_sessions", type=int, default=0, metavar="N",
                    help="also run scripts/loadtest.py with N sessions arriving within 10 s (0: no)")
    ap.add_argument("--class-browsers", type=int, default=5, help="chromium pages among the class's sessions")
    ap.add_argument("--class-minutes", type=float, default=2.0, help="minutes the class stays busy once all are in")
    ap.add_argument("--class-only", action="store_true", help="only the class (4.)")
    ap.add_argument("--port", type=int, default=5800, help=f"server port ({PORTS.start}-{PORTS.stop - 1})")
    ap.add_argument("--app", default="app/main.py", help="the app script to serve")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per page load or update")
    ap.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    ap.add_argument("--out", help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    if args.port not in PORTS:
        ap.error(f"--port must be in {PORTS.start}-{PORTS.stop - 1}, got {args.port}")
    for name in ("light", "pages", "reps", "class_sessions", "class_browsers"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_sessions', '').replace('_', '-')} must be >= 0")
    if args.timeout <= 0 or args.class_minutes < 0:
        ap.error("--timeout must be > 0 and --class-minutes >= 0")
    if not (args.light or args.pages or args.reps or args.class_sessions):
        ap.error("nothing to measure: --light, --pages, --reps and --class are all 0")
    if args.class_only and not args.class_sessions:
        ap.error("--class-only needs --class N")
    if args.class_sessions and args.class_browsers > args.class_sessions:
        ap.error("--class-browsers must not exceed --class")
    if not (ROOT / args.app).is_file() and not Path(args.app).is_file():
        ap.error(f"--app {args.app}: no such file")
    if (args.pages or args.reps or args.class_browsers and args.class_sessions) and \
            not Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")).exists():
        ap.error("chromium not found (set CHROMIUM_PATH)")

    res: dict = {"machine": loadtest.machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": " ".join(["python", "scripts/page_weight.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])}
    ok = True
    server = None
    try:
        if not args.class_only and (args.light or args.pages or args.reps):
            port = pick_port(args.port)
            server = loadtest.Server(cmd=procfile_command(port, args.app))
            server.wait_ready(timeout_s=120)
            res["server"] = {"cmd": " ".join(["python", *server.cmd[1:]]), "allocator": server.allocator(),
                             "ready_s": server.ready_s and round(server.ready_s, 2),
                             "first_page_s": round(server.first_page_s, 2)}
            pid = server.proc.pid
            asyncio.run(wait_quiet(pid, timeout_s=30))
            res["server"]["rss_mb_idle"] = round(server.rss_mb(), 1)
            if args.light:
                print(f"1. {args.light} lightweight pages, one after another", file=sys.stderr)
                try:
                    res["light"] = asyncio.run(light_pages(server.url, pid, args.light, args.timeout))
                except Exception as e:  # noqa: BLE001 - reported, the other parts still run
                    ok, res["light_error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
            if args.pages or args.reps:
                print(f"2./3. chromium: {args.pages} fresh pages, {args.reps} repetitions per control", file=sys.stderr)
                try:
                    res["browser"] = asyncio.run(browser_part(server.url, pid, args.pages, args.reps, args.timeout))
                except Exception as e:  # noqa: BLE001
                    ok, res["browser_error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
            log = server.lines
            res["server"].update({f"log_{k}": v for k, v in loadtest.log_errors(log).items()})
            res["server"]["rss_mb_end"] = round(server.rss_mb(), 1)
            ok = ok and res["server"]["log_tracebacks"] == 0
            server.stop()
            (ROOT / "artifacts").mkdir(exist_ok=True)
            (ROOT / "artifacts" / "page_weight_server.log").write_text("".join(log))
            server = None
        if args.class_sessions:
            print(f"4. a class of {args.class_sessions}", file=sys.stderr)
            try:
                res["class"] = class_part(args.class_sessions, min(args.class_browsers, args.class_sessions),
                                          args.class_minutes, pick_port(args.port + 1), args.app)
                ok = ok and res["class"]["exit_status"] == 0
            except Exception as e:  # noqa: BLE001
                ok, res["class_error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
    except KeyboardInterrupt:
        print("page_weight.py: interrupted", file=sys.stderr)
        ok = False
    except Exception as e:  # noqa: BLE001 - e.g. the server did not start: one line, the JSON says it too
        ok, res["error"] = False, f"{type(e).__name__}: {str(e)[-600:]}"
    finally:
        if server is not None:
            server.stop()
            (ROOT / "artifacts").mkdir(exist_ok=True)
            (ROOT / "artifacts" / "page_weight_server.log").write_text("".join(server.lines))
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text if args.json else table(res))
    for k in ("error", "light_error", "browser_error", "class_error"):
        if k in res:
            print(f"{k}: {res[k]}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
