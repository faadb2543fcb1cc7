"""Classroom load test: N concurrent real sessions against a real `panel serve`.

    python scripts/loadtest.py [--sessions 60] [--browsers 5] [--minutes 3] [--think 4,12] [--json]
    python scripts/loadtest.py --url http://127.0.0.1:5006/main --server-pid PID   # a server already running

What a class does: everyone opens the link within a few seconds, then each
student routes fresh text and changes k, N and the routing scheme, pausing
between changes (--think seconds, uniform). This script does exactly that with
two kinds of real session:

* `--browsers` headless chromium pages (Playwright): the whole page is loaded
  and rendered (ready: the first screen, the RouterScreen component, has drawn
  its token chips); an update is timed with the page's own clock from the key
  press (or text commit) until the RouterScreen's `data` has changed.
* the rest are lightweight sessions that speak Bokeh's websocket protocol the
  way BokehJS does, without rendering: GET the page (the server creates the
  session and runs app/main.py for it), open the websocket with the session's
  token, pull the document (PULL-DOC-REQ), then send PATCH-DOC events that set
  widget values (text, k, N, scheme) and time until the server pushes the
  RouterScreen's new `data` back (or its count of routings answered, when the
  new routing drew exactly the old one) (ready: the pulled document's RouterScreen has
  data, or the server has sent it). Against a page without a RouterScreen (an
  older app), the heatmap's ColumnDataSource and the status line stand in. Only JSON is parsed: one client
  process holds dozens of them for a few MB and little CPU, so the server is
  what gets measured.

Reported: start-up (launch until the first page is served; first browser page
until interactive, with the server idle), page-load time and update latency
(p50/p95/max) per kind, the server's CPU time per session opened and per
update, server errors (tracebacks and ERROR lines in the
server's log, websocket refusals, client time-outs), server memory (VmRSS of
the server process and its children: idle, peak, after all sessions closed and
the server discarded them). Everything is measured; nothing is simulated. The
clients run on the same machine as the server, where a real class brings its own
computers: the chromium pages run at the lowest CPU priority (--client-nice 19)
so they use only CPU the server leaves idle, and the report says how many cores
the server and everything together used while the class was busy.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNING_AT = re.compile(r"Bokeh app running at: (http://\S+?)/main\b")
TOKEN = re.compile(r'"token"\s*:\s*"([^"]+)"')
WORDS = ("the ferry left harbour at dawn with seven crates of apples while gulls circled over grey water "
         "def route tokens experts return sum of weights for each layer in range import torch numpy "
         "la mer était calme et le vent soufflait doucement sur les collines 1234 5678 3.14159 + x * y").split()
NUDGE_AFTER_S = 1.5     # the RouterScreen asks again for a routing not back after this long (app/views/screen.py)
NUDGES = [0]            # ... how often the light pages of this run did
SCHEMES = ["Softmax top-k (Mixtral)", "Switch top-1 with capacity", "Expert Choice", "DeepSeek-V3 (sigmoid + bias)"]

# The serving flags of the Procfile, less the public address and host (see docs/serving.md). The load
# test keeps them, except that closed sessions are discarded after 10 s instead of 5 min, so the
# memory "after everyone left" can be read without waiting 5 minutes.
SERVE_FLAGS = ["--warm", "--index", "main", "--session-token-expiration", "3600", "--keep-alive", "30000",
               "--liveness"]


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (`--num-procs N` forks N workers under the parent)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of pid and its descendants, in MB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def cpu_s(pid: int) -> float:
    """CPU time (user + system) used so far by pid and its descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])        # utime, stime (clock ticks)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


