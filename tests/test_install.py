"""A plain ``pip install .`` (no extras) writes the same bytes as the development install.

The encoders decide the layer bytes, so they must come with every install:
two registry instances sharing a bucket have to agree on every digest.  The
test makes a fresh virtual environment (no system site-packages, so nothing
the development venv has can hide a missing dependency), installs this
checkout into it with pip from the package index (pip's wheel cache makes
repeats quick), builds the same images in both interpreters and compares
every blob digest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import IN_CI, REPO

pytestmark = pytest.mark.slow

#: Builds shell/hello (gzip, zstd, estargz, zstd-chunked) with FakeNix into a fresh store and
#: prints the blob digests, plus what the interpreter imported.
_BUILD = r"""
import json, sys, tempfile
from pathlib import Path
import nixery_core
from nixery_core import ArchiveOptions, Image, build_image
from nixery_core.testing import FakeNix, FixedSource, default_fake_packages
from nixery_core.testing.storage import MemoryStore

google_on_import = any(name.startswith("google.cloud") for name in sys.modules)
out = {"google_on_import": google_on_import, "where": nixery_core.__file__, "builds": {}}
for compression in ("gzip", "zstd", "estargz", "zstd-chunked"):
    with tempfile.TemporaryDirectory() as tmp:
        fake = FakeNix(Path(tmp) / "root", default_fake_packages())
        store = MemoryStore()
        result = build_image(
            Image.from_name("shell/hello"), FixedSource(), runner=fake, uploader=store,
            store_root=fake.store_root, archive=ArchiveOptions(compression=compression),
            max_workers=1,
        )
        out["builds"][compression] = {
            "manifest": result.manifest_digest,
            "blobs": sorted(info.digest for info in store.list_blobs()),
        }
from nixery_core.storage.gcs import GcsStore
out["gcs_store"] = GcsStore.__name__
print(json.dumps(out))
"""


def _run(python: str | Path, cwd: Path, pythonpath: Path | None = None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [str(python), "-c", _BUILD],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_plain_install_gives_the_same_blobs(tmp_path: Path) -> None:
    """`pip install .` without extras builds byte-identical blobs and a working GcsStore."""
    if shutil.which("git") is None:  # pragma: no cover - environment
        (pytest.fail if IN_CI else pytest.skip)("git is needed to list the checkout's files")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Install a copy of the tracked files, so no build artefacts of the checkout leak in.
    source = tmp_path / "source"
    source.mkdir()
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            (source / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, source / os.fsdecode(name))
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    fresh = _run(python, work)
    here = _run(sys.executable, work, pythonpath=REPO)
    assert str(fresh["where"]).startswith(str(env_dir)), fresh["where"]
    assert fresh["builds"] == here["builds"]
    assert fresh["gcs_store"] == "GcsStore"
    assert fresh["google_on_import"] is False
