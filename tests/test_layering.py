"""The structure of `pipeline/`, pinned: the layering of its modules, no import circle, no module over 700 lines.

Every import counts, also one inside a function (`ast` walks the whole module). The layers, bottom up:

    leaves       pipeline.io, logs, errors, stats, tables, strict, dist, layout, models, scoring, checkpoints,
                 implicit, pipeline.data.*
    stages       pipeline.policy < pipeline.reward < pipeline.calibration < pipeline.export < pipeline.align <
                 pipeline.report (each package may import the leaves and the stage packages before it in this
                 order, never one after it; pipeline.export is no stage of the table: it exports a finished
                 run's RMs)
    table        pipeline.stages
    recipe/plan  pipeline.config, config_keys, manifest, plan
    orchestrator pipeline.run
    top          pipeline.sweep, pipeline.__main__ and every pipeline.<stage>.__main__

A module may import modules of its own layer or below, never above. The README's "How the code is laid out"
describes the same layers.

The tests share their machinery through tests/helpers.py, tests/reward_helpers.py and tests/conftest.py only: no
file under tests/ imports a test module (tests/test_*.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


PKG = Path(__file__).resolve().parents[1] / "pipeline"
TESTS = Path(__file__).resolve().parent
SHARED_TEST_MODULES = ("helpers", "reward_helpers", "conftest")  # what a file under tests/ may import from tests
MAX_LINES = 700
LEAVES = (
    "errors",
    "io",
    "logs",
    "stats",
    "tables",
    "strict",
    "dist",
    "layout",
    "models",
    "scoring",
    "checkpoints",
    "implicit",
    "data",
)
STAGE_PACKAGES = ("policy", "reward", "calibration", "export", "align", "report")
RECIPE_LAYER = ("config", "config_keys", "manifest", "plan")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The pipeline modules `name` imports anywhere in its body (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def longest_known(dotted: str) -> str | None:
        while dotted:
            if dotted in known:
                return dotted
            dotted = dotted.rpartition(".")[0]
        return None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            hit = longest_known(t)
            if hit and hit != name:
                found.add(hit)
                break
    return found


def layer(name: str) -> tuple[int, int]:
    """(layer, order within the stage layer) of a pipeline module."""
    parts = name.split(".")
    if name == "pipeline" or (len(parts) > 1 and parts[1] in LEAVES):
        return 0, 0
    if parts[-1] == "__main__" or parts[1] == "sweep":
        return 5, 0
    if parts[1] in STAGE_PACKAGES:
        return 1, STAGE_PACKAGES.index(parts[1])
    if parts[1] == "stages":
        return 2, 0
    if parts[1] in RECIPE_LAYER:
        return 3, 0
    if parts[1] == "run":
        return 4, 0
    raise AssertionError(f"{name} belongs to no layer: add it to the layers of this test and of the README")


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_import_follows_the_layers():
    bad = []
    for name, deps in graph().items():
        here = layer(name)
        for dep in sorted(deps):
            there = layer(dep)
            if there[0] > here[0] or (there[0] == here[0] == 1 and there[1] > here[1]):
                bad.append(f"{name} (layer {here}) imports {dep} (layer {there})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_there_is_no_import_circle():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_longer_than_a_sitting(name):
    lines = modules()[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES}): split it along its responsibilities"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The import walker sees function-level and relative imports; the layer rule refuses an upward one."""
    pkg = tmp_path / "pipeline"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "x.py").write_text("def f():\n    from ..run import main\n    from . import y\n")
    known = {"pipeline.run", "pipeline.data.y", "pipeline.data"}
    assert imports_of("pipeline.data.x", pkg / "data" / "x.py", known) == {"pipeline.run", "pipeline.data.y"}
    assert layer("pipeline.data.x") < layer("pipeline.run")
    assert layer("pipeline.align.stage")[1] > layer("pipeline.reward.stage")[1]
    # the export package reads the RMs and the calibration's temperatures, and nothing of align or report
    assert layer("pipeline.calibration.stage")[1] < layer("pipeline.export.rms")[1] < layer("pipeline.align.stage")[1]
    assert layer("pipeline.export.__main__")[0] == 5


def imported_tests_modules(path: Path, tests_dir: Path = TESTS) -> set[str]:
    """The modules of the tests package that the file at `path` (under tests_dir) imports anywhere in its body:
    `tests.x` for `import tests.x`, `from tests.x import y`, `from tests import x` and a relative `from .x import y`."""
    package = ["tests", *path.parent.relative_to(tests_dir).parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names] if base == "tests" else [base]
        else:
            continue
        found |= {".".join(n.split(".")[:2]) for n in names if n.startswith("tests.")}
    return found


def test_no_test_module_is_imported_by_another_file():
    """Fixtures come from conftest.py, plain helpers from helpers.py / reward_helpers.py: importing a test module
    runs all of its imports, and hides which file the shared code belongs to."""
    allowed = {f"tests.{m}" for m in SHARED_TEST_MODULES}
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        if "fixtures" not in path.relative_to(TESTS).parts:
            bad += [f"{path.relative_to(TESTS)} imports {m}" for m in sorted(imported_tests_modules(path) - allowed)]
    why = "imports of test modules (move what they share to tests/helpers.py or conftest.py):\n"
    assert not bad, why + "\n".join(bad)


def test_the_test_import_check_sees_every_form(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "test_a.py").write_text(
        "import tests.test_b\nfrom tests import reward_helpers as H, test_c\nfrom .test_d import x\n"
        "def f():\n    from tests.test_e import y\n    from . import helpers\n"
    )
    (tmp_path / "scripts" / "s.py").write_text("from tests.conftest import CHATML\nfrom tests.helpers.x import y\n")
    seen = imported_tests_modules(tmp_path / "test_a.py", tmp_path)
    assert seen == {
        "tests.test_b",
        "tests.reward_helpers",
        "tests.test_c",
        "tests.test_d",
        "tests.test_e",
        "tests.helpers",
    }
    assert imported_tests_modules(tmp_path / "scripts" / "s.py", tmp_path) == {"tests.conftest", "tests.helpers"}
