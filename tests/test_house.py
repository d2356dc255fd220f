"""The shape of the package: data flows one way (no import circle inside megavlm/data), and nothing outside
megavlm/families branches on a family's names (a new family is one module, docs/families.md)."""

from __future__ import annotations

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megavlm")


def _modules(sub: str = "") -> dict[str, str]:
    """Dotted module name → path, for every .py under megavlm/``sub``."""
    out = {}
    root = os.path.join(PKG, sub)
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(name: str, path: str) -> set[str]:
    """Every megavlm module ``name`` imports, at module level or inside functions."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("megavlm"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("megavlm"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` imports module x
    return out


def test_data_imports_form_no_circle():
    mods = _modules("data")
    graph = {m: {i for i in _imports(m, p) if i in mods and i != m} for m, p in mods.items()}
    graph["megavlm.data"] = set()  # the package itself holds nothing
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                raise AssertionError("import circle in megavlm/data: " + " -> ".join(stack[stack.index(n):] + [n]))
            if state.get(n) is None:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert "megavlm.data.conversation" in graph and graph["megavlm.data.constants"] == set()


# What only a family module may branch on: its section fields, its option values, HF model_types.
_FAMILY_FIELDS = {"flavour", "select_strategy"}
_FAMILY_VALUES = {"clip", "siglip", "llava", "mlp2x_gelu", "gelu_pytorch_tanh", "clip_vision_model",
                  "siglip_vision_model"}


@pytest.mark.parametrize("name,path", sorted(_modules().items()))
def test_no_family_branches_outside_families(name, path):
    if name.startswith("megavlm.families"):
        return
    tree = ast.parse(open(path).read())
    bad = []
    for node in ast.walk(tree):
        # (a command-line option of that name, ``args.select_strategy``, is the family's to read, not a branch)
        if isinstance(node, ast.Attribute) and node.attr in _FAMILY_FIELDS and not (
                isinstance(node.value, ast.Name) and node.value.id == "args"):
            bad.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.Constant) and isinstance(side.value, str) and side.value in _FAMILY_VALUES:
                    bad.append(f"line {node.lineno}: compares with {side.value!r}")
    assert not bad, f"{name} branches on a model family's names (move it into megavlm/families): {bad}"
