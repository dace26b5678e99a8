"""Every command and code example in README.md and docs/ still works as written, checked without running the study:
each `cliplab` command line parses with the real parser (a line with `...` placeholders: each of its flags exists),
each `pytest -m` names known markers, each `pip install` known extras, each `python benchmarks/...` an existing
script and flags it defines, each Python example compiles and every `cliplab` name and keyword argument it uses
exists; every relative link points to a file."""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest

from cliplab.cli.commands import build_parser

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(language: str) -> list[tuple[str, str]]:
    """(document name, block) for every fenced block of ``language``."""
    return [(path.name, block) for path in DOCUMENTS
            for block in re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)]


def _command_lines() -> list[tuple[str, str]]:
    """Every shell command of the bash blocks: continuations joined, comments and prompts dropped, `&&` split."""
    lines = []
    for name, block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            lines += [(name, part.strip()) for part in line.split("&&") if part.strip()]
    return lines


def _subcommands(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in (parser or build_parser())._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _strict_parser() -> argparse.ArgumentParser:
    """The command line's parser, refusing abbreviated flags: the documents spell every flag out."""
    parser = build_parser()
    for subcommand in _subcommands(parser).values():
        subcommand.allow_abbrev = False
    return parser


def _cliplab_arguments(command: str) -> list[str] | None:
    words = shlex.split(command)
    if words[0] == "cliplab":
        return words[1:]
    if words[0] == "torchrun" and "-m" in words and words[words.index("-m") + 1] == "cliplab":
        return words[words.index("-m") + 2:]
    return None


CLIPLAB_COMMANDS = [(name, command) for name, command in _command_lines() if _cliplab_arguments(command)]


def test_the_documents_show_commands_and_examples():
    assert len(CLIPLAB_COMMANDS) >= 20 and len(_blocks("python")) >= 3


@pytest.mark.parametrize("document, command", CLIPLAB_COMMANDS, ids=[c for _, c in CLIPLAB_COMMANDS])
def test_every_cliplab_command_parses(document, command):
    arguments = _cliplab_arguments(command)
    subcommand = _subcommands()[arguments[0]]
    if "..." in arguments:  # a sketch: its flags must exist
        known = {option for action in subcommand._actions for option in action.option_strings}
        unknown = [word for word in arguments if word.startswith("--") and word.split("=")[0] not in known]
        assert not unknown, f"{document}: {command}: unknown flags {unknown}"
        return
    try:
        _strict_parser().parse_args(arguments)
    except SystemExit as error:
        pytest.fail(f"{document}: `{command}` does not parse (exit {error.code})")


def test_every_other_command_names_what_exists():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(project["project"]["optional-dependencies"])
    markers = {marker.split(":")[0] for marker in project["tool"]["pytest"]["ini_options"]["markers"]}
    for document, command in _command_lines():
        words = shlex.split(command)
        if words[:2] == ["pytest", "-m"]:
            named = set(re.findall(r"\w+", words[2])) - {"not", "and", "or"}
            assert named <= markers, f"{document}: {command}: unknown markers {named - markers}"
        for extra in re.findall(r"\.\[([\w,]+)\]", command):
            assert set(extra.split(",")) <= extras, f"{document}: {command}"
        for script in [w for w in words if w.startswith("benchmarks/")]:
            source = (ROOT / script).read_text()  # FileNotFoundError names a missing one
            flags = [w.split("=")[0] for w in words if w.startswith("--")]
            assert all(f'"{flag}"' in source for flag in flags), f"{document}: {command}: a flag {script} lacks"


PYTHON_EXAMPLES = _blocks("python")


@pytest.mark.parametrize("document, example", PYTHON_EXAMPLES, ids=[f"{d}-{i}" for i, (d, _) in
                                                                     enumerate(PYTHON_EXAMPLES)])
def test_every_python_example_uses_names_that_exist(document, example):
    tree = ast.parse(example)  # a SyntaxError fails the test
    aliases = {"cliplab": importlib.import_module("cliplab")}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cliplab"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                aliases[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cliplab"):
                    aliases[alias.asname or alias.name.split(".")[0]] = importlib.import_module(alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (chain := _chain(node)) and chain[0] in aliases:
            target = aliases[chain[0]]
            for name in chain[1:]:
                assert hasattr(target, name), f"{document}: {'.'.join(chain)}: no {name}"
                target = getattr(target, name)
        if isinstance(node, ast.Call) and (chain := _chain(node.func)) and chain[0] in aliases:
            target = aliases[chain[0]]
            for name in chain[1:]:
                target = getattr(target, name)
            if callable(target) and not inspect.isclass(target) or inspect.isclass(target):
                keywords = {k.arg: None for k in node.keywords if k.arg}
                try:
                    inspect.signature(target).bind_partial(*[None] * len(node.args), **keywords)
                except TypeError as error:
                    pytest.fail(f"{document}: {ast.unparse(node)}: {error}")


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything but names and attributes."""
    names = []
    while isinstance(node, ast.Attribute):
        names.insert(0, node.attr)
        node = node.value
    return [node.id, *names] if isinstance(node, ast.Name) else None


def test_every_relative_link_points_to_a_file():
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


# ------------------------------------------------------------------------------------------ names in the text
# The prose that names code: README, docs/, RESULTS.md, and every docstring and comment of the package and benchmarks.
PROSE = [*DOCUMENTS, ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "cliplab").rglob("*.py")),
         *sorted((ROOT / "benchmarks").glob("*.py"))]
DOTTED = re.compile(r"\bcliplab(?:\.[A-Za-z_]\w*)+")
QUOTED = re.compile(r"``?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\(\))?``?")
PATHS = re.compile(r"[`(]((?:cliplab|docs|tests|benchmarks|notebooks)/[\w./*-]*[\w*])")
# names of other projects that the prose quotes: torch's, open_clip's, pytest's and nbval's
OUTSIDE = {"HF_HOME", "NBVAL_CHECK_OUTPUT", "in_features", "ln_post", "precomputed_convolve_sgemm", "sdpa_kernel",
           "set_sync_debug_mode", "flop_counter", "tmp_path_retention_policy"}


def _resolves(dotted: str) -> bool:
    """``cliplab.a.b``: an attribute or module at every step."""
    parts = dotted.split(".")
    target = importlib.import_module(parts[0])
    for at, part in enumerate(parts[1:], start=2):
        if not hasattr(target, part):
            try:
                target = importlib.import_module(".".join(parts[:at]))
            except ModuleNotFoundError:
                return False
        else:
            target = getattr(target, part)
    return True


def _code_names() -> set[str]:
    """Every name the package and its benchmarks define or use: functions, classes, arguments, attributes,
    keywords, modules, and identifier-like strings (settings, flags' destinations); and the tests' names."""
    names = {node.name for path in (ROOT / "tests").glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef)}
    for path in [*(ROOT / "cliplab").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        names.add(path.stem)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.update(re.findall(r"[A-Za-z_]\w*", node.value))
    return names


def stale_names(text: str, names: set[str]) -> set[str]:
    """What ``text`` names that no longer exists: a ``cliplab.`` path that does not resolve, a quoted snake_case
    name that no code defines or uses, a repository path that is not there. (The README's paragraph of names that
    changed names the old ones on purpose.)"""
    text = re.sub(r"\*\*Names that changed\*\*.*?\n\n", "", text, flags=re.S)
    stale = {dotted for dotted in DOTTED.findall(text) if not _resolves(dotted)}
    for quoted in QUOTED.findall(text):
        last = quoted.split(".")[-1]
        if "_" in last.strip("_") and last not in names and last not in OUTSIDE:
            stale.add(quoted)
    stale.update(path for path in PATHS.findall(text) if not any((ROOT / path).parent.glob(Path(path).name)))
    return stale


@pytest.fixture(scope="module")
def code_names():
    return _code_names()


@pytest.mark.parametrize("path", PROSE, ids=lambda path: str(path.relative_to(ROOT)))
def test_the_prose_names_only_what_exists(path, code_names):
    """README, docs, RESULTS.md, docstrings and comments: every ``cliplab.`` name resolves, every quoted snake_case
    name is one the code has, every repository path is there."""
    assert not stale_names(path.read_text(), code_names), path.relative_to(ROOT)


def test_a_planted_stale_name_is_found(code_names):
    planted = ("``cliplab.runner.thread_environment`` sets the threads; ``write_csv`` writes the table; the weights "
               "are in ``cliplab/weights/shapes-tiny.safetensors``; ``cliplab.pgd`` and ``robustness_vs_eps`` exist.")
    assert stale_names(planted, code_names) == {"cliplab.runner.thread_environment", "write_csv",
                                                "cliplab/weights/shapes-tiny.safetensors"}
