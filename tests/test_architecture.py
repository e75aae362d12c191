"""The engine's shape (docs/ARCHITECTURE.md), read from the source with ``ast``: imports point
down the layers only, at module top level; no import cycle; no private name crosses a module;
no module over the size limit. Nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"cryogmm": ROOT / "engine", "cryogmm.bridge": ROOT / "relion_bridge"}
DOORS = (ROOT / "chimerax_bundle" / "src", ROOT / "scipion_plugin" / "cryogmm_scipion")
MAX_LINES = 600

# Layers, lowest first: a module may import from its own group and from groups of lower layers.
LAYERS = (
    ("cryogmm", "cryogmm.errors"),
    ("cryogmm.io.outputs", "cryogmm.runtime", "cryogmm.distributed"),
    ("cryogmm.core",),
    ("cryogmm.bridge",),
    ("cryogmm.io",),
    ("cryogmm.recon",),
    ("cryogmm.gmmfit",),
    ("cryogmm.model",),
    ("cryogmm.simulate",),
    ("cryogmm.hetero",),
    ("cryogmm.poses",),
    ("cryogmm.demo",),
    ("cryogmm.commands", "cryogmm.bridge.commands"),
    ("cryogmm.cli",),
    ("cryogmm.__main__",),
)
# the command-line shell imports its jobs lazily, so `cryogmm info` and `--help` never load torch
LAZY_OK = ("cryogmm.cli", "cryogmm.commands", "cryogmm.bridge.commands")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, base in SOURCES.items():
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((pkg, *rel))
            if pkg == "cryogmm" and rel[:1] == ("data",):
                continue
            mods[name] = f
    return mods


MODULES = _modules()


def _group(mod: str) -> tuple[int, str]:
    best = None
    for i, layer in enumerate(LAYERS):
        for g in layer:
            if (mod == g or mod.startswith(g + ".")) and (best is None or len(g) > len(best[1])):
                best = (i, g)
    assert best is not None, f"{mod} belongs to no layer of docs/ARCHITECTURE.md"
    return best


def _resolve(node: ast.ImportFrom | ast.Import, here: str):
    """(target module, imported names or None) of each cryogmm import in a statement."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == "cryogmm" or a.name.startswith("cryogmm."):
                out.append((a.name, None))
        return out
    if node.level:
        base = here.rsplit(".", node.level)[0]
        mod = f"{base}.{node.module}" if node.module else base
    else:
        mod = node.module or ""
    if not (mod == "cryogmm" or mod.startswith("cryogmm.")):
        return out
    plain = []
    for a in node.names:
        sub = f"{mod}.{a.name}"
        if sub in MODULES:
            out.append((sub, None))
        else:
            plain.append(a.name)
    if plain:
        out.append((mod, plain))
    return out


def _edges():
    edges, lazy, private = [], [], []
    for name, f in MODULES.items():
        tree = ast.parse(f.read_text())
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, names in _resolve(node, name):
                edges.append((name, target, node.lineno))
                if parents.get(node) is not tree and not name.startswith(LAZY_OK):
                    lazy.append(f"{name}:{node.lineno} imports {target} inside a function")
                for n in names or ():
                    if n.startswith("_") and not n.startswith("__"):
                        private.append(f"{name}:{node.lineno} imports private {target}.{n}")
    return edges, lazy, private


EDGES, LAZY, PRIVATE = _edges()


def test_every_module_has_a_layer_and_a_docstring():
    missing = [m for m, f in MODULES.items() if not ast.get_docstring(ast.parse(f.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"
    for m in MODULES:
        _group(m)


def test_imports_point_down_only():
    up = []
    for a, b, line in EDGES:
        if b not in MODULES and b.rsplit(".", 1)[0] in MODULES:
            b = b.rsplit(".", 1)[0]
        la, ga = _group(a)
        lb, gb = _group(b)
        if lb > la or (lb == la and ga != gb):
            up.append(f"{a}:{line} -> {b} ({ga} may not import {gb})")
    assert not up, "upward or sideways imports:\n" + "\n".join(up)


def test_no_import_cycle():
    graph = {m: set() for m in MODULES}
    for a, b, _ in EDGES:
        if b in MODULES and b != a:
            graph[a].add(b)
    # a package's __init__ importing its own submodules is no cycle of ours: none do
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_at_module_top_level():
    assert not LAZY, "\n".join(LAZY)


def test_no_private_name_crosses_a_module():
    found = list(PRIVATE)
    # attribute access to a private name of an imported cryogmm module (``mod._name``)
    for name, f in MODULES.items():
        tree = ast.parse(f.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, names in _resolve(node, name):
                    if names is None:
                        for a in node.names:
                            aliases.add(a.asname or a.name.split(".")[-1])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{name}:{node.lineno} uses private {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("door", DOORS, ids=lambda p: p.parent.name)
def test_doors_use_no_private_engine_name(door):
    found = []
    for f in door.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cryogmm"):
                found += [f"{f.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "\n".join(found)


def test_module_size():
    big = {m: n for m, f in MODULES.items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_bridge_imports_no_torch():
    """The bridge (STAR/.cs, conventions) stays light: neither it nor what it imports loads torch."""
    reach, todo = set(), [m for m in MODULES if m.startswith("cryogmm.bridge") and not m.startswith("cryogmm.bridge.commands")]
    graph = {}
    for a, b, _ in EDGES:
        graph.setdefault(a, set()).add(b if b in MODULES else b.rsplit(".", 1)[0])
    while todo:
        m = todo.pop()
        if m in reach or m not in MODULES:
            continue
        reach.add(m)
        todo += list(graph.get(m, ()))
    heavy = []
    for m in sorted(reach):
        for node in ast.walk(ast.parse(MODULES[m].read_text())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
                heavy.append(m)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
                heavy.append(m)
    assert not heavy, f"the bridge reaches torch through {heavy}"


def test_every_package_is_installed():
    """pyproject lists packages explicitly (the source folders are renamed on install): a
    subpackage missing there is missing from every non-editable install (`pip install .`)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for pkg, base in SOURCES.items():
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((pkg, *rel)))
    assert found <= listed, f"pyproject.toml does not install: {sorted(found - listed)}"
