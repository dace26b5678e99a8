"""The layers of README's "Architecture", read from the source: every import between cliplab's modules (at module
level or inside a function, not those under ``TYPE_CHECKING``) goes to the same layer or one below, there is no
import circle, and only the command line and ``profiles`` read environment variables."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cliplab"
LAYERS = {  # lower number: lower layer
    "helpers": (0, {"_checks", "_distributed", "_io", "_network", "_stats", "_torch", "_train"}),
    "kernels": (1, {"attacks", "apgd", "square", "evaluation", "defences", "denoise", "oft", "finetune", "classifier",
                    "checks"}),
    "loading": (2, {"models", "data", "shapes_clip"}),
    "study": (3, {"profiles", "study", "report", "plots"}),
    "command line": (4, {"cli", "runner", "__init__", "__main__"}),
}
LEVEL = {module: level for level, modules in LAYERS.values() for module in modules}
READS_ENVIRONMENT = {"cli", "runner", "profiles", "data", "_network"}  # data/_network: CLIPLAB_DATA, offline flags


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in PACKAGE.glob("*.py")}


def _type_checking_blocks(tree: ast.Module) -> set[ast.AST]:
    return {node for node in ast.walk(tree) if isinstance(node, ast.If)
            and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"}


def _imports(tree: ast.Module) -> set[str]:
    """The cliplab modules ``tree`` imports, wherever it does, except under ``if TYPE_CHECKING:``."""
    skipped = {id(node) for block in _type_checking_blocks(tree) for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        if node.module:  # from .models import x
            found.add(node.module.split(".")[0])
        else:  # from . import study, finetune
            found.update(alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").is_file())
    return found


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LEVEL)


def test_imports_go_to_the_same_layer_or_below():
    upward = [f"{name} -> {imported}" for name, tree in _modules().items() for imported in _imports(tree)
              if LEVEL[imported] > LEVEL[name]]
    assert not upward, f"imports into a higher layer: {upward}"


def test_no_import_circle():
    graph = {name: _imports(tree) - {name} for name, tree in _modules().items()}
    graph["__init__"] = set()  # the package's front door imports everything and is imported by nothing

    def reaches(start, goal, seen):
        return any(node == goal or (node not in seen and reaches(node, goal, seen | {node})) for node in graph[start])

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not circles, f"modules on an import circle: {circles}"


def test_kernels_know_nothing_of_profiles_or_the_study():
    study = {module for module in LAYERS["study"][1]}
    for name, tree in _modules().items():
        if LEVEL[name] <= LAYERS["kernels"][0]:
            assert not _imports(tree) & study, name


def test_only_the_command_line_and_the_profiles_read_the_environment():
    for name, tree in _modules().items():
        reads = any(isinstance(node, ast.Attribute) and node.attr == "environ" for node in ast.walk(tree))
        assert not reads or name in READS_ENVIRONMENT, f"{name} reads os.environ"
