"""Freed memory kept for reuse in one thread: `pages_kept()`.

A training step or a timed forward frees big buffers (activations, the logits,
the experts' hidden states) and asks for the same sizes again a moment later.
When the allocator hands the freed pages back to the OS in between, every
pass maps them again and the kernel zero-fills each 4 KiB page on first touch.
Under jemalloc, the allocator the server runs with (app/allocator.py), one step
of the lab's model page-faulted 8,800 times (35 MB), a quarter of its time:
67 ms a step instead of 52. The dense FFN of the Scale tab faulted 8,200 times
a forward and took 36 ms against 22 for the MoE layer with the same arithmetic,
a difference a student would have read as MoE being faster than dense.

`pages_kept()` gives the calling thread, for as long as it is inside, a private
jemalloc arena (Evans 2006; `arenas.create`) whose purging is off, so what it
frees stays mapped for its own next pass; on the way out the thread goes back
to its own arena and the private one is purged: its freed pages go back to the
OS, and the arena is kept for the next user (a few are made per process, never
one per call). Other threads, the students' routings among them, keep
jemalloc's settings. What is made inside and freed later (a lab model, when its
session closes) goes back to the private arena, whose purging is off: the
server's housekeeping purges every arena once nobody routes
(`app.allocator.release_freed_memory`), this one included. Elsewhere (glibc,
macOS) it does nothing and says so.
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from functools import lru_cache

_NEVER = -1                 # a decay time of -1 ms: never purge by time


@lru_cache(maxsize=1)
def mallctl():
    """jemalloc's `mallctl` when jemalloc serves this process (preloaded), else None."""
    try:
        fn = getattr(ctypes.CDLL(None), "mallctl", None)
    except OSError:                             # pragma: no cover - no global namespace (Windows)
        return None
    if fn is not None:
        fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return fn


def _write(m, name: str, value) -> bool:
    return m(name.encode(), None, None, ctypes.byref(value), ctypes.sizeof(value)) == 0


def _read_write(m, name: str, new):
    """Read `name` into a value of new's type, then write `new` (one call); None when it fails."""
    old = type(new)()
    size = ctypes.c_size_t(ctypes.sizeof(old))
    ok = m(name.encode(), ctypes.byref(old), ctypes.byref(size), ctypes.byref(new), ctypes.sizeof(new)) == 0
    return old if ok else None


_spare: list[int] = []      # private arenas not in use now
_lock = threading.Lock()


def _new_arena(m) -> int | None:
    index = ctypes.c_uint()
    size = ctypes.c_size_t(ctypes.sizeof(index))
    if m(b"arenas.create", ctypes.byref(index), ctypes.byref(size), None, 0) != 0:
        return None
    never = ctypes.c_ssize_t(_NEVER)
    if not all(_write(m, f"arena.{index.value}.{k}", never) for k in ("dirty_decay_ms", "muzzy_decay_ms")):
        return None
    return index.value


@contextmanager
def pages_kept():
    """Inside, memory this thread frees stays mapped for its own reuse; given back on exit.

    Yields True when that is in effect (jemalloc), False where it does nothing. Objects
    made inside live on after it (a trained model does); only the freed pages are purged."""
    m = mallctl()
    arena = None
    if m is not None:
        with _lock:
            arena = _spare.pop() if _spare else _new_arena(m)
    old = None if arena is None else _read_write(m, "thread.arena", ctypes.c_uint(arena))
    if old is None:
        if arena is not None:
            with _lock:
                _spare.append(arena)
        yield False
        return
    try:
        yield True
    finally:
        _write(m, "thread.arena", old)
        m(b"thread.tcache.flush", None, None, None, 0)
        m(f"arena.{arena}.purge".encode(), None, None, None, 0)
        with _lock:
            _spare.append(arena)


def describe(kept: bool) -> str:
    """How freed memory was handled, for a measurement's record."""
    return ("kept for reuse by the measuring thread (a jemalloc arena without purging)" if kept
            else "the allocator's defaults")


__all__ = ["pages_kept", "mallctl", "describe"]
