"""A griffe extension for the API reference: knnad's docstrings follow two Sphinx conventions
that Markdown and griffe do not know, and this makes them render.

- Cross-references are Sphinx roles (``:class:`~knnad.thresholds.Thresholds```,
  ``:func:`batches```, ``:data:`OPTIONS```), which Markdown would show as literal text. Each
  becomes a mkdocstrings cross-reference to the full dotted path, shown as code: a public name
  of the package (``knnad.Detector``) goes to the module that defines it, a relative name is
  looked up in the docstring's own object, class and module (an imported name goes to where it
  is defined), then among the package's names defined once. Where the target is not rendered
  in the site (a private helper, ``torch.device``) it stays plain code, as mkdocstrings does
  for the type annotations it cannot resolve.
- Module and class constants are documented by ``#:`` comments above them; each such comment
  becomes the constant's docstring.
- Web links are reStructuredText's ```text <https://...>`_``; each becomes a Markdown link.

Loaded by mkdocs.yml (``plugins: mkdocstrings: handlers: python: options: extensions``); it
reads the source only, like griffe itself: nothing is imported.
"""
from __future__ import annotations

import ast
import html
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|mod|data|attr|exc|obj|const)"
                  r":`(?P<target>[^`]+)`")
#: A reStructuredText hyperlink, ```text <https://...>`_``.
LINK = re.compile(r"`(?P<text>[^`<]+?)\s*<(?P<url>https?://[^>]+)>`__?")


def _public_names(package: Any) -> dict[str, str]:
    """``{"Detector": "knnad.detector.Detector", ...}``: the names that ``knnad/__init__.py``
    serves lazily from ``_NAMES`` (name -> module), read from its source."""
    try:
        tree = ast.parse(Path(package.filepath).read_text(encoding="utf-8"))
        for node in tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) else None)
            if isinstance(target, ast.Name) and target.id == "_NAMES":
                names = ast.literal_eval(node.value)
                return {name: f"{package.path}.{module}.{name}" for name, module in names.items()}
    except (OSError, TypeError, ValueError, SyntaxError):
        pass
    return {}


class SphinxRoles(griffe.Extension):
    """Rewrite ``#:`` comments into docstrings, Sphinx roles into cross-references and
    reStructuredText links into Markdown links."""

    def __init__(self) -> None:
        super().__init__()
        self.public: dict[str, str] = {}
        self.defined: dict[str, list] = defaultdict(list)

    # -- the package's objects -------------------------------------------------------------

    def _walk(self, obj: Any, seen: set):
        if id(obj) in seen or obj.is_alias:
            return
        seen.add(id(obj))
        yield obj
        for member in list(obj.members.values()):
            yield from self._walk(member, seen)

    def _comment_docstring(self, attr: Any, sources: dict[str, list]) -> None:
        """The ``#:`` lines right above ``attr`` as its docstring, where it has none."""
        if attr.docstring is not None or not attr.lineno or attr.filepath is None:
            return
        key = str(attr.filepath)
        if key not in sources:
            try:
                sources[key] = Path(attr.filepath).read_text(encoding="utf-8").splitlines()
            except OSError:
                sources[key] = []
        lines, comment, number = sources[key], [], attr.lineno - 2
        while number >= 0 and lines[number].strip().startswith("#:"):
            comment.insert(0, lines[number].strip()[2:].strip())
            number -= 1
        if comment:
            attr.docstring = griffe.Docstring("\n".join(comment), lineno=number + 2, parent=attr)

    # -- roles -------------------------------------------------------------------------------

    def _identifier(self, target: str, obj: Any) -> str:
        """The full dotted path ``target`` names, seen from the docstring of ``obj``."""
        parts = target.split(".")
        root = obj.package.path
        if parts[0] == root:
            if len(parts) > 1 and parts[1] in self.public:  # knnad.Detector.fit
                return ".".join([self.public[parts[1]], *parts[2:]])
            return target
        scope: Any | None = obj
        while scope is not None:  # the object itself (a class's methods), its class, its module
            member = scope.members.get(parts[0]) if hasattr(scope, "members") else None
            if member is not None:
                path = member.target_path if member.is_alias else member.path
                return ".".join([path, *parts[1:]])
            scope = scope.parent
        candidates = self.defined.get(parts[0], [])
        if len(candidates) == 1:
            return ".".join([candidates[0], *parts[1:]])
        return f"{obj.module.path if not obj.is_module else obj.path}.{target}"

    def _link(self, match: re.Match, obj: Any) -> str:
        target = match["target"].strip()
        shown = target.lstrip("~")
        if target.startswith("~"):
            shown = shown.split(".")[-1]
        identifier = self._identifier(target.lstrip("~"), obj)
        return (f'<autoref identifier="{html.escape(identifier)}" optional>'
                f"<code>{html.escape(shown)}</code></autoref>")

    # -- hooks -------------------------------------------------------------------------------

    def _rewrite(self, package: Any) -> None:
        self.public = _public_names(package)
        objects = list(self._walk(package, set()))
        sources: dict[str, list] = {}
        for obj in objects:
            if obj.is_attribute:
                self._comment_docstring(obj, sources)
            if obj.parent is not None and obj.parent.is_module and not obj.name.startswith("_"):
                self.defined[obj.name].append(obj.path)
        for obj in objects:
            if obj.docstring is not None and ":" in obj.docstring.value:
                text = ROLE.sub(lambda match, obj=obj: self._link(match, obj), obj.docstring.value)
                obj.docstring.value = LINK.sub(r"[\g<text>](\g<url>)", text)

    def on_package_loaded(self, *, pkg: Any, **kwargs: Any) -> None:  # griffe < 1.14
        self._rewrite(pkg)

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:  # griffe >= 1.14
        self._rewrite(pkg)
