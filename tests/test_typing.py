"""Typing (issue #21): the package is marked typed and ships the marker, and type checkers and
IDEs see the names ``knnad/__init__.py`` loads on first use, without ``import knnad`` loading
them."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import knnad

PACKAGE = Path(knnad.__file__).parent
ROOT = PACKAGE.parent


def type_checking_imports():
    """``{name: module below knnad}`` of the imports under ``if TYPE_CHECKING:`` in
    ``knnad/__init__.py`` (a module imported whole maps to itself)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block, = [node for node in tree.body
              if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"]
    return {alias.name: node.module or alias.name for node in block.body for alias in node.names}


def test_type_checkers_see_every_name_loaded_on_first_use():
    assert type_checking_imports() == {**{name: name for name in knnad._MODULES}, **knnad._NAMES}


def test_import_knnad_loads_neither_torch_nor_its_modules():
    code = ("import sys, knnad; knnad.__version__; loaded = [name for name in ('torch', "
            "'knnad.detector', 'knnad.deploy') if name in sys.modules]; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_package_is_marked_typed_and_ships_the_marker():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert (PACKAGE / "py.typed").is_file()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["knnad"]
