"""The package's shape: data flows one way, and no module imports the ``__init__`` of a package
it is part of."""
import ast
import importlib
from pathlib import Path

import knnad

PACKAGE = Path(knnad.__file__).parent
#: Each module may import only modules of lower layers (images -> features -> index -> scoring
#: -> detector -> evaluation and reports -> command line). Modules of subpackages are named by
#: their dotted path below knnad (``deploy.export``), a subpackage's ``__init__`` by the
#: subpackage's name (``deploy``): it imports its own modules, so it sits above them.
LAYERS = [
    ["_types", "_checks", "_lazy", "_version", "runtime", "decoders"],
    ["archive", "preprocessing", "anomaly_map", "metrics", "thresholds", "prediction"],
    ["sources", "decoding", "backbones", "index", "datasets", "plots"],
    ["embedding", "sampling", "scoring", "deploy.onnx_detector", "distributed.connection"],
    ["fusion", "deploy", "distributed.failures"],
    ["selection", "options", "onnx_detector"],
    ["persistence", "deploy.export", "scales"],
    ["export"],
    ["detector"],
    ["evaluation", "distributed.fitting", "distributed.scorer", "distributed.sharded"],
    ["distributed.predict"],
    ["html_report"],
    ["report", "distributed", "serve.batching", "serve.metrics", "serve.settings"],
    ["serve", "serve.uploads"],
    ["serve.app"],
    ["serve.server"],
    ["cli"],
]
#: The former paths of modules that moved into subpackages, and where they are now.
MOVED = {"export": "deploy.export", "onnx_detector": "deploy.onnx_detector"}


def module_names(package_folder: Path = PACKAGE):
    """Every module of the package by its dotted name below it (its own ``__init__`` left out)."""
    names = []
    for path in package_folder.rglob("*.py"):
        parts = path.relative_to(package_folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names.append(".".join(parts))
    return sorted(names)


def imports(module: str, known: set, package_folder: Path = PACKAGE):
    """The modules of the package ``module`` imports (each with the subpackages Python imports
    on the way to it, but for its own), and whether it imports an ``__init__`` of its own
    packages (the top one included, as ``from . import x`` at the top does)."""
    parts = module.split(".")
    path = package_folder.joinpath(*parts).with_suffix(".py")
    if not path.is_file():
        path = package_folder.joinpath(*parts, "__init__.py")
    home = parts if path.name == "__init__.py" else parts[:-1]  # the subpackage it is in
    own = {".".join(home[:end]) for end in range(len(home) + 1)}  # "": the top package
    found, imports_own_package = set(), False
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level <= len(home) + 1, f"{module}: an import above the package"
            base = home[:len(home) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            named = [".".join(target + [alias.name]) for alias in node.names]
            for name in [".".join(target)] + [name for name in named if name in known]:
                steps = name.split(".")
                found |= {".".join(steps[:end]) for end in range(1, len(steps) + 1)} - own
                imports_own_package |= name in own
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([node.module] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names])
            imports_own_package |= any(name.split(".")[0] == "knnad" for name in names)
    return found, imports_own_package


def test_modules_import_only_lower_layers_and_never_their_own_package():
    layer = {name: level for level, names in enumerate(LAYERS) for name in names}
    modules = module_names()
    assert sorted(layer) == modules, "every module has a layer"
    assert {"deploy", "deploy.export", "distributed", "distributed.predict"} <= set(modules)
    for module in modules:
        imported, imports_own_package = imports(module, set(modules))
        assert not imports_own_package, f"{module} imports the __init__ of its own package"
        unknown = sorted(imported - set(modules))
        assert not unknown, f"{module} imports {unknown}, not modules of knnad"
        upward = sorted(name for name in imported if layer[name] >= layer[module])
        assert not upward, f"{module} (layer {layer[module]}) imports {upward} of its layer or " \
                           f"above"


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The import reading sees through subpackages: what a module imports, the subpackages
    imported on the way, and imports of its own package's ``__init__`` or the top one."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("from .low import x\n")
    (tmp_path / "sub" / "low.py").write_text("from ..top import y\nfrom .. import z\n")
    (tmp_path / "sub" / "peer.py").write_text("from . import low\n")
    (tmp_path / "top.py").write_text("from .sub import low\nfrom .sub.low import x\n")
    known = set(module_names(tmp_path))
    assert known == {"sub", "sub.low", "sub.peer", "top"}
    assert imports("sub", known, tmp_path) == ({"sub.low"}, False)
    assert imports("sub.low", known, tmp_path) == ({"top"}, True)  # from ..: the top __init__
    assert imports("sub.peer", known, tmp_path) == ({"sub.low"}, True)
    assert imports("top", known, tmp_path) == ({"sub", "sub.low"}, False)


def test_former_paths_give_the_same_objects():
    for old, new in MOVED.items():
        former = importlib.import_module(f"knnad.{old}")
        current = importlib.import_module(f"knnad.{new}")
        assert former.__all__ and all(getattr(former, name) is getattr(current, name)
                                      for name in former.__all__)
    assert knnad.OnnxDetector is knnad.onnx_detector.OnnxDetector is knnad.deploy.OnnxDetector


def test_distributed_keeps_its_public_names():
    distributed = importlib.import_module("knnad.distributed")
    assert sorted(distributed.__all__) == [
        "CONNECT_TIMEOUT_S", "MANIFEST", "MAPS_FOLDER", "MAX_RETRIES", "RAY_EXTRA", "ShardedIndex",
        "connect", "fit_many", "import_ray", "predict_dataset", "shard_detector"]
    assert all(hasattr(distributed, name) for name in distributed.__all__)
    assert distributed.fit_many.__module__ == "knnad.distributed.fitting"


def code_lines(path: Path) -> int:
    """Lines of ``path`` that hold code: not blank, not a comment, not part of a docstring or an
    import (what the 100-column wrapping of messages and imports adds is no logic)."""
    source = path.read_text()
    tree = ast.parse(source)
    prose = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            prose |= set(range(node.lineno, node.end_lineno + 1))
        elif (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
              and ast.get_docstring(node) is not None):
            prose |= set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return sum(1 for number, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and number not in prose)


def test_detector_is_a_short_composition():
    # The parts' work lives in their modules: the detector only composes them.
    assert code_lines(PACKAGE / "detector.py") <= 150
