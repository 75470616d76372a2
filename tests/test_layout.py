"""The house rules of docs/architecture.md: imports flow one way, and no file grows past
400 lines."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    "mlsae": 0,
    "mlsae.cli": 1,
    "mlsae.names": 1,
    "mlsae.files": 1,
    "mlsae.types": 1,
    "mlsae.utils": 1,
    "mlsae.sparse": 1,
    "mlsae.metrics": 1,
    "mlsae.lm": 2,
    "mlsae.model": 3,
    "mlsae.saes": 3.5,
    "mlsae.trainer": 4,
    "mlsae.analysis": 4,
    "mlsae.explorer": 5,
    "mlsae.api": 5,
    "figures": 5,
}
"""The layer of each package: a module imports from its own layer and those below."""

SIDE_BY_SIDE = {("mlsae.trainer", "mlsae.analysis"), ("mlsae.analysis", "mlsae.trainer")}


def package_of(module: str) -> str:
    parts = module.split(".")
    for length in (2, 1):
        name = ".".join(parts[:length])
        if name in LAYERS:
            return name
    raise KeyError(module)


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in [*ROOT.glob("mlsae/**/*.py"), *ROOT.glob("figures/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found.append((name, path))
    return sorted(found)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] in ("mlsae", "figures")}


@pytest.mark.parametrize(("module", "path"), modules(), ids=lambda value: str(value))
def test_imports_flow_one_way(module, path):
    own = package_of(module)
    for target in imported(path):
        theirs = package_of(target)
        assert (own, theirs) not in SIDE_BY_SIDE, f"{module} imports {target}"
        assert LAYERS[theirs] <= LAYERS[own], f"{module} (layer {LAYERS[own]}) imports {target}"
        if own == "mlsae.cli":
            assert theirs == own, f"mlsae.cli imports {target}"
        if own == "mlsae.metrics":
            assert theirs in ("mlsae.metrics", "mlsae.types"), f"{module} imports {target}"


def test_no_python_file_over_400_lines():
    checked = [
        *ROOT.glob("mlsae/**/*.py"),
        *ROOT.glob("figures/*.py"),
        *ROOT.glob("bench/*.py"),
        *ROOT.glob("scripts/*.py"),
        *ROOT.glob("*.py"),
    ]
    long = {
        str(p.relative_to(ROOT)): n for p in checked if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long


def test_every_package_is_a_regular_package():
    """setuptools installs only folders with an `__init__.py`."""
    folders = {path.parent for path in ROOT.glob("mlsae/**/*.py")}
    assert not [str(f) for f in folders if not (f / "__init__.py").is_file()]
