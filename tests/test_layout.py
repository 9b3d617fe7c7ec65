"""The library's layout: every import points down the flow, and no function is too long to read at once.

The packages of `mlx_k2`, lowest first (docs/design.md says why in this order). A module may import from its
own package and from packages below it, never from one above: so the core path reads without the tooling
around it, and a package can be lifted out with everything it needs beneath it.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "mlx_k2"
LAYERS = ("errors", "limits", "jsonio", "exact", "checkpoint", "evidence", "read", "kernels", "model", "run", "vindex",
          "explorer", "synth", "bench")
LONGEST_FUNCTION = 60  # lines, decorators and docstring included


def _group(module: str) -> str | None:
    """The layer of a dotted `mlx_k2...` module name (None: the package root, which holds only the version)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        if "build" in path.relative_to(LIBRARY).parts:
            continue
        parts = list(path.relative_to(LIBRARY.parent).with_suffix("").parts)
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


def _imports(module: str, tree: ast.Module) -> list[str]:
    """The library modules `module` imports, resolved to absolute names (at any depth: lazy imports count)."""
    package = module.split(".")[:-1] if not module.endswith("__init__") else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "mlx_k2" or target.startswith("mlx_k2."):
                found += [f"{target}.{a.name}" if target.count(".") == 0 else target for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("mlx_k2")]
    return found


def test_every_package_is_in_a_layer():
    groups = {_group(m) for m in _modules()} - {None, "__init__"}
    assert groups == set(LAYERS), "a package or top-level module outside the declared layers"


def test_no_import_points_up_the_flow():
    upward = []
    for module, tree in _modules().items():
        mine = _group(module)
        for target in _imports(module, tree):
            theirs = _group(target)
            if mine in LAYERS and theirs in LAYERS and LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_function_over_sixty_lines():
    long = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > LONGEST_FUNCTION:
                    long.append(f"{module}.{node.name}: {node.end_lineno - first + 1} lines")
    assert long == []
