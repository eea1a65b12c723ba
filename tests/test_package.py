"""The package's shape: each method's function and its module are different names; the
layers import downwards only (configs <- protocols <- analysis, no cycles)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import types

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vcl_jax"


def _imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, at any depth of its
    code (a function-level import is still a dependency)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vcl_jax"):
                for alias in node.names:  # `from vcl_jax.protocols import experiment`
                    sub = f"{node.module}.{alias.name}"
                    path_of = PACKAGE.parent / sub.replace(".", "/")
                    is_module = path_of.with_suffix(".py").exists() or path_of.is_dir()
                    deps.add(sub if is_module else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("vcl_jax")}
        graph[name] = deps
    return graph


def test_method_functions_do_not_hide_their_modules():
    import vcl_jax.continual as continual

    for fn, module in (("vcl", "variational"), ("mle", "sequential"), ("ewc", "consolidation")):
        assert callable(getattr(continual, fn)) and not isinstance(getattr(continual, fn),
                                                                   types.ModuleType)
        mod = importlib.import_module(f"vcl_jax.continual.{module}")
        assert isinstance(mod, types.ModuleType) and getattr(mod, fn) is getattr(continual, fn)
        assert importlib.util.find_spec(f"vcl_jax.continual.{fn}") is None  # no such module


def test_layers_import_downwards_and_without_cycles():
    graph = _imports()
    layer = {"configs": 0, "protocols": 1, "analysis": 2}

    def rank(module):
        parts = module.split(".")
        return layer.get(parts[1]) if len(parts) > 1 else None

    upward = [(m, d) for m, deps in graph.items() for d in deps
              if rank(m) is not None and rank(d) is not None and rank(d) > rank(m)]
    assert not upward, f"imports against the layering: {upward}"
    # the library under the experiments layer imports nothing of it
    library = [(m, d) for m, deps in graph.items() for d in deps
               if rank(m) is None and rank(d) in (1, 2)]
    assert not library, f"library modules importing the experiments layer: {library}"

    seen, cycles = {}, []

    def visit(m, stack):
        seen[m] = "open"
        for d in graph.get(m, ()):
            if seen.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d in graph and d not in seen:
                visit(d, stack + [d])
        seen[m] = "done"

    for m in graph:
        if m not in seen:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"
