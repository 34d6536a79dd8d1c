"""examples/notebook.ipynb runs top to bottom in a real Jupyter kernel.

The kernel is the ``python3`` spec of the venv (``.venv/share/jupyter/kernels``,
found because ``sys.prefix`` is on Jupyter's data path); its ``python`` argv
is replaced by ``sys.executable`` by jupyter_client, so the kernel imports
the same nixery_core as the tests.  It inherits this process's environment,
``NIX_CONFIG`` included.  A missing kernel spec fails with
``NoSuchKernel``: run ``python -m ipykernel install --sys-prefix``.
"""

from __future__ import annotations

import base64
from typing import Any

import nbformat
import pytest
from conftest import REPO, require_tools
from nbclient import NotebookClient

NOTEBOOK = REPO / "examples" / "notebook.ipynb"


def outputs(cell: Any) -> list[dict[str, Any]]:
    return [dict(output) for output in cell.get("outputs", [])]


@pytest.mark.nix
def test_notebook_executes_with_rich_outputs() -> None:
    """Every cell runs; builds show progress bars and layer tables (new, then reused); the
    comparison, closure sizes (table and plot) and SBOM query show what they should."""
    require_tools("nix-build", "nix-instantiate", "nix-store", "nix")
    read: Any = nbformat.read  # untyped in nbformat
    notebook = read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=180, kernel_name="python3",
        resources={"metadata": {"path": str(REPO / "examples")}},
    )
    client.execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for cell in code:
        assert not [o for o in outputs(cell) if o["output_type"] == "error"], cell.source

    def html_of(marker: str) -> str:
        cell = next(cell for cell in code if marker in cell.source)
        found = [
            o["data"]["text/html"] for o in outputs(cell)
            if o["output_type"] == "execute_result" and "text/html" in o.get("data", {})
        ]
        assert len(found) == 1, cell.source
        return str(found[0])

    first, second = html_of("hello = builder.build"), html_of("shell = builder.build")
    assert "sha256:" in first
    assert "new" in first
    assert "reused" not in first
    assert "reused" in second
    assert "new" in second
    table = html_of("rows = ")
    assert "<th>packages</th>" in table
    assert "hello" in table

    # The progress bar: each build cell shows tqdm's Jupyter widget.
    build_cell = next(cell for cell in code if "hello = builder.build" in cell.source)
    assert any(
        "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        for o in outputs(build_cell)
    )
    # Comparing the two builds: layers added and reused, with bytes.
    diff = html_of("shell.compare(hello)")
    assert "layers added" in diff
    assert "<td>reused</td>" in diff
    assert "<td>added</td>" in diff
    # Closure sizes by package: the table names the top-level packages.
    sizes = html_of("closure_sizes(shell")
    assert "<th>only this package</th>" in sizes
    assert "hello" in sizes
    assert sizes.count("<tr>") >= 5  # header, several top-level packages, the total

    pngs = [
        base64.b64decode(o["data"]["image/png"])
        for cell in code for o in outputs(cell) if "image/png" in o.get("data", {})
    ]
    assert len(pngs) == 2  # layer sizes, closure sizes
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs)

    def stream(cell: Any) -> str:
        return "".join(o.get("text", "") for o in outputs(cell) if o["output_type"] == "stream")

    again = next(cell for cell in code if "again = builder.build" in cell.source)
    assert stream(again).split() == ["True", "True"]

    # The SBOM query: only the images holding socat have openssl below 3.
    query = next(cell for cell in code if "find_components(sboms" in cell.source)
    sbom_lines = stream(query).splitlines()
    assert [line.split(" (")[0] for line in sbom_lines[:-1]] == [
        "curl/socat: openssl 1.1.1w", "shell/socat: openssl 1.1.1w",
    ]
    assert sbom_lines[-1] == "not affected: shell/curl, shell/hello"
