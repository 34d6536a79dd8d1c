"""A regrouped layer's diff_id: rebuild each fragment's tar from the store, or inflate it.

Issue "Never compress a store path twice": the ``diff_id`` needs the
uncompressed bytes of every cached fragment; :mod:`nixery_core.fragments`
chose to rebuild them from the store by each fragment's layout
(:mod:`nixery_core.fragment_layout`) rather than inflate them.  This
measures both on ``bench_pack``'s corpus: a fragment cache is filled by
packing the closure once, then every fragment's tar bytes are produced

* rebuilt: :func:`~nixery_core.fragment_layout.rebuild` (files read from
  the page cache, every 1 MiB block checked against its CRC-32);
* inflated: ISA-L's ``decompressobj`` over the compressed fragment (held in
  memory, so the disk plays no part in either);

CPU seconds of this process (``time.process_time``), best of ``--repeats``,
interleaved.  Neither hashes: that cost is the same for both.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_rebuild            # 300 MB closure
    .venv/bin/python -m benchmarks.bench_rebuild --quick    # 60 MB
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from isal import isal_zlib

from benchmarks.bench_pack import build_corpus, closure_main, warm
from nixery_core.archive import ArchiveOptions, pack_store_paths
from nixery_core.fragment_layout import FragmentLayout, rebuild
from nixery_core.fragments import FragmentCache, fragment_key

_Fragment = tuple[bytes, bytes, FragmentLayout, int]  # source, compressed, layout, tar size


def load_fragments(root: Path, paths: Sequence[str]) -> list[_Fragment]:
    """Pack ``paths`` once into a new fragment cache; every fragment, read back."""
    options = ArchiveOptions()
    parameters = options.parameters()
    out = []
    with FragmentCache(root / "bench-rebuild-fragments") as cache:
        pack_store_paths(paths, lambda _data: None, options, store_root=root, fragments=cache)
        for path in paths:
            source = os.fsencode(root / path.lstrip("/"))
            with cache.get(fragment_key(source, parameters)) as found:
                assert found is not None
                assert found.layout is not None
                layout = FragmentLayout.decode(found.layout)
                assert layout is not None
                out.append((source, b"".join(found.pieces()), layout, found.uncompressed_size))
    return out


def rebuilt(fragments: Sequence[_Fragment]) -> int:
    total = 0
    for source, _compressed, layout, size in fragments:
        blocks: list[bytearray] = []
        done = rebuild(source, layout, blocks.append)
        assert done == size
        total += done
    return total


def inflated(fragments: Sequence[_Fragment]) -> int:
    total = 0
    for _source, compressed, _layout, size in fragments:
        inflate = isal_zlib.decompressobj(31)
        done = len(inflate.decompress(compressed))
        assert done == size
        assert inflate.eof
        total += done
    return total


def main(argv: Sequence[str] | None = None) -> int:
    return closure_main(argv, __doc__, "bench-rebuild-", _run)


def _run(root: Path, args: argparse.Namespace) -> int:
    paths = build_corpus(root, args.size_mb)
    fragments = load_fragments(root, paths)
    files = sum(len(f) for p in paths for _d, _s, f in os.walk(root / p.lstrip("/")))
    tar = sum(fragment[3] for fragment in fragments)
    print(
        f"{len(paths)} store paths, {files} files and symlinks, {tar / 1e6:.0f} MB of fragment "
        f"tar; load average {os.getloadavg()[0]:.1f}"
    )
    ways: list[tuple[str, Callable[[Sequence[_Fragment]], int]]] = [
        ("rebuilt from the store", rebuilt),
        ("inflated (ISA-L)", inflated),
    ]
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, way in ways:
            warm(root, paths)
            start = time.process_time()
            assert way(fragments) == tar
            best[name] = min(best.get(name, float("inf")), time.process_time() - start)
    for name, _way in ways:
        seconds = best[name]
        print(f"  {name:<24} {seconds:6.3f} CPU-s  {tar / seconds / 1e6:6.0f} MB per CPU-s")
    print(f"  inflating / rebuilding: {best[ways[1][0]] / best[ways[0][0]]:.2f}x the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
