"""The methods package stays a set of independent modules: no method module imports another method module, except
where its method is a true subclass of the other's (Un-Mix of SwAV). What methods share lives in modules that
define no method (base.py, cluster_base.py, memory_bank_base.py) or outside the package (ops/, losses/, models/).

The imports are read from the source (ast), so an import inside a function counts too.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import clusterlab.methods as methods_package
from clusterlab.methods import METHODS

PACKAGE = "clusterlab.methods"
FOLDER = Path(methods_package.__file__).parent
# Module name (e.g. "swav") -> the registered method classes it defines.
METHOD_MODULES: dict[str, list[type]] = {}
for _cls in METHODS.values():
    METHOD_MODULES.setdefault(_cls.__module__.rsplit(".", 1)[1], []).append(_cls)


def imported_modules(path: Path) -> set[str]:
    """Modules of clusterlab.methods that `path` imports, by their short name (`from .swav import SwAV`,
    `from . import swav`, `import clusterlab.methods.swav`, `from clusterlab.methods.swav import ...`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = PACKAGE + (f".{node.module}" if node.module else "")
            elif node.level == 2 and node.module and node.module.startswith("methods"):
                base = f"clusterlab.{node.module}"
            elif node.level == 0 and node.module:
                base = node.module
            else:
                continue
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                found.add(name[len(PACKAGE) + 1:].split(".")[0])
    return found


def allowed(importer: str, imported: str) -> bool:
    """A method module may import a method module only to subclass a method defined there."""
    if imported not in METHOD_MODULES:
        return True
    bases = METHOD_MODULES[imported]
    return any(issubclass(cls, base) and cls is not base
               for cls in METHOD_MODULES.get(importer, []) for base in bases)


@pytest.mark.parametrize("path", sorted(FOLDER.glob("*.py")), ids=lambda p: p.name)
def test_no_method_module_imports_another_except_its_base_class(path):
    if path.name == "__init__.py":  # the registry imports every method by design
        return
    importer = path.stem
    wrong = sorted(m for m in imported_modules(path) - {importer} if not allowed(importer, m))
    assert not wrong, f"methods/{path.name} imports the method module(s) {wrong}; move what they share into a " \
                      f"base module or ops/"


def test_the_rule_sees_every_method_module_and_allows_only_a_real_subclass():
    """The check would catch a violation: every registered method's module is found, Un-Mix imports SwAV's
    module as a subclass may, and the same import from another module is refused."""
    assert set(METHOD_MODULES) == {inspect.getmodule(cls).__name__.rsplit(".", 1)[1] for cls in METHODS.values()}
    assert "swav" in imported_modules(FOLDER / "unmix.py") and allowed("unmix", "swav")
    assert not allowed("embedul", "superand") and not allowed("superand", "npid")
    assert allowed("superand", "memory_bank_base") and allowed("npid", "base")


def test_imports_are_read_in_every_form(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from .swav import SwAV\nfrom . import npid\nimport clusterlab.methods.sela\n"
                      "from clusterlab.methods.embedul import EmbedUL\nfrom ..methods.superand import SuperAND\n"
                      "def late():\n    from .unmix import UnMix\nfrom .base import Method\nfrom ..ops import knn\n")
    assert imported_modules(source) == {"swav", "npid", "sela", "embedul", "superand", "unmix", "base"}
