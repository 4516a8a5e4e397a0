"""Rules over the source itself, checked with the standard library only (no linter to install).

- The dependency rule (docs: DESIGN.md "Packages"), read from every import statement in every module,
  those inside functions included, and every `importlib.import_module("...")` with a literal name:
  `codec` and `kernels` import nothing of ours; `kvstore` imports only `codec`; `blend` imports `kernels`,
  `kvstore`, `codec`; `connectors` and `examples` import no `benchmarks` and no `tests`; only `benchmarks`
  and `tests` import `benchmarks`, and only `tests` imports `tests`.
- Every module compiles, and every global name a function, class or module body reads is defined in
  that module or is a builtin. A kernel that numba compiles only on a GPU (`codec.cuda_decode`) fails on
  its first call there if it reads an undefined global, and no CPU test executes it: this check is what
  catches such a bug here.
"""

from __future__ import annotations

import ast
import builtins
import symtable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("kvstore", "codec", "blend", "kernels", "connectors")
CHECKED = PRODUCT + ("benchmarks", "tests", "examples")
# Names every module has without defining them.
_IMPLICIT = set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__loader__", "__package__",
                                  "__path__", "__builtins__", "__annotations__", "__dict__", "__module__",
                                  "__qualname__", "__class__"}


def python_files(packages=CHECKED) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def undefined_globals(source: str, filename: str = "<source>") -> list[tuple[str, str]]:
    """(scope, name) for each global name read in `source` that the module never binds and that is not a
    builtin. Raises SyntaxError for code that does not compile."""
    top = symtable.symtable(source, filename, "exec")
    symbols = top.get_symbols()
    if any(s.get_name() == "*" for s in symbols):  # a star import binds names this check cannot see
        return []
    bound = {s.get_name() for s in symbols if s.is_assigned() or s.is_imported() or s.is_namespace()}
    found = []

    def walk(table: symtable.SymbolTable) -> None:
        for s in table.get_symbols():
            name = s.get_name()
            reads_global = s.is_referenced() and (s.is_global() if table.get_type() != "module" else True)
            if reads_global and name not in bound and name not in _IMPLICIT:
                found.append((table.get_name(), name))
        for child in table.get_children():
            walk(child)

    walk(top)
    return found


def test_the_check_finds_an_undefined_global_in_a_kernel():
    src = "from numba import cuda\nOK = 0\n@cuda.jit\ndef k(status):\n    status[0] = BAD_STATE if OK else OK\n"
    assert undefined_globals(src) == [("k", "BAD_STATE")]
    assert undefined_globals("import os\ndef f():\n    return os.sep, len\n") == []


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_undefined_global_names(path):
    assert undefined_globals(path.read_text(), str(path)) == []


# -- the dependency rule -----------------------------------------------------------------------------

OURS = {"kvstore", "codec", "blend", "kernels", "connectors", "benchmarks", "tests", "examples"}
MAY_IMPORT = {
    "codec": {"codec"},
    "kernels": {"kernels"},
    "kvstore": {"kvstore", "codec"},
    "blend": {"blend", "kernels", "kvstore", "codec"},
    "connectors": {"connectors", "blend", "kernels", "kvstore", "codec"},
    "examples": {"connectors", "blend", "kernels", "kvstore", "codec"},
    "benchmarks": OURS - {"tests", "examples"},
    "tests": OURS - {"examples"},
}


def imported_packages(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, top-level package) of every import in `source` (relative imports: the module's own package,
    reported as "."), and of `importlib.import_module` / `__import__` calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." if node.level else node.module.split(".")[0]))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def test_the_import_check_sees_lazy_and_dynamic_imports():
    src = "def f():\n    from connectors.demo import run\n    import importlib\n    importlib.import_module('benchmarks.x')\n"
    assert imported_packages(src) == [(2, "connectors"), (3, "importlib"), (4, "benchmarks")]


@pytest.mark.parametrize("path", python_files(tuple(MAY_IMPORT)), ids=lambda p: str(p.relative_to(REPO)))
def test_dependency_rule(path):
    package = path.relative_to(REPO).parts[0]
    allowed = MAY_IMPORT[package]
    bad = [(line, name) for line, name in imported_packages(path.read_text(), str(path))
           if name in OURS and name not in allowed]
    assert bad == [], f"{package} may import only {sorted(allowed)} of ours"
