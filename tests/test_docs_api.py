"""The API reference: Sphinx roles in docstrings become links (docs/hooks/sphinx_roles.py)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import griffe
from conftest import REPO

EXTENSION = REPO / "docs" / "hooks" / "sphinx_roles.py"


def load_hook() -> ModuleType:
    """The extension module, imported from its file as mkdocs imports it."""
    spec = importlib.util.spec_from_file_location("sphinx_roles", EXTENSION)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PACKAGE = {
    "__init__.py": (
        '"""See :class:`~pkg.things.Thing`, :func:`helper`, :meth:`Going <pkg.things.Thing.go>`,\n'
        ':class:`!pkg.things.Thing`, :mod:`pkg.things`, :py:class:`Thing`, :class:`Missing`,\n'
        ':func:`helper()` and :class:`not a name`; :param x: stays."""\n'
        "from pkg.things import Thing\n\n\n"
        'def helper() -> None:\n    """Uses :meth:`Thing.go`."""\n'
    ),
    "things.py": (
        "class Thing:\n"
        '    """A thing: :meth:`go`, :class:`Thing`."""\n\n'
        '    def go(self) -> None:\n        """Go."""\n'
    ),
}


def ref(identifier: str, title: str) -> str:
    return f'<autoref identifier="{identifier}" optional>`{title}`</autoref>'


def test_roles_become_optional_autorefs_resolved_in_scope() -> None:
    """Each role becomes an optional autoref to what its scope resolves, displayed as in Sphinx."""
    extensions = griffe.load_extensions(f"{EXTENSION}:SphinxRoles")
    with griffe.temporary_visited_package("pkg", PACKAGE, extensions=extensions) as pkg:
        top = pkg.docstring
        helper, thing = (pkg[path].docstring for path in ("helper", "things.Thing"))
        assert top is not None
        assert helper is not None
        assert thing is not None
        assert top.value == (
            f"See {ref('pkg.things.Thing', 'Thing')}, {ref('pkg.helper', 'helper')}, "
            f"{ref('pkg.things.Thing.go', 'Going')},\n"
            f"`pkg.things.Thing`, {ref('pkg.things', 'pkg.things')}, "
            f"{ref('pkg.things.Thing', 'Thing')}, {ref('Missing', 'Missing')},\n"
            f"{ref('pkg.helper', 'helper')} and `not a name`; :param x: stays."
        )
        assert helper.value == f"Uses {ref('pkg.things.Thing.go', 'Thing.go')}."
        assert thing.value == (
            f"A thing: {ref('pkg.things.Thing.go', 'go')}, {ref('pkg.things.Thing', 'Thing')}."
        )


def test_role_free_text_is_unchanged() -> None:
    """Text without roles (Markdown code, reST literals, field lists) is left alone."""
    hook = load_hook()
    with griffe.temporary_visited_package("pkg", PACKAGE) as pkg:
        for text in ("plain `code` and ``literal``", ":raises ValueError: when", ":class: alone"):
            assert hook.rewrite_roles(text, pkg) == text


def test_api_page_links_roles(tmp_path: Path) -> None:
    """The built API page has no literal roles left and links them to the documented objects."""
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    html = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert re.findall(r":(?:class|func|meth|mod|data|attr|exc):", html) == []
    assert "&lt;autoref" not in html
    links = re.findall(r'class="autorefs autorefs-internal"[^>]*href="#([\w.]+)"', html)
    assert "nixery_core.cache.BuildCache" in links
    assert "nixery_core.build.build_image" in links
    assert all(f'id="{target}"' in html for target in set(links))
