"""The layers of README's "Layout", read from the source: every import between cliplab's modules (at module level,
inside a function or under ``TYPE_CHECKING``: a type is a dependency too) goes to the same layer or one below,
there is no import circle, and only the command line, the profiles and the data loaders read the environment.

The rules are functions of a {module: source} mapping, so that they are also tried on planted violations: a test
that cannot fail is not a test."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cliplab"
# lower number: lower layer; a module's layer is its folder's, or its own name's for a module at the top. The kernel
# packages are in order too: evaluation runs the attacks, training attacks and evaluates, and neither is imported back
LAYERS = {
    "helpers": (0, {"_arguments", "_distributed", "_io", "_memory", "_network", "_stats", "_torch"}),
    "kernels: the classifier, attacks, defences": (1, {"attacks", "defences", "classifier", "vit"}),
    "kernels: evaluation": (2, {"evaluation"}),
    "kernels: training": (3, {"training"}),
    "loading": (4, {"models", "data", "shapes100", "suite", "shapes_clip"}),
    "study": (5, {"study"}),
    "command line": (6, {"cli", "__init__", "__main__"}),
}
LEVEL = {name: level for level, names in LAYERS.values() for name in names}
# cli: arguments and the notebooks' environment; profiles: get_profile's settings; data and _network: CLIPLAB_DATA
# and the offline flags (HF_HUB_OFFLINE) that a library call honours without a profile; _memory: the user's own malloc
# settings (GLIBC_TUNABLES), which it keeps
READS_ENVIRONMENT = {"cli.commands", "cli.reproduce", "study.profiles", "data", "_network", "_memory"}


def package_sources(package: Path = PACKAGE) -> dict[str, str]:
    """{dotted module name: source}, e.g. "attacks.pgd"; a package's own module is "attacks.__init__"."""
    return {".".join(path.relative_to(package).with_suffix("").parts): path.read_text()
            for path in package.rglob("*.py")}


def layer(module: str) -> int:
    return LEVEL[module.split(".")[0]]


def imports(module: str, source: str, modules: set[str]) -> set[str]:
    """The cliplab modules ``module`` imports, wherever it does (a package counts as its ``__init__``)."""
    package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
        for alias in node.names if not node.module else [None]:
            target = ".".join(base + ([alias.name] if alias else []))
            for candidate in (target, f"{target}.__init__", ".".join(base) or "__init__",
                              f"{'.'.join(base)}.__init__"):
                if candidate in modules:
                    found.add(candidate)
                    break
    return found - {module}


def graph(sources: dict[str, str]) -> dict[str, set[str]]:
    modules = set(sources)
    return {module: imports(module, source, modules) for module, source in sources.items()}


def upward_imports(sources: dict[str, str]) -> list[str]:
    return sorted(f"{module} -> {imported}" for module, targets in graph(sources).items() for imported in targets
                  if layer(imported) > layer(module))


def circles(sources: dict[str, str]) -> list[str]:
    """The modules on an import circle. The top ``__init__`` imports everything and nothing imports it."""
    edges = graph(sources)
    edges["__init__"] = set()

    def reaches(start, goal, seen):
        return any(node == goal or (node not in seen and reaches(node, goal, seen | {node}))
                   for node in edges[start])

    return sorted(module for module in edges if reaches(module, module, {module}))


def environment_readers(sources: dict[str, str]) -> set[str]:
    return {module for module, source in sources.items()
            if any(isinstance(node, ast.Attribute) and node.attr == "environ" for node in ast.walk(ast.parse(source)))}


SOURCES = package_sources()


def test_every_module_has_a_layer():
    assert all(module.split(".")[0] in LEVEL for module in SOURCES), sorted(SOURCES)
    assert {name for name in LEVEL if name not in ("__init__", "__main__")} <= {m.split(".")[0] for m in SOURCES}


def test_imports_go_to_the_same_layer_or_below():
    assert not upward_imports(SOURCES), f"imports into a higher layer: {upward_imports(SOURCES)}"


def test_no_import_circle():
    assert not circles(SOURCES), f"modules on an import circle: {circles(SOURCES)}"


def test_only_the_command_line_the_profiles_and_the_data_loaders_read_the_environment():
    assert environment_readers(SOURCES) <= READS_ENVIRONMENT


PLANTED_TYPE_IMPORT = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..study.profiles import Profile\n"


@pytest.mark.parametrize("module, planted", [
    ("attacks.pgd", "from ..study.profiles import Profile\n"),
    ("attacks.pgd", PLANTED_TYPE_IMPORT),
    ("training.trainer", "def later():\n    from ..cli import main\n"),
    ("models", "from .study import plots\n"),
    ("attacks.pgd", "from ..evaluation.statistics import Proportion\n"),  # the kernels in order
    ("evaluation.sweeps", "def later():\n    from ..training.trainer import finetune\n"),
])
def test_a_planted_upward_import_is_found(module, planted):
    sources = {**SOURCES, module: SOURCES[module] + planted}
    assert upward_imports(sources), planted


@pytest.mark.parametrize("planted", ["from .ensemble import AttackBudget\n",
                                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                     "    from .ensemble import AttackBudget\n"])
def test_a_planted_circle_is_found(planted):
    # ensemble imports prediction; prediction importing ensemble back closes a circle, within one layer
    sources = {**SOURCES, "evaluation.prediction": SOURCES["evaluation.prediction"] + planted}
    assert circles(sources) == ["evaluation.ensemble", "evaluation.prediction"]


def test_a_planted_environment_reader_is_found():
    sources = {**SOURCES, "attacks.pgd": SOURCES["attacks.pgd"] + "import os\nSEED = os.environ.get('SEED')\n"}
    assert environment_readers(sources) - READS_ENVIRONMENT == {"attacks.pgd"}
