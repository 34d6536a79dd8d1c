"""Every ```python block of docs/*.md and README.md runs; the site builds with --strict.

How blocks run (stated for readers in docs/index.md, "About the examples"):

- the blocks of one page run in order, in one namespace, in a fresh Python
  process, as if typed into one session; a page's later blocks may use
  names its earlier blocks defined;
- the working directory is an empty temporary directory holding a ``nix``
  link to the repository's ``nix/``, and the repository is on
  ``PYTHONPATH``: examples read as if run from a checkout
  (``LocalPathSource("nix/offline")``, ``import examples.registry``) and
  whatever they write with relative paths lands in the temporary directory;
  ``XDG_CACHE_HOME`` points there too, so default stores do;
- ``NIX_CONFIG`` is the test session's (no binary cache);
- a block whose preceding non-blank line is ``<!-- no-test -->`` is not run
  (it needs what a test machine lacks: a remote registry, credentials,
  the network), but it must still compile;
- a failure's traceback names the Markdown file and line.

``sh`` and other blocks are not run here; the commands they show are run
by the tests named next to them in the text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
from conftest import REPO, require_tools

NO_TEST = "<!-- no-test -->"
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")

#: Runs one page's blocks; argv[1] is a JSON list of {"file", "line", "code"}.
DRIVER = """
import json, sys
namespace = {"__name__": "__main__"}
with open(sys.argv[1], encoding="utf-8") as handle:
    blocks = json.load(handle)
for block in blocks:
    # Padding keeps line numbers: tracebacks point into the Markdown file.
    source = "\\n" * (block["line"] - 1) + block["code"]
    exec(compile(source, block["file"], "exec"), namespace)
"""


@attrs.frozen
class Block:
    """One fenced code block: where it starts (the first code line) and its text."""

    path: Path
    line: int
    language: str
    code: str
    skipped: bool


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, dedented to their fence's indent."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        language = (match["info"].split() or [""])[0].lower()
        previous = next((ln.strip() for ln in reversed(lines[:index]) if ln.strip()), "")
        body: list[str] = []
        index += 1
        start = index + 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][indent:] if lines[index][:indent].isspace() else lines[index])
            index += 1
        index += 1
        found.append(Block(path, start, language, "\n".join(body) + "\n", previous == NO_TEST))
    return found


def pages() -> list[Path]:
    return [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]


def python_blocks(path: Path) -> list[Block]:
    return [b for b in blocks_of(path) if b.language in ("python", "py")]


RUNNABLE = [p for p in pages() if any(not b.skipped for b in python_blocks(p))]


def test_block_parser_sees_fences_markers_and_lines(tmp_path: Path) -> None:
    """The parser finds python blocks, their first line, indented fences and no-test markers."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- no-test -->\n\n```py\nraise SystemExit\n```\n"
        "- item\n\n    ```python\n    y = x + 1\n    ```\n```sh\nls\n```\n",
        encoding="utf-8",
    )
    found = python_blocks(page)
    assert [(b.line, b.code, b.skipped) for b in found] == [
        (4, "x = 1\n", False), (10, "raise SystemExit\n", True), (15, "y = x + 1\n", False),
    ]


@pytest.mark.parametrize("path", pages(), ids=lambda p: p.name)
def test_every_block_compiles(path: Path) -> None:
    """Every python block compiles, skipped ones included."""
    for block in python_blocks(path):
        compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")


@pytest.mark.nix
@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_page_examples_run(path: Path, tmp_path: Path) -> None:
    """The page's python blocks run in order in one fresh process, as documented above."""
    require_tools("nix-build", "nix-instantiate", "nix-store", "nix")
    blocks = [
        {"file": str(b.path), "line": b.line, "code": b.code}
        for b in python_blocks(path) if not b.skipped
    ]
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "nix").symlink_to(REPO / "nix")
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(blocks), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
    }
    env.pop("NIXERY_CORE_STORE", None)
    completed = subprocess.run(
        [sys.executable, "-c", DRIVER, str(spec)], cwd=work, env=env, capture_output=True,
        text=True, timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-6000:] + completed.stdout[-2000:]


def test_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs builds the site, API reference included, with warnings as errors."""
    start = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    assert "build_image" in (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    print(f"mkdocs build took {time.monotonic() - start:.1f}s")
