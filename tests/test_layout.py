"""The package's layout: layers import downward only, and no module imports itself back.

Every import is read with `ast`, function-level ones included. Layers, lowest first:
the leaves (`errors`, `progress`, `_version`, and `graph.match`, which imports nothing of
lensgraph), `store/`, `graph/`, `interp/`, then the entry points and the passes. The one
cycle allowed is the pass registry loading the built-in passes (`pipeline` -> `passes`).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = {"lensgraph": os.path.join(ROOT, "lensgraph"), "lensgraph.passes": os.path.join(ROOT, "passes")}
LEAVES = {"lensgraph.errors", "lensgraph.progress", "lensgraph._version", "lensgraph.graph.match"}
ALLOWED_CYCLE_EDGE = ("lensgraph.pipeline", "lensgraph.passes")  # the registry loads the built-in passes
MAX_TOP_MODULES = 12


def modules() -> dict[str, str]:
    """Dotted module name -> file, for lensgraph and lensgraph.passes (a package-dir mapping)."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for dirpath, dirnames, files in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, folder)
            if package == "lensgraph" and rel.split(os.sep)[0] == "passes":
                continue
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in files:
                if name.endswith(".py"):
                    mod = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    found[mod] = os.path.join(dirpath, name)
    return found


def imports(mods: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the lensgraph modules it imports anywhere in its body."""
    edges: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module
                # `from X import Y` imports the module X.Y where there is one, else X
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    targets.add(sub if sub in mods else origin)
        edges[mod] = {t for t in targets if t in mods and t != mod}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        path.append(mod)
        for nxt in sorted(edges.get(mod, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[mod] = 2
        return None

    for mod in sorted(edges):
        if mod not in state:
            found = visit(mod)
            if found:
                return found
    return None


MODS = modules()
EDGES = imports(MODS)


def test_the_reader_sees_imports_of_every_kind():
    """Guards the checks below against passing on a reader that finds nothing."""
    assert "lensgraph.store.model" in EDGES["lensgraph.process"]  # relative, module level
    assert "lensgraph.passes" in EDGES["lensgraph.pipeline"]  # `from . import passes`, in a function
    assert "lensgraph.graph.match" in EDGES["lensgraph.store.weights"]  # `from ..graph import match`
    assert "lensgraph.pipeline" in EDGES["lensgraph.passes.fold_ln"]  # absolute, from the passes folder
    assert "lensgraph.store.runner" in EDGES["lensgraph.interp.cache"]  # function level
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_but_the_pass_registry():
    edges = {m: set(t) for m, t in EDGES.items()}
    edges[ALLOWED_CYCLE_EDGE[0]].discard(ALLOWED_CYCLE_EDGE[1])
    assert find_cycle(edges) is None


def test_lower_layers_import_downward_only():
    forbidden = ("lensgraph.interp", "lensgraph.pipeline", "lensgraph.process", "lensgraph.verify",
                 "lensgraph.cli", "lensgraph.export", "lensgraph.demo", "lensgraph.tiny_models",
                 "lensgraph.passes")
    wrong = []
    for mod, targets in EDGES.items():
        layer = mod.split(".")[1] if mod.count(".") else ""
        for t in targets:
            if layer in ("graph", "store") and (t == "lensgraph" or t.startswith(forbidden)):
                wrong.append(f"{mod} -> {t}")
            if layer == "store" and t.startswith("lensgraph.graph") and t not in LEAVES:
                wrong.append(f"{mod} -> {t} (store/ is below graph/)")
            if mod in LEAVES and t not in LEAVES:
                wrong.append(f"{mod} -> {t} (a leaf imports no other lensgraph module)")
            if layer == "interp" and t.startswith(("lensgraph.pipeline", "lensgraph.process", "lensgraph.cli")):
                wrong.append(f"{mod} -> {t}")
    assert not wrong, "\n".join(sorted(wrong))


def test_few_modules_at_the_top():
    top = [m for m in MODS if m.count(".") == 1 and m.split(".")[1] not in ("__main__",)
           and os.path.dirname(MODS[m]) == PACKAGE_DIRS["lensgraph"]]
    assert len(top) <= MAX_TOP_MODULES, sorted(top)
    assert {"lensgraph.graph", "lensgraph.store", "lensgraph.interp"} <= set(MODS)


def test_onnxruntime_still_lists_its_operators():
    """safety.runtime_ops reads onnxruntime's private operator list (no public equivalent in
    onnxruntime 1.32, and onnx.defs lacks the com.microsoft ops): fail here, loudly, the day
    onnxruntime moves or removes it."""
    from lensgraph.store.safety import runtime_ops

    runtime_ops.cache_clear()
    ops = runtime_ops()
    for key in [("", "LayerNormalization"), ("", "SimplifiedLayerNormalization"),
                ("com.microsoft", "SkipLayerNormalization"), ("com.microsoft", "GroupQueryAttention")]:
        assert key in ops, key
    assert ops[("", "LayerNormalization")] <= 17
