"""A Griffe extension: Sphinx cross-reference roles in docstrings become API links.

The docstrings use Sphinx roles (``:class:`~nixery_core.cache.BuildCache```,
``:func:`build_image```, ``:meth:`Title <pkg.mod.Class.method>```), which
mkdocstrings would print as literal text.  Once a package is loaded, every
role in every docstring is rewritten to an *optional* autorefs reference
around a code span::

    <autoref identifier="nixery_core.cache.BuildCache" optional>`BuildCache`</autoref>

The target is resolved in the scope of the object whose docstring holds it
(its module's imports and members, as Python would: ``Image`` in
``nixery_core.build`` is ``nixery_core.names.Image``); a target that does
not resolve is kept as written.  "Optional" means mkdocs-autorefs links it
when the API reference renders that object and otherwise prints the code
span alone, without a warning, so ``mkdocs build --strict`` holds for
references to objects the site does not document (the registry example,
private helpers).

Display follows Sphinx: ``~a.b.C`` shows ``C``, ``Title <a.b.C>`` shows
``Title``, ``!a.b.C`` shows ``a.b.C`` without a link.  Loaded by
``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

__all__ = ["SphinxRoles", "rewrite_roles"]

#: ``:role:`target``` with an optional ``py:`` domain.
ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|mod|data|attr|exc|obj|const|type):`(?P<target>[^`]+)`"
)
_TITLED = re.compile(r"(?P<title>.*?)\s*<(?P<target>[^<>]+)>", re.DOTALL)
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _resolve(obj: griffe.Object, target: str) -> str:
    """The full path ``target`` names from ``obj``'s scope, or ``target`` itself."""
    head, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            resolved = scope.resolve(head)
        except griffe.NameResolutionError:
            scope = scope.parent
            continue
        return f"{resolved}.{rest}" if rest else resolved
    return target


def rewrite_roles(text: str, obj: griffe.Object) -> str:
    """``text`` with every Sphinx role replaced by an optional autorefs code span."""

    def replace(match: re.Match[str]) -> str:
        target = match["target"].strip()
        titled = _TITLED.fullmatch(target)
        title = None
        if titled is not None:
            title, target = titled["title"], titled["target"].strip()
        link = not target.startswith("!")
        target = target.lstrip("!")
        short = target.startswith("~")
        target = target.lstrip("~").removesuffix("()")
        if title is None:
            title = target.rsplit(".", 1)[-1] if short else target
        code = f"`{title}`"
        if not link or _DOTTED.fullmatch(target) is None:
            return code
        identifier = _resolve(obj, target)
        return f'<autoref identifier="{identifier}" optional>{code}</autoref>'

    return ROLE.sub(replace, text)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and every member defined under it (aliases are documented where they point)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            yield from _objects(member)


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles once a package is fully loaded (so names resolve)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        del kwargs
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite_roles(obj.docstring.value, obj)
