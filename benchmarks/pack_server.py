"""Pack the benchmark corpus on request with the ``nixery_core`` found in ``--code``.

Run as a script (``python benchmarks/pack_server.py --code DIR ...``), never
imported by the package under test: ``DIR`` goes first on ``sys.path``
before ``nixery_core`` is imported, so one script packs with this checkout's
code or with an older revision's (exported by
:func:`benchmarks.remote_pack.export_revision`).  ``bench_pack --today``
times such servers against each other in one script: the cold pack into
fragments of this code against the pack of the code as it was before
issue 18 (its "no slower than today").

Requests are JSON lines on stdin, answered by one JSON line on stdout each
(stdout carries nothing else):

* ``{"op": "prepare", "store": DIR, "fragments": DIR or null}``: open a new
  ``FilesystemStore`` (``durable=False``) at ``store`` and, with
  ``fragments``, a new ``FragmentCache`` there keeping the layer's fragments
  as ranges of its blob; then a full garbage collection.  Untimed.
* ``{"op": "pack"}``: pack the corpus as one layer into that store (and that
  cache, closed at the end, as ``bench_pack``'s ``ours`` does); answers the
  blob's ``size`` and ``digest``.

Every answer carries ``cpu``: this process's CPU seconds so far, its
waited-for children's and its live children's (chunked layers' frame
worker processes), read right before it is written, so the driver gets a
run's CPU as the difference of two answers.  A failed request answers
``{"ok": false, "error": ...}`` and the server goes on; end of input ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import resource
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def process_cpu() -> float:
    """CPU seconds of this process, its waited-for children and its live children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime
    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        for pid in children:
            # The CPU clock Linux makes of a pid (clock_getcpuclockid's); one that exited
            # meanwhile is counted in RUSAGE_CHILDREN once waited for.
            with contextlib.suppress(OSError):
                total += time.clock_gettime((~int(pid) << 3) | 2)
    return total


def load(code: Path) -> dict[str, Any]:
    """The modules of the ``nixery_core`` under ``code`` a server uses (``fragments``: None in
    a revision without them), imported with ``code`` first on ``sys.path``."""
    sys.path.insert(0, str(code.resolve()))
    package = importlib.import_module("nixery_core")
    where = Path(package.__file__ or "").resolve().parent.parent
    if where != code.resolve():
        msg = f"nixery_core imported from {where}, not {code}"
        raise ImportError(msg)
    try:
        fragments: Any = importlib.import_module("nixery_core.fragments")
    except ImportError:
        fragments = None
    return {"archive": importlib.import_module("nixery_core.archive"),
            "filesystem": importlib.import_module("nixery_core.storage.filesystem"),
            "fragments": fragments}


class Server:
    """The store, the cache and the corpus of one server, packing with ``modules``
    (:func:`load`'s)."""

    def __init__(
        self, modules: dict[str, Any], root: Path, paths: Sequence[str], compression: str
    ) -> None:
        self.modules, self.root, self.paths = modules, root, list(paths)
        self.options = modules["archive"].ArchiveOptions(compression=compression)
        self.store: Any = None
        self.cache: Any = None

    def prepare(self, store: str, fragments: str | None) -> dict[str, Any]:
        self.store = self.modules["filesystem"].FilesystemStore(Path(store), durable=False)
        self.cache = None
        if fragments is not None:
            if self.modules["fragments"] is None:
                msg = "this revision has no fragment cache"
                raise ValueError(msg)
            self.cache = self.modules["fragments"].FragmentCache(Path(fragments))
        gc.collect()
        return {}

    def pack(self) -> dict[str, Any]:
        pack_store_paths = self.modules["archive"].pack_store_paths
        store, cache = self.store, self.cache
        if store is None:
            msg = "pack before prepare"
            raise RuntimeError(msg)
        self.store = self.cache = None
        try:
            layer = cache.on_store(store).layer() if cache is not None else None
            with store.open_blob_writer(self.options.media_type) as writer:
                extra: dict[str, Any] = {}
                if layer is not None:
                    extra = {"fragments": layer, "blob_digest": writer.written_digest}
                packed = pack_store_paths(self.paths, writer.write, self.options,
                                          store_root=self.root, **extra)
                writer.commit(packed.digest)
            if layer is not None:
                layer.stored(packed.digest)
        finally:
            if cache is not None:
                cache.close()
        return {"size": packed.size, "digest": packed.digest}


def answer(server: Server, request: dict[str, Any]) -> dict[str, Any]:
    """What ``server`` answers ``request`` (raises what the request met)."""
    if request["op"] == "prepare":
        return server.prepare(request["store"], request.get("fragments"))
    if request["op"] == "pack":
        return server.pack()
    msg = f"unknown op {request['op']!r}"
    raise ValueError(msg)


def serve(server: Server, requests: Any, answers: Any) -> None:
    """Answer each JSON line of ``requests`` on ``answers`` until the end of input."""
    for line in requests:
        try:
            reply = answer(server, json.loads(line))
            reply["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "trace": traceback.format_exc()}
        reply["cpu"] = process_cpu()
        answers.write(json.dumps(reply) + "\n")
        answers.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--code", type=Path, required=True,
                        help="the directory holding the nixery_core package to pack with")
    parser.add_argument("--root", type=Path, required=True, help="the corpus' store root")
    parser.add_argument("--paths", type=Path, required=True,
                        help="a JSON list of the store paths to pack")
    parser.add_argument("--compression", required=True)
    args = parser.parse_args(argv)
    try:
        modules = load(args.code)
    except ImportError as exc:
        print(f"pack_server: {exc}", file=sys.stderr)
        return 2
    server = Server(modules, args.root, json.loads(args.paths.read_text()), args.compression)
    serve(server, sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
