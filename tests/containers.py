"""Run programs from images we built, with real umoci and runc."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from conftest import require_root, require_tools


def unpack(layout: Path, ref: str, bundle: Path) -> Path:
    """``umoci unpack`` an OCI layout's ``ref`` into ``bundle``; returns the bundle."""
    require_tools("umoci", "runc")
    require_root("umoci unpack (not rootless) and runc")
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{ref}", str(bundle)],
        check=True, capture_output=True, timeout=120,
    )
    return bundle


def run_in_bundle(
    bundle: Path, args: Sequence[str], *, state: Path, env: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in the unpacked bundle with runc (no terminal); the image's user and Env.

    The image config's Env and User come from umoci's generated config.json.
    """
    spec_path = bundle / "config.json"
    spec = json.loads(spec_path.read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = list(args)
    spec["process"]["env"] = [*spec["process"].get("env", []), *env]
    spec_path.write_text(json.dumps(spec))
    return subprocess.run(
        ["runc", "--root", str(state), "run", f"nixery-test-{uuid.uuid4().hex[:12]}"],
        cwd=bundle, capture_output=True, text=True, timeout=60, check=False,
        stdin=subprocess.DEVNULL,
    )
