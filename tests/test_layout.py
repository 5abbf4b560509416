"""The package's shape: no import cycles, no oversized modules, a planner free of backend libraries,
one place per scheme, and public names that mean the functions."""
import ast
import subprocess
import sys
from pathlib import Path

import tierquant

SRC = Path(tierquant.__file__).resolve().parent
PLANNER_MODULES = ["schemes", "cost", "planner", "plan", "hardware", "parallel", "devices"]
BACKEND_LIBRARIES = {"torchao", "bitsandbytes", "diffusers", "transformers", "accelerate"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict) -> tuple[set[str], set[str]]:
    """(package modules, outside top-level packages) that `name` imports, anywhere in the file."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import cache` imports the submodule, not the package's own body.
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            found = subs or ([target] if target in mods else [])
            inside.update(found)
            if not found:
                outside.add(target.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                (inside if a.name in mods else outside).add(a.name if a.name in mods else a.name.split(".")[0])
    inside.discard(name)
    return inside, outside


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, mods)[0] for m, p in mods.items()}
    state, path, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_no_module_over_450_lines():
    big = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 450}
    assert not big, big


def test_planner_modules_import_no_backend_library():
    mods = _modules()
    seen, todo, outside = set(), [f"tierquant.{m}" for m in PLANNER_MODULES], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        inside, out = _imports(m, mods[m], mods)
        outside |= out
        todo += [d for d in inside if d != "tierquant"]
    assert not outside & BACKEND_LIBRARIES, outside & BACKEND_LIBRARIES
    # And really: they import with torch and every backend library unavailable.
    blocked = ", ".join(repr(n) for n in sorted(BACKEND_LIBRARIES | {"torch"}))
    code = (f"import sys\nfor n in ({blocked},): sys.modules[n] = None\n"
            + "".join(f"import tierquant.{m}\n" for m in PLANNER_MODULES))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_scheme_has_one_row_and_one_backend():
    from tierquant.backends import BACKENDS
    from tierquant.schemes import CATALOG

    assert set(CATALOG) == set(BACKENDS)
    for name, s in CATALOG.items():
        assert BACKENDS[name].package == (None if s.backend == "torch" else s.backend), name


def test_public_names_are_the_functions():
    import importlib

    for m in _modules():
        importlib.import_module(m)  # every submodule loaded, as in a long session
    for name in ("profile", "plan", "apply", "load", "save", "compare"):
        assert callable(getattr(tierquant, name)) and not isinstance(getattr(tierquant, name), type(tierquant)), name
