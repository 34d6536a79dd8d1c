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
    """Every cell runs; builds show as layer tables (new, then reused); the plot is a PNG;
    the SBOM query names the images with openssl below 3."""
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

    html = [
        o["data"]["text/html"]
        for cell in code for o in outputs(cell)
        if o["output_type"] == "execute_result" and "text/html" in o.get("data", {})
    ]
    first, second, table = html
    assert "sha256:" in first
    assert "new" in first
    assert "reused" not in first
    assert "reused" in second
    assert "new" in second
    assert "<th>packages</th>" in table
    assert "hello" in table

    pngs = [
        base64.b64decode(o["data"]["image/png"])
        for cell in code for o in outputs(cell) if "image/png" in o.get("data", {})
    ]
    assert len(pngs) == 1
    assert pngs[0].startswith(b"\x89PNG\r\n\x1a\n")

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
