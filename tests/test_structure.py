"""The layout's rules, measured with `ast` as a new reader would meet them: no module over 400
lines, no function over 60 (the training loop's `train` may go to 80), no import cycles between
the project's modules, and no import of a project module inside a function unless a comment on
that line says why (a fast `--help`, an optional dependency); cli.py imports inside its commands
throughout, so that `--help` needs no torch (its docstring says so)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("preprocess", "shards", "train")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONGER = {("train/loop.py", "train"): 80}


def _modules() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))] + [ROOT / "cli.py"]
    out = {}
    for p in files:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imported(node: ast.AST, module: str, path: Path) -> list[str]:
    """The project modules an import statement names (a `from pkg import mod` names pkg.mod)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if n in MODULES and n != module]


def _imports(module: str, path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules imported at any depth, [(line, module) imported inside a function])."""
    tree = ast.parse(path.read_text())
    every, inner = set(), []
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                inner += [(node.lineno, m) for m in _imported(node, module, path)]
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            every.update(_imported(node, module, path))
    return every, sorted(set(inner))


def test_no_module_is_longer_than_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_longer_than_60_lines():
    long = {}
    for p in MODULES.values():
        rel = str(p.relative_to(ROOT))
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1
                if span > LONGER.get((rel, node.name), MAX_FUNCTION_LINES):
                    long[f"{rel}:{node.lineno} {node.name}"] = span
    assert long == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles_even_through_imports_inside_functions():
    graph = {m: _imports(m, p)[0] for m, p in MODULES.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():  # the test above can fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_inside_functions_say_why():
    silent = []
    for m, p in MODULES.items():
        if p.name == "cli.py":
            continue
        lines = p.read_text().splitlines()
        for line, target in _imports(m, p)[1]:
            if "#" not in lines[line - 1]:
                silent.append(f"{p.relative_to(ROOT)}:{line} {target}")
    assert silent == []


def test_imports_follow_the_layers():
    """shards/ (the contract) imports neither preprocess/ nor train/; preprocess/ never imports train/."""
    below = {"shards": ("preprocess", "train"), "preprocess": ("train",)}
    upward = [f"{m} -> {t}" for m, p in MODULES.items() for t in _imports(m, p)[0]
              if t.split(".")[0] in below.get(m.split(".")[0], ())]
    assert upward == []


@pytest.mark.parametrize("name", ["train.show", "train.export", "train.predict", "train.checkpoint"])
def test_predict_export_and_show_never_import_the_loop(name):
    """They read checkpoints through train/checkpoint.py, the one schema; the loop is for training."""
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += _imports(m, MODULES[m])[0]
    assert "train.loop" not in seen


def test_every_package_folder_is_installed():
    """pyproject lists packages by name: a sub-package missing there is missing from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(ROOT).parent.parts) for top in PACKAGES for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set()
