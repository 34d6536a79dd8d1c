"""Load: many build requests at once, from threads and from processes, on shared state.

The documented bound on duplicate work (nixery_core/cache.py, docs/caching.md):
one build per image key and one pack per layer key for everyone sharing a
cache (threads of one ``BuildCache``, processes sharing its directory).
These tests count Nix resolves and layer packs against that bound, check
that every answer for an image is the same manifest and equals a quiet
sequential build, and that nothing in the store or the cache is corrupt
afterwards (the checks of tests/test_faults.py).  Every load starts from an
empty Nix store, blob store and cache; the reference builds use their own.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_faults import assert_no_partial_state, cache_problems

from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.names import Image
from nixery_core.protocols import Uploader
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.runners import FakeNix, FakePackage, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore

TESTS = Path(__file__).resolve().parent
REQUESTS = 200
THREADS = 16
PROCESSES = 4


def load_packages() -> dict[str, FakePackage]:
    """The default fake set plus four libraries and twelve applications using them."""
    def blob(name: str, size: int) -> bytes:
        return hashlib.shake_256(name.encode()).digest(size)

    libs = {
        f"lib{i}": FakePackage({f"lib/lib{i}.so": blob(f"lib{i}", 24 << 10)}, ("busybox",))
        for i in range(4)
    }
    apps = {
        f"app{i:02d}": FakePackage(
            {f"bin/app{i:02d}": blob(f"app{i}", 16 << 10)},
            tuple(sorted({f"lib{i % 4}", f"lib{(i * 3 + 1) % 4}"})),
        )
        for i in range(12)
    }
    return {**default_fake_packages(), **libs, **apps}


#: Twenty images with overlapping closures (every one holds busybox, cacert, iana-etc).
IMAGES: tuple[str, ...] = (
    *(f"app{i:02d}" for i in range(12)),
    *(f"app{i:02d}/app{i + 6:02d}" for i in range(4)),
    "shell/app00", "shell/app11", "shell/hello", "hello/app05",
)


def build(name: str, runner: FakeNix, store: Uploader, cache: BuildCache | None) -> BuildResult:
    return build_image(Image.from_name(name), FixedSource(), runner=runner, uploader=store,
                       cache=cache, store_root=runner.store_root)


def reference_digests(root: Path) -> dict[str, str]:
    """Each image built alone, one after another, without a cache, on its own Nix store."""
    runner = FakeNix(root, load_packages())
    return {name: build(name, runner, MemoryStore(), None).manifest_digest for name in IMAGES}


def test_images_are_distinct() -> None:
    """The twenty image names are twenty different images (so the bounds below mean something)."""
    assert len({Image.from_name(name).packages for name in IMAGES}) == len(IMAGES) == 20


def test_threads_hammering_one_cache_build_each_image_once(tmp_path: Path) -> None:
    """200 requests over 20 images from 16 threads: one answer per image, equal to a quiet
    build; one Nix resolve per image; one pack per layer; nothing corrupt."""
    expected = reference_digests(tmp_path / "reference")
    runner = FakeNix(tmp_path / "root", load_packages())
    store = MemoryStore()
    requests = [IMAGES[i % len(IMAGES)] for i in range(REQUESTS)]
    random.Random(20).shuffle(requests)  # noqa: S311 - a fixed order, not a secret
    with BuildCache(tmp_path / "cache") as cache, ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda name: (name, build(name, runner, store, cache)), requests))
    assert len(results) == REQUESTS
    answers: dict[str, set[str]] = {}
    for name, result in results:
        answers.setdefault(name, set()).add(result.manifest_digest)
    assert answers == {name: {digest} for name, digest in expected.items()}
    # the documented bound: one build per image, one pack per layer key
    assert runner.count("resolve") == len(IMAGES)
    assert sum(not result.from_cache for _, result in results) == len(IMAGES)
    packed = Counter(layer.digest for _, r in results for layer in r.layers if not layer.reused)
    assert max(packed.values()) == 1
    distinct = {d for _, r in results for d in r.blobs}
    assert store.blob_commits == len(distinct)  # no blob, not even a config, written twice
    stored = assert_no_partial_state(store, tmp_path / "cache", built=True)
    assert stored == distinct
    assert len(list(store.list_objects("manifests/"))) == len(IMAGES)


_PROCESS = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import test_load
    test_load.worker_main(sys.argv[2:])
    """
)


def worker_main(args: Sequence[str]) -> None:
    """``root store cache name...``: build the images with 4 threads, print a JSON summary."""
    root, store_dir, cache_dir = map(Path, args[:3])
    names = list(args[3:])
    runner = FakeNix(root, load_packages())
    store = FilesystemStore(store_dir)
    with BuildCache(cache_dir) as cache, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda name: build(name, runner, store, cache), names))
    print(json.dumps({
        "digests": {name: r.manifest_digest for name, r in zip(names, results, strict=True)},
        "resolves": runner.count("resolve"),
        "built": sum(not r.from_cache for r in results),
        "packed": [layer.digest for r in results for layer in r.layers if not layer.reused],
    }))


def test_processes_sharing_store_and_cache_build_each_image_once(tmp_path: Path) -> None:
    """4 processes on one FilesystemStore and cache directory, each image asked by two of them:
    the same digests everywhere, one resolve per image in all, one pack per layer, no corruption."""
    expected = reference_digests(tmp_path / "reference")
    shares = [
        [IMAGES[(5 * k + j) % len(IMAGES)] for j in range(10)] for k in range(PROCESSES)
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS, str(TESTS), str(tmp_path / f"root{k}"),
             str(tmp_path / "store"), str(tmp_path / "cache"), *names],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k, names in enumerate(shares)
    ]
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        answers.append(json.loads(out))
    assert Counter(name for names in shares for name in names) == dict.fromkeys(IMAGES, 2)
    for names, answer in zip(shares, answers, strict=True):
        assert answer["digests"] == {name: expected[name] for name in names}
    assert sum(a["resolves"] for a in answers) == len(IMAGES)
    assert sum(a["built"] for a in answers) == len(IMAGES)
    packed = Counter(d for a in answers for d in a["packed"])
    assert max(packed.values()) == 1
    store = FilesystemStore(tmp_path / "store")
    assert_no_partial_state(store, tmp_path / "cache", built=True)
    assert len(list(store.list_objects("manifests/"))) == len(IMAGES)
    assert cache_problems(tmp_path / "cache") == []  # SQLite sound, no lock file left behind


_COUNTER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from nixery_core.cache import BuildCache

    cache_dir, counter, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    with BuildCache(cache_dir) as cache:
        for _ in range(rounds):
            with cache.single_flight("manifest:" + "0" * 64):
                value = int(counter.read_text())  # read-modify-write: racy without the lock
                counter.write_text(str(value + 1))
    """
)


def test_cross_process_lock_never_admits_two_holders(tmp_path: Path) -> None:
    """4 processes x 200 turns of an unguarded read-modify-write under one key lose no update."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    rounds = 200
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _COUNTER, str(tmp_path / "cache"), str(counter), str(rounds)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert int(counter.read_text()) == PROCESSES * rounds
    assert sorted(p.name for p in (tmp_path / "cache").glob("lock-*")) == []
