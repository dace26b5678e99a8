"""Versions have two homes: ranges in pyproject.toml and exact pins in .ci/constraints.txt; environment.yml and
the README's commands only name those. These tests keep the three in agreement, so the documented installs
(`.[notebooks]`, `.[notebooks,test]`, conda) resolve with the pins instead of failing or searching for minutes."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    project = _project()
    extras = [req for group in project["optional-dependencies"].values() for req in group]
    return [Requirement(text) for text in [*project["dependencies"], *extras]]


def test_every_requirement_is_pinned_within_its_range():
    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} has no pin in .ci/constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"pin {name}=={pins[name]} is outside {requirement}"


def test_the_reference_attacks_are_pinned_and_documented():
    """torchattacks (the tests' and benchmarks' reference) pins requests~=2.25.1, which JupyterLab's server cannot
    share (Harry24k/adversarial-attacks-pytorch#205), so it is installed with --no-deps, and pinned like the rest."""
    assert "torchattacks" in _pins()
    assert all(canonicalize_name(r.name) != "torchattacks" for r in _requirements())
    assert 'pip install --no-deps "torchattacks>=3.5"' in _readme_test_command()


def test_clip_benchmark_is_pinned_and_installed_without_its_dependencies():
    """CLIP_benchmark carries the zero-shot suite's class names and prompts (two JSON files); its own dependencies
    (transformers, pycocoevalcap, webdataset, ...) are for its evaluation scripts, which cliplab does not run."""
    assert "clip-benchmark" in _pins()
    assert 'pip install --no-deps "torchattacks>=3.5" "clip-benchmark>=1.6"' in _readme_test_command()


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install -e \"\.\[notebooks,test,benchmark\]\".*?)\n```", readme)
    assert len(commands) == 1, "the README shows one test command"
    return commands[0]


def test_ci_runs_the_readme_test_command():
    assert _readme_test_command() in (ROOT / ".ci" / "run").read_text().splitlines()


def test_environment_yml_installs_the_extras_under_the_pins():
    text = (ROOT / "environment.yml").read_text()
    pip_lines = re.findall(r"^ {6}- (.+)$", text, flags=re.M)
    assert pip_lines == ["-c .ci/constraints.txt", "-e .[notebooks,test]"], "no versions of its own"
    python = re.search(r"^  - python=([\d.]+)$", text, flags=re.M).group(1)
    assert Requirement(f"python{_project()['requires-python']}").specifier.contains(python + ".0")


def test_import_cliplab_needs_no_notebook_packages():
    """The library is the core install; the notebook machinery is the `notebooks` extra."""
    from cliplab.cli.reproduce import NOTEBOOK_MODULES

    core = {canonicalize_name(Requirement(text).name) for text in _project()["dependencies"]}
    assert not core & {canonicalize_name(m) for m in NOTEBOOK_MODULES}
    loaded = subprocess.run([sys.executable, "-c", "import sys, cliplab, cliplab.cli; print(sorted(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout
    assert not [m for m in NOTEBOOK_MODULES if f"'{m}'" in loaded]


@pytest.mark.slow
def test_the_wheel_holds_every_module_the_weights_and_the_model_config(tmp_path):
    """A non-editable install gets every subpackage and the data files the shapes model needs."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("cliplab-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = set(archive.namelist())
    package = ROOT / "cliplab"
    expected = {path.relative_to(ROOT).as_posix() for pattern in ("**/*.py", "weights/*.safetensors",
                                                                   "model_configs/*.json")
                for path in package.glob(pattern) if "__pycache__" not in path.parts}
    assert expected - packed == set()
