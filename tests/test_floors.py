"""The core's floors (docs/design.md): synfer.contract <- synfer.engine <- synfer.commands <- synfer.api / synfer.testing.

Read from the source, not from sys.modules: every `import` of a synfer module anywhere in synfer/ (module level or
inside a function) is an edge. The graph has no cycle, no edge climbs a floor, the core uses no old flat name, only
the commands floor imports click, and a function-local import is kept only for a heavy or optional dependency,
with its one-word reason as a comment."""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import synfer

CORE = Path(synfer.__file__).parent
FLOORS = {"synfer.contract": 0, "synfer.engine": 1, "synfer.commands": 2}
TOP = {"synfer.api": 3, "synfer.testing": 3, "synfer.__main__": 3, "synfer": 0}
LOCAL_OK = {"torch", "diffusers", "transformers", "safetensors", "mmengine", "matplotlib", "scipy", "tqdm", "PIL", "peft",
            "h5py", "tflite", "datasets", "bitsandbytes"}
LAZY_API = ("synfer", "synfer.api")  # `synfer.run` & co. load the API on first use, so `import synfer` stays light


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def floor(module: str) -> int:
    if module in TOP:
        return TOP[module]
    return next(level for pkg, level in FLOORS.items() if module == pkg or module.startswith(pkg + "."))


def imports(path: Path):
    """(imported synfer module, line, function-local?) for every import of synfer in one file."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "synfer":
            for alias in node.names:  # `from synfer.engine import dataset` names a module; `from synfer.engine.dataset import x` does not
                sub = f"{node.module}.{alias.name}"
                yield (sub if sub in MODULES or sub.split(".")[-1] in synfer.MOVED and node.module == "synfer" else node.module,
                       node.lineno, id(node) in local)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "synfer":
                    yield alias.name, node.lineno, id(node) in local


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports(p) if target != m} for m, p in MODULES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_core_stands_on_three_floors():
    assert {m.rsplit(".", 1)[0] for m in MODULES if m.count(".") == 2} == set(FLOORS)
    assert set(MODULES) - {m for m in MODULES if any(m.startswith(f + ".") or m == f for f in FLOORS)} == set(TOP)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_climbs_a_floor():
    climbs = [f"{m} -> {t} (line {line})" for m, p in MODULES.items() for t, line, local in imports(p)
              if t in MODULES and floor(t) > floor(m) and (m, t) != LAZY_API]
    assert climbs == []


def test_the_core_imports_modules_by_their_floor_names():
    old = [f"{m}: {t} (line {line})" for m, p in MODULES.items() for t, line, _ in imports(p) if t not in MODULES]
    assert old == []


def test_only_the_commands_floor_imports_click():
    users = [m for m, p in MODULES.items() for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, (ast.Import, ast.ImportFrom)) and any(
                 (getattr(n, "module", None) or a.name).split(".")[0] == "click" for a in n.names)]
    assert users and all(m.startswith("synfer.commands.") for m in users), users


def test_function_local_imports_are_heavy_dependencies_with_a_reason():
    bad = []
    for m, p in MODULES.items():
        lines = p.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(f):
                if isinstance(n, ast.Import):
                    names = [a.name for a in n.names]
                elif isinstance(n, ast.ImportFrom):
                    names = [f"synfer.{n.names[0].name}" if n.module == "synfer" else n.module or ""]
                else:
                    continue
                line = lines[n.lineno - 1]
                if (m, names[0]) == LAZY_API:
                    continue
                reason = line.split("#", 1)[1].split() if "#" in line else []
                if any(name.split(".")[0] not in LOCAL_OK for name in names) or not reason:
                    bad.append(f"{m} line {n.lineno}: {line.strip()}")
    assert bad == [], "a function-local import is only for a heavy or optional dependency, with '# <reason>':\n" + "\n".join(bad)


@pytest.mark.parametrize("old, new", [("stages", "synfer.contract.stages"), ("labels", "synfer.contract.labels"),
                                      ("dataset", "synfer.engine.dataset"), ("plugins", "synfer.engine.registry")])
def test_old_flat_names_are_the_same_modules(old, new):
    """Plugins written before the floors (`from synfer.stages import Expert`) import the very same classes."""
    assert importlib.import_module(f"synfer.{old}") is importlib.import_module(new)
    assert sys.modules[f"synfer.{old}"] is sys.modules[new]


def test_the_api_function_label_is_not_shadowed_by_the_label_command():
    importlib.import_module("synfer.commands.label")
    assert callable(synfer.label) and not isinstance(synfer.label, type(sys))


def test_python_m_synfer_cli_still_starts_the_command_line():
    """`torchrun -m synfer.cli ...` in scripts written before the floors (`-m synfer` is the documented form)."""
    import subprocess

    for module in ("synfer", "synfer.cli"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "Usage:" in out.stdout, (module, out.stderr[-2000:])