class Server:
    """`panel serve app/main.py` in its own process group, its log drained in a thread.

    `ready_s` is the time from launch until `GET /liveness` answers; `first_page_s` until the first
    `GET /main` has been answered (that GET creates a whole session: it is when a student sees a page).
    """

    def __init__(self, port: int = 0, num_procs: int = 1, extra: list[str] | None = None,
                 origins: list[str] | None = None, warm: bool = True, cmd: list[str] | None = None,
                 app: str = "app/main.py", server_env: dict | None = None):
        if num_procs > 1 and port == 0:
            port = free_port()        # forked workers must share one known port
        flags = SERVE_FLAGS if warm else [f for f in SERVE_FLAGS if f != "--warm"]
        # through the Procfile's launcher, as served (app/allocator.py: jemalloc when the machine has it;
        # MOE_LAB_ALLOCATOR=system in server_env compares CPython's own allocator)
        self.cmd = cmd or [sys.executable, "-m", "app.allocator", "panel", "serve", app, "--address", "127.0.0.1",
                           "--port", str(port), "--num-procs", str(num_procs), *flags, *(extra or [])]
        if cmd is None:
            for o in origins or ["*"]:
                self.cmd += ["--allow-websocket-origin", o]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BOKEH_", "PANEL_"))}
        env.update(server_env or {})
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: [self.lines.append(x) for x in iter(self.proc.stdout.readline, "")],
                         daemon=True).start()
        self.base = self.url = None
        self.ready_s = self.first_page_s = None

    def wait_ready(self, timeout_s: float = 90.0, first_page: bool = True) -> "Server":
        import requests

        deadline = self.t0 + timeout_s
        while self.base is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("panel serve did not start:\n" + "".join(self.lines))
            for line in list(self.lines):
                if m := RUNNING_AT.search(line):
                    self.base = m.group(1)
            time.sleep(0.02)
        self.url = f"{self.base}/main"
        self.port = int(self.base.rsplit(":", 1)[1])
        while "--liveness" in self.cmd and time.monotonic() < deadline:
            try:
                if requests.get(f"{self.base}/liveness", timeout=5).ok:
                    self.ready_s = time.monotonic() - self.t0
                    break
            except requests.ConnectionError:
                time.sleep(0.02)
        if first_page:
            r = requests.get(self.url, timeout=max(1.0, deadline - time.monotonic()))
            r.raise_for_status()
            self.first_page_s = time.monotonic() - self.t0
        return self

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def allocator(self) -> str | None:
        """The launcher's line saying which allocator the server got (app/allocator.py), if it printed one."""
        return next((x.strip() for x in self.lines if x.startswith("allocator:")), None)

    def stop(self) -> None:
        """Stop the whole process group (with --num-procs, SIGTERM to the parent leaves the workers running)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def log_errors(lines: list[str]) -> dict:
    """Server-side problems in a slice of the log."""
    return {"tracebacks": sum("Traceback" in x for x in lines),
            "error_lines": sum(" ERROR " in x or "ERROR:" in x for x in lines),
            "refused_websockets": sum("Refusing websocket" in x for x in lines)}


NGINX_EXAMPLE = ROOT / "deploy" / "nginx-classroom.conf"          # sticky by client address
NGINX_COOKIE_EXAMPLE = ROOT / "deploy" / "nginx-classroom-cookie.conf"  # sticky by a browser cookie


def nginx_site(upstream_ports: list[int], listen_port: int, example: str | None = None,
               debug_header: bool = True) -> str:
    """deploy/nginx-classroom.conf made runnable on loopback: its upstream servers and listen line
    replaced; with debug_header, an `X-Upstream` response header says which app process answered."""
    text = NGINX_EXAMPLE.read_text() if example is None else example
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in upstream_ports)
    text, n = re.subn(r"(?m)^(\s*server 127\.0\.0\.1:\d+;\n)+", servers, text, count=1)
    text, m = re.subn(r"(?m)^(\s*)listen 80;", rf"\1listen 127.0.0.1:{listen_port};", text, count=1)
    if n != 1 or m != 1:
        raise ValueError(f"{NGINX_EXAMPLE} no longer has the `server 127.0.0.1:PORT;` and `listen 80;` lines")
    if debug_header:
        text = text.replace("proxy_pass http://moe_lab;",
                            "proxy_pass http://moe_lab;\n        add_header X-Upstream $upstream_addr always;")
    return text


def nginx_main_conf(prefix: Path, site: str) -> str:
    """A complete nginx.conf that runs unprivileged in the foreground, every path inside `prefix`."""
    (prefix / "site.conf").write_text(site)
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/site.conf;
}}
"""


class Nginx:
    """nginx in the foreground, in its own process group, with a config written under `prefix`."""

    def __init__(self, binary: str, prefix: Path, site: str, listen_port: int):
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(nginx_main_conf(prefix, site))
        self.args = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(self.conf)]
        self.port, self.prefix = listen_port, prefix
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen_port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start:\n" + (prefix / "error.log").read_text()
                                       if (prefix / "error.log").exists() else "nginx did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# ----------------------------------------------------------------------------- a lightweight session


def fresh_text(rng: random.Random) -> str:
    """A sentence nobody has routed before (no cache can answer it)."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) + f" {rng.randint(0, 10**9)}"


def long_text(rng: random.Random, words: int = 3500) -> str:
    """A fresh paste of over 4,096 tokens (an article): what a heavy student sends (--heavy)."""
    return " ".join(rng.choice(WORDS) for _ in range(words)) + f" {rng.randint(0, 10**9)}"


def walk_objects(node, out: dict) -> None:
    """Collect {id: (type name, attributes)} for every model in a serialized Bokeh document."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "id" in node and "attributes" in node:
            out[node["id"]] = (node.get("name"), node["attributes"])
        for v in node.values():
            walk_objects(v, out)
    elif isinstance(node, list):
        for v in node:
            walk_objects(v, out)


class UpdateTimeout(Exception):
    pass


