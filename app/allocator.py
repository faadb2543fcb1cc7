"""The server's memory allocator: how a finished class's memory goes back to the OS (issue #7).

Why this exists. A page is tens of thousands of small Python objects (Bokeh
models, param watchers, JSON strings). CPython's own small-object allocator
takes memory from the OS in 1 MiB arenas and gives an arena back only when
every object in it is dead. A class's pages fill a few hundred arenas, and a
handful of long-lived objects made while they were open (a timer, a cache
entry, a new id string) leave most of those arenas pinned: after 40 pages
closed, `sys._debugmallocstats()` counted the same bytes in live blocks as
before the class (+9 KB), but 216 arenas instead of 88, with 8,163 empty
16 KiB pools inside them (134 MB). A load test of 60 students left the
server +63 % above its idle memory.

Served with jemalloc (Evans 2006; the allocator Firefox, Redis and Intel's
PyTorch CPU tuning guide use) for EVERY object (`PYTHONMALLOC=malloc`, so
CPython's arenas are out of the way), memory is held in small slabs and
extents that jemalloc purges page by page: the same 40 pages left +3.0 %,
at the same server CPU per page (0.64 s against 0.62-0.63 s; glibc's malloc
in the same place costs 16 % more, measured in docs/serving.md).

`python -m app.allocator COMMAND ...` runs COMMAND (e.g. `panel serve ...`;
a leading `panel` means this Python's Panel) with jemalloc preloaded when the
machine has it (Debian/Ubuntu: `apt-get install libjemalloc2`). The Procfile
and `moe-lab serve` start the server this way. MOE_LAB_ALLOCATOR picks:
`auto` (default: jemalloc when found, else the system's allocators),
`jemalloc` (required: exit 2 if missing), `system` (leave the process as is).
jemalloc runs with its background thread (`MALLOC_CONF=background_thread:true`),
which purges freed pages after its decay time by itself. `release_freed_memory()`
purges at once (a jemalloc purge, or glibc's malloc_trim): the memory probes use it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache
from pathlib import Path

from moe_core.perf import pages

CHOICES = ("auto", "jemalloc", "system")
ENV_CHOICE = "MOE_LAB_ALLOCATOR"            # auto | jemalloc | system
ENV_LIBRARY = "MOE_LAB_JEMALLOC"            # a path to libjemalloc, where it is not in the loader's search path
_MALLCTL_ARENAS_ALL = 4096                  # jemalloc >= 5: "arena.<i>.purge" with i = this means every arena


def find_jemalloc() -> str | None:
    """The jemalloc shared library to preload: $MOE_LAB_JEMALLOC, else the one the dynamic loader knows
    (ldconfig), else None. Linux only (LD_PRELOAD)."""
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library("jemalloc")   # e.g. "libjemalloc.so.2": the loader finds it by name


def serving_env(environ: dict | None = None, choice: str | None = None) -> tuple[dict, str]:
    """The environment to start the server with, and one line saying which allocator it gets.

    Raises ValueError for an unknown choice, or for `jemalloc` when the library cannot be found."""
    env = dict(os.environ if environ is None else environ)
    choice = (choice or env.get(ENV_CHOICE) or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV_CHOICE} must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "system":
        return env, "allocator: the system's (as chosen); memory freed after a class mostly stays with the process"
    lib = find_jemalloc()
    if lib is None:
        if choice == "jemalloc":
            raise ValueError("jemalloc was asked for but not found: install it (Debian/Ubuntu: apt-get install "
                             f"libjemalloc2) or set {ENV_LIBRARY} to libjemalloc.so's path")
        return env, ("allocator: the system's (jemalloc not found: apt-get install libjemalloc2 to have a "
                     "finished class's memory returned, see docs/serving.md)")
    preload = env.get("LD_PRELOAD", "")
    if lib not in preload.split():
        env["LD_PRELOAD"] = f"{lib} {preload}".strip()
    env["PYTHONMALLOC"] = "malloc"              # every Python object from jemalloc, not CPython's arenas
    # jemalloc's own background thread returns freed pages to the OS after its decay time, also when
    # nobody allocates any more (a class has left): no purge has to be scheduled by the server
    env.setdefault("MALLOC_CONF", "background_thread:true")
    return env, f"allocator: jemalloc ({lib}) for every object"


def launch_command(argv: list[str]) -> list[str]:
    """COMMAND as given, except that a leading `panel` runs this Python's Panel (`python -m panel`)."""
    if not argv:
        raise ValueError("usage: python -m app.allocator COMMAND [ARGS...], e.g. panel serve app/main.py")
    return [sys.executable, "-m", "panel", *argv[1:]] if argv[0] == "panel" else list(argv)


@lru_cache(maxsize=1)
def _process_symbols():
    """This process's global symbols (the C library, and whatever LD_PRELOAD put in front of it)."""
    try:
        return ctypes.CDLL(None)
    except OSError:                             # pragma: no cover - Windows has no global namespace
        return None


def active() -> str:
    """Which allocator serves this process: "jemalloc", "glibc" or "other"; with "+pymalloc" when
    CPython's small-object allocator sits in front of it (the default unless PYTHONMALLOC=malloc)."""
    syms = _process_symbols()
    base = ("jemalloc" if pages.mallctl() is not None
            else "glibc" if syms is not None and hasattr(syms, "malloc_trim") else "other")
    return base if os.environ.get("PYTHONMALLOC", "").startswith("malloc") else base + "+pymalloc"


def release_freed_memory() -> bool:
    """Hand the pages of freed objects back to the OS; True if the allocator was asked to.

    jemalloc: flush this thread's cache of freed blocks, then purge every arena's unused
    pages. glibc: `malloc_trim(0)`, which walks every arena and releases free pages
    (madvise) - other long-running glibc processes do the same, e.g. denoland/deno#32662
    and amun-ai/hypha#976. CPython's own arenas (unless PYTHONMALLOC=malloc) are out of
    reach of both: see the module docstring. A no-op (False) elsewhere (macOS, musl)."""
    syms = _process_symbols()
    if syms is None:
        return False
    mallctl = pages.mallctl()
    if mallctl is not None:
        mallctl(b"thread.tcache.flush", None, None, None, 0)
        return mallctl(f"arena.{_MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, 0) == 0
    if hasattr(syms, "malloc_trim"):
        syms.malloc_trim.argtypes = [ctypes.c_size_t]
        syms.malloc_trim(0)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cmd = launch_command(argv)
        env, note = serving_env()
    except ValueError as e:
        print(f"app.allocator: {e}", file=sys.stderr)
        return 2
    print(note, file=sys.stderr, flush=True)
    try:
        os.execvpe(cmd[0], cmd, env)            # replaces this process: signals reach the server itself
    except OSError as e:
        print(f"app.allocator: cannot run {cmd[0]!r}: {e.strerror}", file=sys.stderr)
        return 2
    return 0                                    # pragma: no cover - execvpe does not return


if __name__ == "__main__":
    sys.exit(main())
