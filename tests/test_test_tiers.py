"""The rules of the test suite itself, checked from the source: test modules share code through conftest.py
fixtures and helper modules only (never by importing each other or a conftest), and every marker a test uses,
and every marker `make test-fast` deselects, is registered in pyproject.toml."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
TESTS = ROOT / "tests"
TEST_MODULES = sorted(TESTS.rglob("test_*.py"))
# an object path into a test module or a conftest, as load_environment and the recipes' `environment=` take
DOTTED_TEST_MODULE = re.compile(r"\b(tests(?:\.\w+)*\.(?:test_\w+|conftest)):\w+")


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def is_test_module(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return name.startswith("tests.") and (last.startswith("test_") or last == "conftest")


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` imports (at any depth, relative imports resolved), each `from X import y` as both
    X and X.y (y may be a submodule), and the modules of the `module:object` paths in its string constants."""
    package = module_name(path, root).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package[: len(package) - node.level + 1] if node.level else []  # `from ..x import y`
            base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(DOTTED_TEST_MODULE.findall(node.value))
    return found


def test_no_test_module_imports_another_test_module_or_a_conftest():
    assert len(TEST_MODULES) > 20  # the walk found the suite
    offenders = {}
    for path in TEST_MODULES:
        own = module_name(path)
        bad = sorted(m for m in imported_modules(path) if is_test_module(m) and m != own)
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, ("move what they share to a conftest.py fixture or a helper module (tests/toy.py, "
                           f"tests/policies/helpers.py): {offenders}")


def test_the_import_check_sees_each_way_of_importing(tmp_path):
    # A stand-in for tests/policies/test_a.py; each line is one way to reach another test module or a conftest
    # (the object path is split in two so that this file's own scan does not count it).
    (tmp_path / "tests" / "policies").mkdir(parents=True)
    probe = tmp_path / "tests" / "policies" / "test_a.py"
    probe.write_text("from tests.policies.test_rules import SHAPE\nfrom . import test_generate\n"
                     "def f():\n    from ..conftest import SMALL\n    import tests.homepage.test_world\n"
                     "ENV = 'environment=tests.recipes.test_foreign_dataset" + ":FamilySafeShare'\n"
                     "from tests.policies.helpers import walk\nfrom tests.toy import toy_tokenizer\n")
    found = {m for m in imported_modules(probe, root=tmp_path) if is_test_module(m)}
    assert found == {"tests.policies.test_rules", "tests.policies.test_generate", "tests.conftest",
                     "tests.homepage.test_world", "tests.recipes.test_foreign_dataset"}


def markers_used(path: Path) -> set[str]:
    """Names X of every `pytest.mark.X` in `path` (decorators, `pytestmark`, `pytest.param(marks=...)`)."""
    return {node.attr for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "pytest"}


def registered_markers(pytestconfig) -> set[str]:
    # pyproject's markers plus pytest's own and its plugins' (parametrize, skipif, timeout, ...)
    return {re.split(r"[:(]", line, maxsplit=1)[0].strip() for line in pytestconfig.getini("markers")}


def test_every_marker_used_is_registered(pytestconfig):
    registered = registered_markers(pytestconfig)
    assert {"engine", "ray", "recipe", "timeout", "parametrize"} <= registered
    used = {m: str(p.relative_to(ROOT)) for p in sorted(TESTS.rglob("*.py")) for m in markers_used(p)}
    assert {"engine", "ray", "recipe", "timeout"} <= set(used)  # the scan sees the tier marks
    unknown = {m: where for m, where in used.items() if m not in registered}
    assert not unknown, f"register these markers in pyproject.toml's [tool.pytest.ini_options] markers: {unknown}"


def test_the_fast_tier_deselects_registered_markers_only(pytestconfig):
    recipe = re.search(r"^test-fast:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "the Makefile has a test-fast target"
    expression = re.search(r'-m "([^"]+)"', recipe.group(1)).group(1)
    names = set(re.findall(r"\w+", expression)) - {"not", "and", "or"}
    assert names == {"engine", "ray", "recipe"} and names <= registered_markers(pytestconfig)