@dataclass
class LightSession:
    """One student's session over Bokeh's websocket protocol, as BokehJS does it, minus the rendering."""

    url: str                               # http://host:port/main
    origin: str | None = None              # the Origin header a browser would send (None: the page's own)
    timeout_s: float = 60.0
    source_ip: str | None = None           # connect from this local address (e.g. 127.0.0.7: another "student")
    upstream: str | None = None            # X-Upstream header of the page GET, when a proxy adds one
    ws_upstream: str | None = None         # ... and of the websocket upgrade
    ids: dict = field(default_factory=dict)
    widget_of: dict = field(default_factory=dict)
    nudges: int = 0                        # routings this page asked for again (RouterScreen.nudge)
    get_s: float | None = None             # the page GET alone (the server builds the session meanwhile)
    html_bytes: int | None = None          # the page's HTML
    doc_bytes: int | None = None           # the PULL-DOC reply, every websocket fragment of it
    n_models: int | None = None            # models in the pulled document
    model_types: dict = field(default_factory=dict)   # {type name: count} in the pulled document

    async def open(self) -> float:
        """GET the page, open the websocket, pull the document; returns the seconds this took."""
        from tornado.httpclient import AsyncHTTPClient, HTTPRequest
        from tornado.websocket import websocket_connect

        from bokeh.protocol import Protocol
        from bokeh.protocol.receiver import Receiver

        # tornado's default client runs 10 requests at a time and queues the rest: a class runs all at once
        AsyncHTTPClient.configure(None, max_clients=10_000)
        t0 = time.monotonic()
        r = await AsyncHTTPClient().fetch(HTTPRequest(self.url, request_timeout=self.timeout_s,
                                                      network_interface=self.source_ip))
        self.get_s, self.html_bytes = time.monotonic() - t0, len(r.body)
        self.upstream = r.headers.get("X-Upstream")
        # a browser sends the page's cookies with its websocket (the cookie-sticky proxy relies on it)
        cookies = "; ".join(c.split(";", 1)[0] for c in r.headers.get_list("Set-Cookie"))
        token = TOKEN.search(r.body.decode()).group(1)
        host = self.url.split("/")[2]
        ws_url = self.url.replace("http", "ws", 1) + "/ws"
        headers = {"Origin": self.origin or f"http://{host}", **({"Cookie": cookies} if cookies else {})}
        req = HTTPRequest(ws_url, headers=headers,
                          request_timeout=self.timeout_s, network_interface=self.source_ip)
        self.ws = await websocket_connect(req, subprotocols=["bokeh", token], max_message_size=100 * 2**20)
        self.ws_upstream = self.ws.headers.get("X-Upstream")
        self.receiver = Receiver(Protocol())
        self.watch: set[str] = set()
        self.changed = asyncio.Event()
        self.pending: dict[str, asyncio.Future] = {}
        self.received: list = []              # the last PATCH-DOCs from the server: (time, [(model, attr)])
        self.key_of: dict = {}
        self.closed = False
        self.last_msg = 0.0
        first = self.pending[None] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read())
        ack = await asyncio.wait_for(first, self.timeout_s)     # the server's first message is ACK
        if ack.msgtype != "ACK":
            raise RuntimeError(f"expected ACK, got {ack.msgtype}")
        reply = await self._send("PULL-DOC-REQ", {}, wait=True)
        objs: dict = {}
        walk_objects(reply.content["doc"], objs)
        self.n_models = len(objs)
        self.model_types = {}
        for name, _ in objs.values():
            self.model_types[str(name)] = self.model_types.get(str(name), 0) + 1
        self._index(objs)
        self.changed.clear()
        # BokehJS announces that it has rendered the document; Panel then counts the session as
        # connected (its onload callbacks run, and later changes are sent at once, not queued)
        await self._send("PATCH-DOC", {"events": [{"kind": "MessageSent", "msg_type": "bokeh_event", "msg_data": {
            "type": "event", "name": "document_ready", "values": {"type": "map", "entries": []}}}]})
        if self.ids.get("screen") and not self.screen_has_data:
            # the first screen's data comes after the document (e.g. routed once the page is there): the
            # page is ready when it has arrived
            try:
                await asyncio.wait_for(self.changed.wait(), self.timeout_s)
            except asyncio.TimeoutError:
                raise UpdateTimeout(f"RouterScreen data not sent within {self.timeout_s} s") from None
            if self.closed:
                raise ConnectionError("websocket closed")
        return time.monotonic() - t0

    def _index(self, objs: dict) -> None:
        def find(kind, pred=lambda a: True):
            # type names are qualified for Panel's own models (panel.models.widgets.CustomSelect)
            return next((i for i, (k, a) in objs.items() if str(k).rsplit(".", 1)[-1] == kind and pred(a)), None)

        def ref(v):
            return v.get("id") if isinstance(v, dict) else None

        # the first screen: ONE Panel JSComponent (app/views/screen.py). Its Bokeh model (ReactiveESM,
        # class_name RouterScreen) keeps the component's parameters on a DataModel: `data` (JSON), `layer`
        screen = find("ReactiveESM", lambda a: a.get("class_name") == "RouterScreen")
        screen_data = ref(objs[screen][1].get("data")) if screen else None
        if screen_data is None:
            screen_data = next((i for i, (k, a) in objs.items()
                                if a.get("name") == "router_screen" and "layer" in a and "data" in a), None)
        self.ids = {
            "screen": screen_data,
            "heat": find("ColumnDataSource", lambda a: a.get("name") == "heat_cells_0"),
            "status": find("HTML", lambda a: "routed through" in str(a.get("text", ""))),
            "text": find("TextAreaInput"),
            "k": find("Slider", lambda a: re.match(r"\s*k\b", str(a.get("title", ""))) is not None),
            # the scheme's select: its option labels are the schemes' (a lesson picker may mention one)
            "scheme": find("CustomSelect", lambda a: len(set(SCHEMES) & {o if isinstance(o, str) else str(o[-1])
                                                                        for o in a.get("options") or []}) >= 2),
            "n": find("RadioButtonGroup", lambda a: str((a.get("labels") or [""])[0]).isdigit()),
            "cf": find("Slider", lambda a: str(a.get("title", "")).startswith("Capacity factor")),
        }
        # without a RouterScreen (an older page), the heatmap and the status line say that an update arrived
        optional = {"heat", "status", "cf"} if screen_data else {"screen", "cf"}
        missing = [k for k, v in self.ids.items() if v is None and k not in optional]
        if missing:
            raise RuntimeError(f"models not found in the pulled document: {missing}")
        self.screen_has_data = bool(screen_data and str(objs[screen_data][1].get("data") or "").strip()
                                    not in ("", "{}", "null"))
        self.n_labels = objs[self.ids["n"]][1]["labels"]
        self.k = int(objs[self.ids["k"]][1].get("value", 2))
        # a control a student cannot move: greyed out (disabled) or hidden (visible: false)
        self.control_state = {key: {"disabled": bool(objs[self.ids[key]][1].get("disabled", False)),
                                    "visible": objs[self.ids[key]][1].get("visible", True) is not False}
                              for key in ("k", "cf") if self.ids[key]}
        self.off = {key: st["disabled"] or not st["visible"] for key, st in self.control_state.items()}
        self.cf = float(objs[self.ids["cf"]][1].get("value", 1.0)) if self.ids["cf"] else 1.0
        self.n_active = objs[self.ids["n"]][1].get("active", 0)
        self.scheme = objs[self.ids["scheme"]][1].get("value")
        # Panel's Select model holds [value, label] pairs and its value is the scheme's key (e.g. "switch")
        options = [(o, o) if isinstance(o, str) else tuple(o) for o in objs[self.ids["scheme"]][1].get("options", [])]
        self.schemes = [v for v, label in options if label in SCHEMES] or [v for v, _ in options]
        self.widget_of = {self.ids["k"]: "k", self.ids["n"]: "n_active", self.ids["scheme"]: "scheme",
                          **({self.ids["cf"]: "cf"} if self.ids["cf"] else {})}
        self.watch = {self.ids["screen"]} if self.ids["screen"] else {self.ids["heat"], self.ids["status"]} - {None}
        self.key_of = {v: k for k, v in self.ids.items() if v}

    async def _read(self) -> None:
        first = True
        nbytes = 0
        try:
            while True:
                frag = await self.ws.read_message()
                if frag is None:
                    break
                self.last_msg = time.monotonic()
                nbytes += len(frag.encode()) if isinstance(frag, str) else len(frag)
                msg = await self.receiver.consume(frag)
                if msg is None:
                    continue
                if msg.msgtype == "PULL-DOC-REPLY":
                    self.doc_bytes = nbytes
                nbytes = 0
                if first:
                    first = False
                    self.pending.pop(None).set_result(msg)
                    continue
                reqid = msg.header.get("reqid")
                if reqid in self.pending:
                    self.pending.pop(reqid).set_result(msg)
                elif msg.msgtype == "PATCH-DOC":
                    events = msg.content.get("events", [])
                    self.received.append((self.last_msg, [(self.key_of.get((ev.get("model") or {}).get("id"), "other"),
                                                           ev.get("attr") or ev.get("kind")) for ev in events][:8]))
                    del self.received[:-20]
                    for ev in events:            # the server moves widgets too (a new N brings its defaults)
                        key = self.widget_of.get((ev.get("model") or {}).get("id"))
                        if key and ev.get("kind") == "ModelChanged" and ev.get("attr") in ("value", "active"):
                            setattr(self, key, ev["new"])
                        elif key in ("k", "cf") and ev.get("kind") == "ModelChanged" and ev.get("attr") in ("disabled", "visible"):
                            # Switch and Expert Choice fix k: the page greys out or hides the k slider
                            self.control_state[key][ev["attr"]] = bool(ev["new"])
                            st = self.control_state[key]
                            self.off[key] = st["disabled"] or not st["visible"]
                    # the screen's DataModel also holds `layer` and `selected`: an update is its new `data`, or its
                    # count of routings `answered`, sent with the data once a routing is back (and alone when the
                    # routing drew exactly what was there: a capacity factor that rounds to the same capacity on
                    # a short text; the page then shows nothing new, and param sends no data)
                    touched = {(ev.get("model") or {}).get("id") for ev in events
                               if (ev.get("model") or {}).get("id") != self.ids.get("screen")
                               or ev.get("attr") in ("data", "answered")}
                    if touched & self.watch:
                        self.changed.set()
        finally:
            self.closed = True
            self.changed.set()
            for f in self.pending.values():
                if not f.done():
                    f.set_exception(ConnectionError("websocket closed"))

    async def _send(self, msgtype: str, content: dict, msgid: str | None = None, wait: bool = False):
        msgid = msgid or uuid.uuid4().hex
        fut = self.pending.setdefault(msgid, asyncio.get_running_loop().create_future()) if wait else None
        await self.ws.write_message(json.dumps({"msgid": msgid, "msgtype": msgtype}))
        await self.ws.write_message("{}")
        await self.ws.write_message(json.dumps(content))
        if wait:
            return await asyncio.wait_for(fut, self.timeout_s)

    async def set(self, changes: list[tuple[str, str, object]]) -> float:
        """Set widget properties [(model key, attr, value)] like a browser; seconds until the view changed."""
        events = [{"kind": "ModelChanged", "model": {"id": self.ids[key]}, "attr": attr, "new": value}
                  for key, attr, value in changes]
        quiet_by = time.monotonic() + 2
        while time.monotonic() - self.last_msg < 0.3 and time.monotonic() < quiet_by:
            await asyncio.sleep(0.1)          # the previous update's last messages are still arriving
        self.changed.clear()
        t0 = time.monotonic()
        await self._send("PATCH-DOC", {"events": events})
        try:
            if self.ids.get("screen"):
                # as the page does: a routing not back after 1.5 s is asked for again (RouterScreen.nudge)
                try:
                    await asyncio.wait_for(asyncio.shield(self.changed.wait()), NUDGE_AFTER_S)
                except asyncio.TimeoutError:
                    self.nudges += 1
                    NUDGES[0] += 1
                    await self._send("PATCH-DOC", {"events": [{"kind": "ModelChanged", "model": {"id": self.ids["screen"]},
                                                               "attr": "nudge", "new": self.nudges}]})
            await asyncio.wait_for(self.changed.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            sent = ", ".join(f"{key}.{attr}={str(value)[:24]!r}" for key, attr, value in changes)
            got = [e for t, evs in self.received if t >= t0 for e in evs]
            raise UpdateTimeout(f"no update within {self.timeout_s} s after {sent}; received {got[:8]}") from None
        if self.closed:
            raise ConnectionError("websocket closed")
        return time.monotonic() - t0

    async def act(self, kind: str, rng: random.Random) -> float:
        """One student action: 'text' (fresh text), 'paste' (a fresh 4,096+ token text), 'k', 'n' (another N)
        or 'scheme'."""
        if kind in ("text", "paste"):
            return await self.set([("text", "value", fresh_text(rng) if kind == "text" else long_text(rng))])
        if kind == "k" and self.off.get("k") and (not self.ids["cf"] or self.off.get("cf")):
            kind = "scheme"             # nothing else to move: another scheme
        if kind == "k" and self.off.get("k"):
            # the scheme fixes k (Switch, Expert Choice): the page greys out or hides the k slider, so a
            # student moves the capacity factor, the control those schemes do have
            self.cf = 1.0 if self.cf >= 2.0 else round(self.cf + 0.5, 2)
            return await self.set([("cf", "value", self.cf), ("cf", "value_throttled", self.cf)])
        if kind == "k":
            self.k = 1 if self.k >= 3 else self.k + 1
            return await self.set([("k", "value", self.k), ("k", "value_throttled", self.k)])
        if kind == "n":
            self.n_active = (self.n_active + 1 + rng.randrange(len(self.n_labels) - 1)) % len(self.n_labels)
            return await self.set([("n", "active", self.n_active)])
        self.scheme = rng.choice([s for s in self.schemes if s != self.scheme])
        return await self.set([("scheme", "value", self.scheme)])

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if getattr(self, "reader", None) is not None:
            self.reader.cancel()


# ----------------------------------------------------------------------------- the browser sessions

# In the page: the RouterScreen's DataModel (its `data` is the JSON the server replaces after each routing),
# and the component's shadow root (div.screen, its token chips span.tok in .view-tokens). Pages without a
# RouterScreen (an older app) fall back to the heatmap's ColumnDataSource.
PAGE_HELPERS = r"""() => { if (window.__lt) return;
    const deep = (root, sel) => { const hit = root.querySelector(sel); if (hit) return hit;
        for (const el of root.querySelectorAll('*')) if (el.shadowRoot) { const h = deep(el.shadowRoot, sel); if (h) return h; }
        return null; };
    const lt = window.__lt = { deep };
    lt.screenModel = () => { if (!(window.Bokeh && Bokeh.documents.length)) return null;
        for (const m of Bokeh.documents[0].all_models)
            if (m.class_name === 'RouterScreen' && m.data && 'data' in m.data.properties) return m.data;
        return null; };
    lt.screenRoot = () => { if (lt._root && lt._root.host && lt._root.host.isConnected) return lt._root;
        const el = deep(document, 'div.screen'); lt._root = el ? el.getRootNode() : null; return lt._root; };
    lt.firstTok = () => { const r = lt.screenRoot(); return r ? r.querySelector('.view-tokens span.tok') : null; };
    lt.watched = () => { const m = lt.screenModel(); if (m) return [m, 'data'];
        const h = window.Bokeh && Bokeh.documents.length && Bokeh.documents[0].get_model_by_name('heat_cells_0');
        return h ? [h, 'data'] : null; };
}"""
READY = ("() => { if (!(window.Bokeh && Bokeh.documents.length)) return false; (" + PAGE_HELPERS + ")(); "
         "const m = __lt.screenModel(); if (m) return !!(m.data && __lt.firstTok()); "
         "const h = Bokeh.documents[0].get_model_by_name('heat_cells_0'); return !!(h && h.data.t.length > 0); }")
HOOK = """() => { const [m, attr] = __lt.watched(); window.__t1 = null;
    if (!window.__hooked) { window.__hooked = true;
        m.properties[attr].change.connect(() => { if (window.__t1 === null) window.__t1 = performance.now(); }); } }"""

# the k control: a Panel IntSlider whose label starts with "k"
K_VALUE = ("() => { for (const m of Bokeh.documents[0].all_models) { if (typeof m.title === 'string' && "
           "/^\\s*k\\b/.test(m.title) && 'value_throttled' in m) return m.value; } return null; }")
K_TITLE = re.compile(r"^\s*k\b")


async def browser_open(browser, url: str, timeout_s: float):
    """A new context (a new Panel session); seconds from navigation until the first screen has drawn its data."""
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await ctx.new_page()
    page.set_default_timeout(timeout_s * 1000)
    t0 = time.monotonic()
    await page.goto(url)
    await page.wait_for_function(READY, timeout=timeout_s * 1000)
    return ctx, page, time.monotonic() - t0


async def browser_act(page, kind: str, rng: random.Random, timeout_s: float) -> float:
    """Press the k slider or commit fresh text; seconds on the page's clock until the RouterScreen's data changed."""
    await page.evaluate(HOOK)
    if kind == "text":
        box = page.locator(".text-input textarea")       # the text box (css class "text-input")
        box = box.first if await box.count() else page.locator("textarea").first
        await box.fill(fresh_text(rng))
        await page.evaluate("() => { window.__t0 = performance.now(); }")
        await box.press("Tab")
    else:                      # k: up from 1 or 2, down from 3 or more (a press that changes nothing would hang)
        k = await page.evaluate(K_VALUE)
        group = page.locator(".bk-input-group").filter(has=page.locator(".bk-slider-title", has_text=K_TITLE))
        handle = group.locator(".noUi-handle").first
        await handle.focus()
        await page.evaluate("() => { window.__t0 = performance.now(); }")
        await handle.press("ArrowRight" if k is None or k < 3 else "ArrowLeft")
    await page.wait_for_function("() => window.__t1 !== null", timeout=timeout_s * 1000)
    return await page.evaluate("() => (window.__t1 - window.__t0) / 1000")


# ----------------------------------------------------------------------------- the run


def machine_cpu() -> tuple[float, float, float]:
    """Seconds of CPU the whole machine has spent (user+nice, system+irq, stolen by neighbours): /proc/stat."""
    try:
        f = [int(x) / os.sysconf("SC_CLK_TCK") for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return (0.0, 0.0, 0.0)
    return (f[0] + f[1], f[2] + f[5] + f[6], f[7] if len(f) > 7 else 0.0)


def summary(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return {"n": len(xs), "p50_s": round(statistics.median(xs), 3), "p95_s": round(p95, 3), "max_s": round(xs[-1], 3)}


async def run_load(url: str, sessions: int, browsers: int, minutes: float, think: tuple[float, float],
                   arrival_s: float, timeout_s: float, seed: int, sample=None, source_ips: int = 0,
                   cpu=None, client_nice: int = 0, heavy: int = 0) -> dict:
    """Open `sessions` sessions (the first `browsers` in chromium) within `arrival_s` seconds, keep
    them busy for `minutes`, close them. The last `heavy` sessions paste a fresh 4,096+ token text at
    every action; their own updates are reported apart ("heavy"). Returns the client-side measurements."""
    rng = random.Random(seed)
    loads = {"browser": [], "light": [], "heavy": []}
    updates = {"browser": [], "light": [], "heavy": []}
    # an update made while others are still opening waits behind their page builds (each holds the
    # server's event loop for about a second): reported apart from the updates once everyone is in
    by_phase = {"arriving": [], "all_arrived": []}
    failures: list[str] = []
    end_at = [None]

    async def student(i: int, browser):
        r = random.Random(seed * 1000 + i)
        kind = "browser" if browser is not None else "heavy" if i >= sessions - heavy else "light"
        await asyncio.sleep(r.uniform(0, arrival_s))
        ctx = sess = None
        try:
            if browser is not None:
                ctx, page, dt = await browser_open(browser, url, timeout_s)
            else:
                src = f"127.0.0.{2 + i % source_ips}" if source_ips else None
                sess = LightSession(url, timeout_s=timeout_s, source_ip=src)
                dt = await sess.open()
            loads[kind].append(dt)
            n_open = sum(map(len, loads.values()))
            if n_open % 10 == 0 or n_open == sessions:
                print(f"[{time.monotonic() - t_start:6.0f} s] {n_open}/{sessions} sessions open", file=sys.stderr)
            while end_at[0] is None or time.monotonic() < end_at[0]:
                await asyncio.sleep(r.uniform(*think))
                if end_at[0] is not None and time.monotonic() >= end_at[0]:
                    break
                action = ("paste" if kind == "heavy" else
                          r.choice(["text", "k", "k"] if browser is not None else ["text", "k", "n", "scheme"]))
                phase = "arriving" if end_at[0] is None else "all_arrived"
                try:
                    if browser is not None:
                        dt = await browser_act(page, action, r, timeout_s)
                    else:
                        dt = await sess.act(action, r)
                    updates[kind].append(dt)
                    if kind != "heavy":                      # the phases are the other students' updates
                        by_phase[phase].append(dt)
                except Exception as e:  # noqa: BLE001 - counted and reported; the student carries on
                    failures.append(f"{kind} {i} {action}: {type(e).__name__}: {str(e)[:160]}")
                    if sess is not None and sess.closed:
                        break
        except Exception as e:  # noqa: BLE001 - a session that could not open is a failure, reported
            failures.append(f"{kind} {i} open: {type(e).__name__}: {str(e)[:160]}")
        finally:
            opened.append(i)
        try:
            await done.wait()          # everyone leaves together, as at the end of a lesson
        finally:
            if sess is not None:
                sess.close()
            if ctx is not None:
                await ctx.close()

    opened: list[int] = []
    done = asyncio.Event()
    cpu0 = cpu() if cpu else None
    t_start = time.monotonic()
    pw = browser_obj = None
    if browsers:
        from playwright.async_api import async_playwright

        pw = await async_playwright().start()
        browser_obj = await pw.chromium.launch(
            executable_path=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run",
                  "--renderer-process-limit=4", "--js-flags=--max-old-space-size=256"])
    tasks = [asyncio.create_task(student(i, browser_obj if i < browsers else None)) for i in range(sessions)]
    peak = [0.0]

    async def sampler():
        while True:
            if sample:
                peak[0] = max(peak[0], sample())
            renice_clients()
            await asyncio.sleep(0.5)

    def renice_clients():
        # the chromium pages stand for the students' own computers: at the lowest CPU priority they
        # take only CPU the server leaves idle, as they would on their own machines (their own
        # latencies then include waiting for that CPU)
        if client_nice:
            for pid in process_tree(os.getpid())[1:]:
                try:
                    if os.getpriority(os.PRIO_PROCESS, pid) < client_nice:
                        os.setpriority(os.PRIO_PROCESS, pid, client_nice)
                except OSError:
                    pass

    samp = asyncio.create_task(sampler())
    # the clock for "busy for `minutes`" starts once everyone has arrived (or given up)
    while sum(len(v) for v in loads.values()) + len([f for f in failures if " open:" in f]) < sessions:
        await asyncio.sleep(0.2)
    all_open_s = time.monotonic() - t_start
    all_open_rss = sample() if sample else None
    cpu1 = cpu() if cpu else None
    stat1, wall1 = machine_cpu(), time.monotonic()
    n_updates0 = len(updates["browser"]) + len(updates["light"])
    end_at[0] = time.monotonic() + minutes * 60
    print(f"[{all_open_s:6.0f} s] all arrived; busy for {minutes} min", file=sys.stderr)
    while len(opened) < sessions:
        await asyncio.sleep(0.2)
    cpu2 = cpu() if cpu else None
    stat2, wall2 = machine_cpu(), time.monotonic()
    n_updates = len(updates["browser"]) + len(updates["light"]) - n_updates0
    done.set()
    await asyncio.gather(*tasks)
    samp.cancel()
    if browser_obj is not None:
        await browser_obj.close()
        await pw.stop()
    return {"all_open_s": round(all_open_s, 1), "rss_mb_all_open": all_open_rss and round(all_open_rss, 1),
            "rss_mb_peak_sampled": round(peak[0], 1) if sample else None,
            "page_load_browser": summary(loads["browser"]), "page_load_light": summary(loads["light"]),
            "page_load_all": summary(loads["browser"] + loads["light"]),
            "update_browser": summary(updates["browser"]), "update_light": summary(updates["light"]),
            "update_all": summary(updates["browser"] + updates["light"]),
            "update_heavy_pasters": summary(updates["heavy"]), "heavy_pasters": heavy,
            "update_while_others_arrive": summary(by_phase["arriving"]),
            "update_once_all_arrived": summary(by_phase["all_arrived"]),
            "client_failures": len(failures), "client_failure_samples": failures[:10],
            "page_nudges": NUDGES[0],     # routings asked for again by the page after NUDGE_AFTER_S (see LightSession.set)
            # server CPU (all its processes): what one session's page costs, and one update (busy phase)
            "server_cpu_s_per_session_open": cpu and round((cpu1 - cpu0) / sessions, 2),
            "server_cpu_s_per_update": cpu and n_updates and round((cpu2 - cpu1) / n_updates, 3),
            "updates_per_s": round(n_updates / (minutes * 60), 2) if minutes else None,
            # where the machine's CPU went while everyone was busy (cores-worth: 2.0 = both cores);
            # the clients (chromium, this script) share the machine with the server
            "busy_phase_cores_used_all": round(sum(b - a for a, b in zip(stat1[:2], stat2[:2])) / (wall2 - wall1), 2),
            "busy_phase_cores_used_server": cpu and round((cpu2 - cpu1) / (wall2 - wall1), 2),
            "busy_phase_cores_stolen": round((stat2[2] - stat1[2]) / (wall2 - wall1), 2)}


async def first_page_interactive(url: str, timeout_s: float = 60) -> float:
    """Seconds from navigation until the first page is interactive (first screen drawn), server otherwise idle."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"),
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        ctx, page, dt = await browser_open(b, url, timeout_s)
        await ctx.close()
        await b.close()
    return dt


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?")
    mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))) / 2**20
    return f"{os.cpu_count()} CPU threads ({model}), {mem:.1f} GiB RAM, load average {os.getloadavg()[0]:.1f} at start"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=60, help="concurrent sessions in all")
    ap.add_argument("--browsers", type=int, default=5, help="how many of them are real chromium pages")
    ap.add_argument("--minutes", type=float, default=3, help="how long every session stays busy once all are open")
    ap.add_argument("--think", default="4,12", help="seconds between one student's actions: min,max")
    ap.add_argument("--arrival", type=float, default=10, help="students open the link within this many seconds")
    ap.add_argument("--timeout", type=float, default=120, help="per page load / update, seconds")
    ap.add_argument("--num-procs", type=int, default=1)
    ap.add_argument("--port", type=int, default=0, help="the app server's port (0: any free one)")
    ap.add_argument("--app", default="app/main.py", help="the app script to serve (to compare a variant)")
    ap.add_argument("--upstreams", type=int, default=0,
                    help="start this many app processes behind nginx (deploy/nginx-classroom.conf, sticky by "
                         "address; each lightweight session gets its own loopback address)")
    ap.add_argument("--url", help="load an already running server (…/main) instead of starting one")
    ap.add_argument("--server-pid", type=int, action="append",
                    help="with --url: a server process's pid, for memory figures (repeat for several)")
    ap.add_argument("--source-ips", type=int, default=0,
                    help="spread the lightweight sessions over this many loopback addresses 127.0.0.2… "
                         "(through a proxy with address-sticky sessions, as many students as addresses)")
    ap.add_argument("--settle", type=float, default=30, help="seconds to wait after closing for the server to discard sessions")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the app server(s) only, e.g. MOE_LAB_ALLOCATOR=system "
                         "(repeatable; the clients keep this process's environment)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heavy", type=int, default=0,
                    help="of the sessions, how many paste a fresh 4,096+ token text at every action (reported apart)")
    ap.add_argument("--client-nice", type=int, default=19,
                    help="CPU priority (nice) of the chromium pages: 19 = only CPU the server leaves idle, "
                         "as on the students' own computers; 0 = compete with the server")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    try:
        think = tuple(float(x) for x in args.think.split(","))
        if len(think) != 2 or not 0 <= think[0] <= think[1]:
            raise ValueError
    except ValueError:
        print(f"--think must be min,max seconds (e.g. 4,12), got {args.think!r}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"--port must be 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.sessions < 1 or not 0 <= args.browsers <= args.sessions:
        print("--sessions must be >= 1 and 0 <= --browsers <= --sessions", file=sys.stderr)
        return 2
    bad = [kv for kv in args.server_env if "=" not in kv or not kv.split("=", 1)[0]]
    if bad:
        print(f"--server-env must be NAME=VALUE, got {bad[0]!r}", file=sys.stderr)
        return 2
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    sys.path.insert(0, str(ROOT))

    res: dict = {"machine": machine(), "sessions": args.sessions, "browsers": args.browsers,
                 "light_sessions": args.sessions - args.browsers, "minutes_busy": args.minutes,
                 "think_s": list(think), "arrival_s": args.arrival,
                 "client_nice": args.client_nice if args.browsers else None, "server_env": server_env}
    servers: list[Server] = []
    proxy = None
    try:
        lifetime = ["--unused-session-lifetime", "10000", "--check-unused-sessions", "5000"]
        if args.url:
            url, pids = args.url, args.server_pid or []
        elif args.upstreams:
            import shutil
            import tempfile

            nginx_port = free_port()
            servers = [Server(port=free_port(), extra=[*lifetime, "--use-xheaders"], app=args.app,
                              origins=[f"127.0.0.1:{nginx_port}"], server_env=server_env)
                       for _ in range(args.upstreams)]
            for s in servers:
                s.wait_ready(first_page=False)
            proxy = Nginx(shutil.which("nginx") or "/usr/sbin/nginx", Path(tempfile.mkdtemp(prefix="loadtest-nginx-")),
                          nginx_site([s.port for s in servers], nginx_port), nginx_port)
            url, pids = f"http://127.0.0.1:{nginx_port}/main", [s.proc.pid for s in servers]
            args.source_ips = args.source_ips or args.sessions
            res.update(upstreams=args.upstreams, server_cmd=" ".join(servers[0].cmd[2:]),
                       startup_ready_s=round(max(s.ready_s for s in servers), 2))
        else:
            servers = [Server(port=args.port, num_procs=args.num_procs, extra=lifetime, app=args.app,
                              server_env=server_env)]
            server = servers[0].wait_ready()
            url, pids = server.url, [server.proc.pid]
            res.update(num_procs=args.num_procs, server_cmd=" ".join(server.cmd[2:]),
                       server_allocator=server.allocator(),
                       startup_ready_s=round(server.ready_s, 2), startup_first_page_s=round(server.first_page_s, 2))
        sample = (lambda: sum(rss_mb(p) for p in pids)) if pids else None
        cpu = (lambda: sum(cpu_s(p) for p in pids)) if pids else None
        time.sleep(20 if servers else 0)       # the first GET's session is discarded: the true idle level
        if sample:
            res["rss_mb_idle"] = round(sample(), 1)
        if args.browsers:
            res["first_page_interactive_s"] = round(asyncio.run(first_page_interactive(url)), 2)
        lines = lambda: [x for s in servers for x in s.lines]   # noqa: E731
        mark = len(lines())
        res.update(asyncio.run(run_load(url, args.sessions, args.browsers, args.minutes, think, args.arrival,
                                        args.timeout, args.seed, sample, args.source_ips, cpu,
                                        args.client_nice, args.heavy)))
        if servers:
            log = lines()
            mark_close = len(log)
            res.update({f"server_{k}": v for k, v in log_errors(log[mark:mark_close]).items()})
        time.sleep(args.settle)
        if sample:
            res["rss_mb_after_close"] = round(sample(), 1)
            res["rss_after_close_vs_idle_pct"] = round(100 * (res["rss_mb_after_close"] / res["rss_mb_idle"] - 1), 1)
        if servers:
            # closing many pages at once cuts websockets with messages in flight; Panel then logs
            # WebSocketClosedError tracebacks: counted apart, no student saw an error
            res["server_teardown_tracebacks"] = log_errors(lines()[mark_close:])["tracebacks"]
    finally:
        if proxy:
            proxy.stop()
            import shutil

            shutil.rmtree(proxy.prefix, ignore_errors=True)
        for s in servers:
            s.stop()
        if servers:
            (ROOT / "artifacts").mkdir(exist_ok=True)
            (ROOT / "artifacts" / "loadtest_server.log").write_text("".join(x for s in servers for x in s.lines))
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for k, v in res.items():
            print(f"{k:30s} {v}")
    ok = res["client_failures"] == 0 and res.get("server_tracebacks", 0) == 0 and res.get("server_error_lines", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
