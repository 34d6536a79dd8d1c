"""Notebook helpers: comparing builds, closure sizes by package, a progress bar per build."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from nixery_core.builder import Builder
from nixery_core.cache import BuildCache
from nixery_core.names import Image
from nixery_core.notebook import closure_sizes, progress_bar
from nixery_core.results import BuildResult
from nixery_core.testing.runners import FakeFile, FakeNix, FakePackage, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore


@pytest.fixture
def fake(tmp_path: Path) -> FakeNix:
    packages = default_fake_packages()
    packages["libbig"] = FakePackage({"lib/libbig.so": FakeFile(b"\x7fELF" + bytes(200_000))})
    packages["tool"] = FakePackage({"bin/tool": FakeFile(b"#!tool", executable=True)},
                                   ("libbig", "busybox"))
    packages["other"] = FakePackage({"bin/other": FakeFile(b"#!other", executable=True)},
                                    ("libbig",))
    return FakeNix(tmp_path / "root", packages)


def _build(fake: FakeNix, builder: Builder, *packages: str) -> BuildResult:
    del fake
    return builder.build(Image.from_packages(packages, always_added=()), FixedSource())


def test_comparing_builds_counts_layers_and_bytes(fake: FakeNix, tmp_path: Path) -> None:
    """Adding a package: its layers are added, the old ones reused; bytes add up."""
    with BuildCache(tmp_path / "cache") as cache, Builder(
        runner=fake, uploader=MemoryStore(), cache=cache, store_root=fake.store_root
    ) as builder:
        old = _build(fake, builder, "hello")
        new = _build(fake, builder, "hello", "tool")
    diff = new.compare(old)
    assert diff.added
    assert diff.reused
    assert {x.digest for x in diff.added} | {x.digest for x in diff.reused} == {
        x.digest for x in new.layers
    }
    assert {x.digest for x in diff.removed} == {x.digest for x in old.layers} - {
        x.digest for x in new.layers
    }
    assert diff.bytes_added + diff.bytes_reused == sum(x.size for x in new.layers)
    assert 0 < diff.reused_fraction < 1
    assert "layers added" in str(diff)
    assert "<table>" in diff._repr_html_()
    same = new.compare(new)
    assert (same.added, same.removed, same.reused_fraction) == ((), (), 1.0)


def test_closure_sizes_show_what_makes_an_image_big(fake: FakeNix) -> None:
    """Top-level packages by closure; a dependency two packages share is nobody's alone."""
    with Builder(runner=fake, uploader=MemoryStore(), store_root=fake.store_root) as builder:
        result = _build(fake, builder, "tool", "other", "hello")
    sizes = closure_sizes(result, runner=fake)
    names = [p.name for p in sizes.packages]
    assert set(names) == {"tool", "other", "hello"}
    assert names[0] in ("tool", "other")  # libbig dominates both closures
    by_name = {p.name: p for p in sizes.packages}
    for package in sizes.packages:
        assert package.own <= package.closure <= sizes.total
        assert package.exclusive <= package.closure
    libbig = 200_000
    assert by_name["tool"].closure > libbig
    assert by_name["tool"].exclusive < libbig  # libbig is shared with "other"
    assert by_name["other"].exclusive < libbig
    assert "libbig" not in names
    assert "package" in sizes.table()
    figure = sizes.plot()
    assert len(figure.axes[0].patches) == 2 * len(sizes.packages)


def test_progress_bar_draws_one_bar_per_build(
    fake: FakeNix, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two builds in two threads each get a bar that counts their layers and closes."""
    bar = progress_bar()
    results: list[BuildResult] = []
    with Builder(
        runner=fake, uploader=MemoryStore(), store_root=fake.store_root, progress=bar
    ) as builder:
        threads = [
            threading.Thread(target=lambda p=p: results.append(_build(fake, builder, p)))
            for p in ("tool", "other")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    err = capsys.readouterr().err
    for result in results:
        assert result.image.reference in err
        assert f"{len(result.layers)}/{len(result.layers)}" in err
