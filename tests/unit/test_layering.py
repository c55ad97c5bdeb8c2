"""The functional core imports only the standard library (and ``conflict`` may use ``domain``).

``lint-imports`` checks the layers and a list of forbidden frameworks; this test closes the list:
any import in ``domain/`` or ``conflict/`` that is neither standard library nor allowed fails,
whatever the package is called.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "domain": {"domain"},
    "conflict": {"conflict", "domain"},
}


def _imported_top_levels(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_the_core_packages_import_only_the_standard_library_and_their_allowed_layers(
    package: str,
) -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imported_top_levels(path)
        if name not in stdlib and name not in ALLOWED[package]
    }
    assert not offenders, sorted(offenders)


def test_the_check_sees_a_third_party_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom attrs import define\nfrom . import sibling\n")
    assert _imported_top_levels(module) == {"os", "attrs"}
