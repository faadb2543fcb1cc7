"""The package's rules, checked on its source: what a newcomer can rely on when reading it.

- moe_core never imports Panel or Bokeh (the core runs without the app);
- moe_core's modules import each other at module level, in layers with no circle; a function-level
  import is allowed only where a heavy dependency is deferred on purpose (the CLI's commands, scipy
  for BASE, transformers for a benchmark baseline);
- app/ never re-implements routing math: scores, top-k and capacity come from moe_core.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "moe_core"
DEFERRED_ON_PURPOSE = {"scipy", "transformers"}   # heavy, needed by one path each


def core_modules() -> dict[str, Path]:
    out = {}
    for p in CORE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """Absolute names a statement in `module` imports (for `from . import x`, the submodule x if it is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    return [target] + [f"{target}.{a.name}" for a in node.names]


def imports(only_module_level: bool) -> dict[str, set[str]]:
    mods = core_modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if only_module_level else list(ast.walk(tree))
        found = set()
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(resolve(name, node, path.name == "__init__.py"))
        graph[name] = found
    return graph


def test_moe_core_never_imports_panel_or_bokeh():
    for name, found in imports(only_module_level=False).items():
        bad = {m for m in found if m.split(".")[0] in ("panel", "bokeh", "app")}
        assert not bad, f"{name} imports {bad}"
    # and at run time, every module of the package loaded: neither is pulled in indirectly
    mods = " ".join(sorted(m for m in core_modules() if not m.endswith("__main__")))
    code = (f"import importlib, sys\nfor m in '{mods}'.split(): importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('panel', 'bokeh')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_module_level_imports_have_no_circle():
    mods = core_modules()
    graph = {m: {t for t in found if t in mods and t != m} for m, found in imports(only_module_level=True).items()}
    # a package's __init__ is imported with any of its modules: count it as a dependency, not a cycle
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_imports_sit_at_module_level_unless_deferred_on_purpose():
    for path in CORE.rglob("*.py"):
        if path.name == "cli.py":                  # says why at its top: its commands import torch
            continue
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                heavy = all(n.split(".")[0] in DEFERRED_ON_PURPOSE for n in names)
                assert heavy, f"{path.relative_to(ROOT)}:{node.lineno} imports {names} inside a function"
                comment = path.read_text().split("\n")[node.lineno - 4: node.lineno]
                assert any("deferred on purpose" in line for line in comment), \
                    f"{path.relative_to(ROOT)}:{node.lineno}: a deferred import says why"


ROUTING_MATH = {"topk", "softmax", "log_softmax", "sigmoid", "argsort", "expert_capacity", "linprog",
                "linear_sum_assignment"}


def test_app_never_reimplements_routing():
    for path in (ROOT / "app").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                assert name not in ROUTING_MATH, \
                    f"{path.relative_to(ROOT)}:{node.lineno} calls {name}: routing is computed in moe_core"
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in ("torch.nn.functional", "scipy.optimize"), \
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}"
