"""The floors of the code: ``pipeline`` (commands, Ray) over ``stages`` (data, teachers, methods, training) over
``storage`` (stores, locations, records). A module imports only from its own floor or the ones below, and only
``pipeline`` imports Ray, so the library runs without a cluster and a store is readable without torch's training code.
Every import counts, those inside functions too (read from the source, not from what happens to be loaded)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ("storage", "stages", "pipeline")  # lowest first


def _imports(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports (relative imports are its own package's)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("floor", FLOORS)
def test_a_floor_imports_nothing_from_the_floors_above_it(floor):
    above = set(FLOORS[FLOORS.index(floor) + 1 :])
    found = {
        f"{path.relative_to(ROOT)} imports {', '.join(sorted(_imports(path) & above))}"
        for path in (ROOT / floor).rglob("*.py")
        if _imports(path) & above
    }
    assert not found, sorted(found)


def test_only_the_pipeline_imports_ray():
    found = sorted(
        str(path.relative_to(ROOT))
        for floor in ("storage", "stages")
        for path in (ROOT / floor).rglob("*.py")
        if "ray" in _imports(path)
    )
    assert not found, found


def test_the_floors_test_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.cli import main\n    import ray.train\n")
    assert _imports(module) == {"pipeline", "ray"}
