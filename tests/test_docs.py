"""The manual and the front page: the docs site builds in strict mode, and every module path that the docs, the README
or a message in the code names still exists (a moved module fails here, not in front of a user)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "storage")
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SOURCES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))

# `stages.data.replay`, `storage.Store`, `pipeline.runs.plots.plot_runs`: a dotted name rooted at one of the packages.
DOTTED = re.compile(r"(?<![\w./-])(?:pipeline|stages|storage)(?:\.[A-Za-z_]\w*)+")
# `stages/data/replay.py`, `stages/methods/gpd/`: a path into the packages (or the other folders the docs point at).
PATH = re.compile(r"(?<![\w./-])(?:pipeline|stages|storage|tests|benchmarks|configs|examples)/[\w./-]*[\w/]")
CODE_SPAN = re.compile(r"``?([^`\n]+?)``?")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".json", ".toml", ".csv", ".png", ".txt")


def _mentions(text: str) -> set[str]:
    found = set()
    for span in CODE_SPAN.findall(FENCE.sub("", text)) + FENCE.findall(text):  # inline code, then code blocks
        found.update(DOTTED.findall(span))
        found.update(PATH.findall(span))
    for line in text.splitlines():
        if line.startswith(":::"):
            found.add(line[3:].strip())
    return found


def _resolves(name: str) -> bool:
    """A path that exists under the repository root, or a dotted module path (then attributes) that imports."""
    if "/" in name or name.endswith(FILE_SUFFIXES):  # a path, or a file named with dots (`pipeline.py`)
        return (ROOT / name.split("::")[0]).exists()
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            obj = importlib.import_module(module)
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


def _unresolved(mentions: dict[str, set[str]]) -> list[str]:
    return sorted(f"{where}: {name}" for where, names in mentions.items() for name in names if not _resolves(name))


def test_the_site_builds_in_strict_mode(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "loader" / "index.html").is_file()


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the detail into docs/"
    tests = [line for line in lines if "-m pytest" in line]
    assert tests and "-m pytest" in tests[0] and "not slow" in tests[1], "the test command first, the fast one below it"


def test_every_module_path_the_docs_name_exists():
    mentions = {str(page.relative_to(ROOT)): _mentions(page.read_text()) for page in PAGES}
    assert sum(len(names) for names in mentions.values()) > 50  # the pattern still finds what the pages name
    missing = _unresolved(mentions)
    assert not missing, "the docs name modules or files that do not exist:\n" + "\n".join(missing)


def _string_mentions(path: Path) -> set[str]:
    """Module paths in a source file's string literals (messages, docstrings, f-string parts); logger names, dotted
    as modules are but names of their own (``getLogger("pipeline.progress")``), are left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    loggers = {
        id(arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "getLogger"
        for arg in node.args
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in loggers:
            found.update(DOTTED.findall(node.value))
            found.update(p for p in PATH.findall(node.value) if p.split("/")[0] in PACKAGES)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_path_the_code_names_exists(package):
    mentions = {str(p.relative_to(ROOT)): _string_mentions(p) for p in SOURCES if p.parts[len(ROOT.parts)] == package}
    missing = _unresolved(mentions)
    assert not missing, "strings in the code name modules or files that do not exist:\n" + "\n".join(missing)
