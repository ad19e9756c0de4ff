"""Package names loaded on first use (PEP 562's module ``__getattr__``), shared by ``knnad`` and
``knnad.distributed`` so that importing either stays light."""
import importlib
from typing import Any, Callable, Dict, List, Sequence, Tuple


def lazy_names(package: str, namespace: Dict[str, Any], names: Dict[str, str],
               modules: Sequence[str] = ()) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` (its ``__name__``; ``namespace``: its
    ``globals()``): each of ``modules`` is the submodule of that name, each key of ``names`` the
    attribute of that name in the submodule it maps to, imported on first use."""

    def __getattr__(name: str) -> Any:
        if name in modules:
            return importlib.import_module(f".{name}", package)
        if name in names:
            return getattr(importlib.import_module(f".{names[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(modules) | set(names))

    return __getattr__, __dir__
