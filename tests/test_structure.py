"""The package's shape: data flows one way, and no module imports the package ``__init__``."""
import ast
from pathlib import Path

import knnad

PACKAGE = Path(knnad.__file__).parent
#: Each module may import only modules of lower layers (images -> features -> index -> scoring
#: -> detector -> evaluation and reports -> command line).
LAYERS = [
    ["_types", "_checks", "_version", "runtime"],
    ["archive", "preprocessing", "anomaly_map", "metrics", "thresholds", "prediction"],
    ["sources", "decoding", "backbones", "index", "datasets", "plots"],
    ["embedding", "sampling", "scoring", "onnx_detector"],
    ["fusion"],
    ["selection", "options"],
    ["persistence", "export", "scales"],
    ["detector"],
    ["evaluation", "distributed"],
    ["report"],
    ["cli"],
]


def relative_imports(path: Path):
    """Names of the knnad modules ``path`` imports, and whether it imports the package itself."""
    found, imports_package = set(), False
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                imports_package = True  # from . import x
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            imports_package |= any(name and name.split(".")[0] == "knnad" for name in names)
    return found, imports_package


def test_modules_import_only_lower_layers_and_never_the_package():
    layer = {name: level for level, names in enumerate(LAYERS) for name in names}
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(layer) == modules, "every module has a layer"
    for module in modules:
        imported, imports_package = relative_imports(PACKAGE / f"{module}.py")
        assert not imports_package, f"{module} imports the package __init__"
        upward = [name for name in imported if layer[name] >= layer[module] and name != module]
        assert not upward, f"{module} (layer {layer[module]}) imports {upward} of its layer or above"


def test_detector_is_a_short_composition():
    assert len((PACKAGE / "detector.py").read_text().splitlines()) <= 200
