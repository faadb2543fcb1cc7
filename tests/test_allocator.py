"""The server's allocator (app/allocator.py): jemalloc for every object, so a class's memory comes back.

The launcher's choices and messages are checked in-process; what the choice is for is
checked for real in child processes: the same pattern of freed objects with a few
survivors (what a closed class leaves) is given back to the OS under jemalloc and is
not under CPython's own allocator. `make test` installs Debian's libjemalloc2; the
browser tests also run their server through the launcher (tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import allocator

ROOT = Path(__file__).resolve().parent.parent


def need_jemalloc() -> str:
    lib = allocator.find_jemalloc()
    if lib is None:
        pytest.fail("libjemalloc not found: `make test` installs Debian's libjemalloc2 (apt-get install libjemalloc2)",
                    pytrace=False)
    return lib


def test_system_choice_leaves_the_environment_alone():
    env, note = allocator.serving_env({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, "system")
    assert env == {"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}
    assert note.startswith("allocator: the system's")


def test_auto_preloads_jemalloc_for_every_object_and_keeps_other_preloads():
    lib = need_jemalloc()
    env, note = allocator.serving_env({"LD_PRELOAD": "libfoo.so"}, "auto")
    assert env["LD_PRELOAD"].split() == [lib, "libfoo.so"]
    assert env["PYTHONMALLOC"] == "malloc"           # CPython's arenas out of the way: every object from jemalloc
    assert "jemalloc" in note
    again, _ = allocator.serving_env(env, "auto")      # launching twice does not preload twice
    assert again["LD_PRELOAD"].split() == [lib, "libfoo.so"]


def test_choice_comes_from_the_environment_and_bad_choices_say_what_is_allowed(monkeypatch):
    env, _ = allocator.serving_env({allocator.ENV_CHOICE: "system"})
    assert "PYTHONMALLOC" not in env
    with pytest.raises(ValueError, match="auto, jemalloc, system"):
        allocator.serving_env({}, "tcmalloc")


def test_missing_jemalloc_falls_back_under_auto_and_is_an_error_when_required(monkeypatch, tmp_path):
    monkeypatch.setenv(allocator.ENV_LIBRARY, str(tmp_path / "no-such-libjemalloc.so"))
    env, note = allocator.serving_env({"PATH": "/bin"}, "auto")
    assert env == {"PATH": "/bin"} and "apt-get install libjemalloc2" in note
    with pytest.raises(ValueError, match="apt-get install libjemalloc2"):
        allocator.serving_env({}, "jemalloc")


def test_launch_command_runs_this_pythons_panel():
    assert allocator.launch_command(["panel", "serve", "app/main.py"]) == [sys.executable, "-m", "panel", "serve",
                                                                          "app/main.py"]
    assert allocator.launch_command(["/bin/true"]) == ["/bin/true"]
    with pytest.raises(ValueError, match="usage"):
        allocator.launch_command([])


@pytest.mark.parametrize("argv, env, message", [
    ([], {}, "usage: python -m app.allocator COMMAND"),
    (["/bin/true"], {allocator.ENV_CHOICE: "bogus"}, "MOE_LAB_ALLOCATOR must be one of"),
    (["/no/such/program"], {allocator.ENV_CHOICE: "system"}, "cannot run '/no/such/program'"),
])
def test_launcher_errors_are_one_line_and_exit_2(argv, env, message):
    r = subprocess.run([sys.executable, "-m", "app.allocator", *argv], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.splitlines() if x.startswith("app.allocator")]) == 1


def test_serve_asking_for_a_missing_jemalloc_says_how_to_install_it(tmp_path):
    env = {**os.environ, allocator.ENV_LIBRARY: str(tmp_path / "no-such-libjemalloc.so")}
    r = subprocess.run([sys.executable, "-m", "moe_core", "serve", "--port", "0", "--allocator", "jemalloc"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("app.allocator: jemalloc was asked for but not found: install it (Debian/Ubuntu: "
                                "apt-get install libjemalloc2) or set MOE_LAB_JEMALLOC to libjemalloc.so's path")


# A child process that makes what a class leaves behind: many small objects (a page is tens of
# thousands), of which 1 in 500 outlives the rest (a timer, a cache entry); then frees the rest and
# asks the allocator to give memory back. It prints the allocator and its RSS at each step.
FRAGMENT = r"""
import gc, json
from pathlib import Path
from app.allocator import active, release_freed_memory

def rss_mb():
    return int(next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:")).split()[1]) / 1024

release_freed_memory()
before = rss_mb()
objects = [{"id": i, "name": f"p{i}"} for i in range(600_000)]
survivors = objects[::500]
grown = rss_mb()
del objects
gc.collect()
release_freed_memory()
print(json.dumps({"allocator": active(), "before": before, "grown": grown, "after": rss_mb(),
                  "survivors": len(survivors)}))
"""


def run_fragment(choice: str, code: str = FRAGMENT) -> dict:
    """Run `code` in a child Python started as the launcher would (`choice`); its stdout is one JSON object."""
    env, _ = allocator.serving_env({**os.environ, "PYTHONPATH": str(ROOT)}, choice)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_jemalloc_gives_freed_objects_back_where_cpythons_arenas_keep_them():
    need_jemalloc()
    je, system = run_fragment("jemalloc"), run_fragment("system")
    assert je["allocator"] == "jemalloc" and system["allocator"].endswith("+pymalloc")
    for r in (je, system):
        assert r["grown"] - r["before"] > 100            # the objects really took memory (~200 MB)
    kept = lambda r: (r["after"] - r["before"]) / (r["grown"] - r["before"])  # noqa: E731
    # jemalloc: the survivors' pages stay, the rest goes back (measured: ~10 % kept)
    assert kept(je) < 0.25, je
    # CPython's allocator: 1 MiB arenas, each still holding a survivor, all stay (measured: ~97 % kept).
    # If this ever fails, CPython gives arenas back by itself and the launcher may no longer be needed.
    assert kept(system) > 0.6, system
