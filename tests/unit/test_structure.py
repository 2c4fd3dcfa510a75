"""The shape of the source tree, checked: cycles, layers, private names, the test kit, sizes.

A short script over ``ast``, not an opinion. What it proves about ``src/virtwire``:

- **No import cycle** among its modules. Every ``import``/``from ... import`` counts, at module
  level *and* inside functions (a lazy import is still a dependency: it only hides the cycle
  until the function runs). An import names the most specific module that exists
  (``from virtwire.trace import reader`` -> ``virtwire.trace.reader``); a package's
  ``__init__`` counts only when it is imported by name.
- **Layers**: modules under ``virtio/``, ``net/`` and ``pci/`` import only ``memory``, ``virtio``,
  ``net``, ``pci`` and the trace emitter (``virtwire.trace``); the ``trace`` package imports
  nothing of virtwire outside itself.
- **No module reads or writes another module's underscore names**: ``obj._name`` (also through
  ``getattr``/``setattr``/``hasattr`` with a constant name) where ``obj`` is not ``self``/``cls``
  and ``_name`` is not defined in the same module (as a function, class, module or class name,
  ``self._name``/``cls._name``, an argument or a ``__slots__`` entry); and ``from virtwire.m
  import _name`` where ``_name`` is not a module. Dunder names are public.
- **The test kit stays out of product code**: no ``virtwire.testing`` import in ``src/virtwire``
  outside ``testing/`` itself.
- **Sizes**: no source file over 800 lines (modules in ``net/`` at most ``NET_MAX_LINES``), no
  function over 80 lines (``def`` line to last line; nested functions and methods each count).

``BEING_SPLIT`` lists the known violations, all in files being split on branch ``net``; every
entry must still be a violation (a fixed one is reported, so the list only shrinks). The
integrator deletes the list once that branch is merged.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "virtwire"
MAX_FILE_LINES = 800
NET_MAX_LINES = 550  # "about 500"
MAX_FUNCTION_LINES = 80
LOW_LAYERS = ("virtio", "net", "pci")
LOW_LAYER_MAY_IMPORT = ("memory", "virtio", "net", "pci")

# Known violations: none. An entry here must still be a violation (a fixed one is reported).
BEING_SPLIT: dict[str, set[tuple[str, ...]]] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()
TREES = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def _rel(mod: str) -> str:
    return MODULES[mod].relative_to(PKG).as_posix()


def _known(mod: str) -> str:
    """The most specific module of ``MODULES`` that ``mod`` names (or is inside)."""
    while mod not in MODULES and "." in mod:
        mod = mod.rsplit(".", 1)[0]
    return mod


def _imports(mod: str) -> set[str]:
    """virtwire modules ``mod`` imports, anywhere in its body."""
    out: set[str] = set()
    is_pkg = MODULES[mod].name == "__init__.py"
    for node in ast.walk(TREES[mod]):
        if isinstance(node, ast.Import):
            out |= {_known(a.name) for a in node.names if a.name.split(".")[0] == "virtwire"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            if base.split(".")[0] != "virtwire":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else _known(base))
    out.discard(mod)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _own_names(tree: ast.AST) -> set[str]:
    """Names a module defines itself (see module docstring)."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and _is_self(node.value):
            own.add(node.attr)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
        elif isinstance(node, ast.alias):
            own.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
            own |= {c.value for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return own


# Documented public APIs of the standard library whose names start with an underscore.
STDLIB_UNDERSCORE_API = frozenset({"_exit", "_getframe", "_replace", "_asdict", "_fields", "_make"})


def _private_uses(mod: str) -> list[tuple[str, str, int]]:
    """(file, name, line) of every reach into another module's underscore name."""
    tree, rel = TREES[mod], _rel(mod)
    own = _own_names(tree) | STDLIB_UNDERSCORE_API
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and not _is_self(node.value):
            if node.attr not in own:
                found.append((rel, node.attr, node.lineno))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") \
                and len(node.args) >= 2 and not _is_self(node.args[0]) \
                and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value):
            if node.args[1].value not in own:
                found.append((rel, node.args[1].value, node.lineno))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "virtwire":
            for a in node.names:
                if _private(a.name) and f"{node.module}.{a.name}" not in MODULES:
                    found.append((rel, a.name, node.lineno))
    return found


def _check(kind: str, violations: set[tuple[str, ...]], detail: str) -> None:
    """No violation outside ``BEING_SPLIT[kind]``, and no stale entry in it."""
    known = BEING_SPLIT.get(kind, set())
    new = sorted(violations - known)
    stale = sorted(known - violations)
    assert not new, f"{kind}: {detail}: {new}"
    assert not stale, f"{kind}: fixed, delete from BEING_SPLIT: {stale}"


def test_no_import_cycles() -> None:
    used = {(a, b) for a, outs in GRAPH.items() for b in outs}
    _check("edges", used & BEING_SPLIT.get("edges", set()), "allowed edge no longer present")
    graph = {a: {b for b in outs if (a, b) not in BEING_SPLIT.get("edges", set())}
             for a, outs in GRAPH.items()}
    assert _cycles(graph) == []


def test_low_layers_import_only_low_layers_and_the_trace_emitter() -> None:
    bad = set()
    for mod, outs in GRAPH.items():
        if _layer(mod) in LOW_LAYERS:
            bad |= {(mod, o) for o in outs
                    if _layer(o) not in LOW_LAYER_MAY_IMPORT and o != "virtwire.trace"}
        elif _layer(mod) == "trace":
            bad |= {(mod, o) for o in outs if _layer(o) != "trace"}
    # the trace package's own edges to the rings are listed under "edges"
    bad -= BEING_SPLIT.get("edges", set())
    _check("layers", bad, "imports across layers")


def test_no_module_reaches_into_another_modules_private_names() -> None:
    uses = [u for m in MODULES for u in _private_uses(m)]
    _check("private", {(f, n) for f, n, _ in uses}, f"underscore names used across modules "
           f"(file, name); lines: {sorted({(f, ln) for f, _, ln in uses})}")


def test_product_code_does_not_import_the_test_kit() -> None:
    bad = sorted((m, o) for m, outs in GRAPH.items() for o in outs
                 if _layer(o) == "testing" and _layer(m) != "testing")
    assert not bad


def test_file_sizes() -> None:
    bad = set()
    for mod, path in MODULES.items():
        n = len(path.read_text().splitlines())
        limit = NET_MAX_LINES if _layer(mod) == "net" else MAX_FILE_LINES
        if n > limit:
            bad.add((_rel(mod),))
    _check("files", bad, f"files over {MAX_FILE_LINES} lines (net/: {NET_MAX_LINES})")


def test_function_sizes() -> None:
    bad = set()
    for mod, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno is not None and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                bad.add((_rel(mod), node.name))
    _check("functions", bad, f"functions over {MAX_FUNCTION_LINES} lines")


def test_the_checks_catch_what_they_claim() -> None:
    """The detectors on small samples: a cycle, a private reach, a private import."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import x\nclass C:\n    def f(self, q):\n        self._own = 1\n"
                     "        return q._theirs + self._own + getattr(q, '_hidden')\n")
    own = _own_names(tree)
    assert "_own" in own and "_theirs" not in own and "_hidden" not in own
