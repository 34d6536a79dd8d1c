"""The test-harness example (examples/test_harness) passes as its own suite, without Nix."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import REPO

HARNESS = REPO / "examples" / "test_harness"


def test_harness_suite_passes_without_nix(tmp_path: Path) -> None:
    """Every test function of the harness runs and passes with no Nix on PATH."""
    report = tmp_path / "junit.xml"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no nix-build reachable
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", str(HARNESS), "-q", "-p", "no:cacheprovider",
         f"--junitxml={report}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    suite = ET.parse(report).getroot().find("testsuite")  # noqa: S314 - our own report
    assert suite is not None
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("0", "0", "0")
    ran = {case.get("name", "").split("[")[0] for case in suite.iter("testcase")}
    tree = ast.parse((HARNESS / "test_publisher.py").read_text(encoding="utf-8"))
    defined = {
        node.name for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }
    assert defined
    assert ran == defined
