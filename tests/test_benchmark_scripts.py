"""The scripts under benchmarks/ still name what cliplab has: each attribute they read or replace on a name imported
from cliplab (``name.attr.attr``, in the script's code, not in the code strings some of them run) resolves, through
cliplab's modules and one level into a class. A refactor that moves a function breaks a benchmark only when someone
runs it, which may be weeks later (``count_passes.py`` read and replaced ``cliplab.evaluation._run_attack`` long after
it had moved to ``evaluation.ensemble``)."""
from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def _cliplab_imports(tree: ast.Module) -> dict[str, object]:
    """Each name a script binds by importing from cliplab, and the object it is bound to."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cliplab":
                    name = alias.asname or "cliplab"
                    bound[name] = importlib.import_module(alias.name if alias.asname else "cliplab")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cliplab":
            module = importlib.import_module(node.module)
            for alias in node.names:
                bound[alias.asname or alias.name] = _member(module, alias.name)
    return bound


def _member(owner, name: str):
    """``owner.name``, or the submodule ``owner.name`` (an attribute only once something has imported it)."""
    if not hasattr(owner, name) and hasattr(owner, "__path__"):
        importlib.import_module(f"{owner.__name__}.{name}")
    return getattr(owner, name)


def _attribute_chains(tree: ast.Module, roots) -> list[tuple[int, str, list[str]]]:
    """(line, root, [attr, ...]) of every attribute read or assigned whose chain starts at one of ``roots``, except
    roots the script also binds to something else (an assignment, an argument)."""
    rebound = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    rebound |= {node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)}
    chains = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            attrs, inner = [], node
            while isinstance(inner, ast.Attribute):
                attrs.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in roots and inner.id not in rebound:
                chains.append((node.lineno, inner.id, attrs[::-1]))
    return chains


def _has(owner, attr: str) -> bool:
    """``owner`` has ``attr``: a module's member or submodule, a class's attribute or dataclass field."""
    try:
        _member(owner, attr)
        return True
    except (AttributeError, ModuleNotFoundError):
        return attr in getattr(owner, "__dataclass_fields__", {})


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.name)
def test_what_a_benchmark_takes_from_cliplab_exists(script):
    tree = ast.parse(script.read_text())
    bound = _cliplab_imports(tree)
    missing = []
    for line, root, attrs in _attribute_chains(tree, bound):
        owner = bound[root]
        for depth, attr in enumerate(attrs):
            if not _has(owner, attr):
                missing.append(f"{script.name}:{line}: {root}.{'.'.join(attrs[:depth + 1])}")
                break
            if not isinstance(owner, types.ModuleType):
                break  # one level into a class or a function: what it returns is not looked up here
            owner = _member(owner, attr)
    assert not missing, missing
