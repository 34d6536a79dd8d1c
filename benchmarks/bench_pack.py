"""Layer packing throughput, output size and memory, against tar/gzip/pigz in the same run.

Issue "Performance: pack layers at close to disk speed, in constant memory".

A synthetic closure is built under a temp dir as a fake store
``<tmp>/nix/store/<hash>-<package>-<version>/``: installed Debian packages,
taken in a fixed pseudo-random order (packages over 80 MB skipped) until
``--size-mb`` is reached, each copied from the host with its files re-rooted
(``/usr/lib/x`` -> ``lib/x``, ``/usr/share/doc/y`` -> ``share/doc/y``):
a realistic mix of executables, shared libraries, text and data.  Without
``dpkg-query`` the subdirectories of ``/usr/lib``, ``/usr/share`` and
``/usr/bin`` become the "packages".  Every tool reads the same paths.

Measured (throughput = our uncompressed tar bytes / wall second; CPU =
user + system seconds of that run, children included):

* read limit: ``tar -c | wc -c`` (GNU tar does not read the files at all
  when its output is /dev/null itself, so the bytes go through a pipe);
* ``tar -c | pigz -p2 -6`` and, without ``--quick``, ``tar -c | gzip -6``;
* ours with default :class:`~nixery_core.archive.ArchiveOptions`: one
  layer, and the same paths split round-robin into ``--layers`` layers
  packed in parallel threads (as ``build_image`` does);
* fragments (:mod:`nixery_core.fragments`): one layer packed cold into an
  empty fragment cache (it records every store path's member: the cost of
  keeping them) and its blob written into a ``FilesystemStore``, the
  fragments kept as byte ranges of that blob (``BuildCache``'s default on
  such a store), against one layer written into a ``FilesystemStore``
  without fragments (like with like; both ``durable=False``, no fsync),
  and, for reference, the same cold pack keeping copies (``"copy"``, as
  on a remote store); and *regrouped*: the paths packed once as the
  round-robin layers into a store (fragments as ranges of their blobs),
  then timed as ``--layers`` contiguous layers (other groupings,
  every path from the cache; the ``diff_id`` from the tar rebuilt from the
  store by each fragment's layout, :mod:`nixery_core.fragment_layout`).
  The sink stands in for a blob writer that hashes what it is given, so
  the blob is hashed once, as in a build; the fragment cache is opened
  and its files read once before the timed run (a registry opens it once;
  the store is read once too, see below) and closed within it (writing
  what is still queued);
* eStargz and zstd:chunked (issue 17): one layer, ``--layers`` layers in
  threads, and regrouped from fragments as above (a store path's frames
  kept as ranges of the first layers' blobs, its TOC part as a small copy
  beside them, :mod:`nixery_core.fragment_toc`); and, as for gzip, one
  layer into a ``FilesystemStore`` without fragments and one cold into
  fragments (frames as ranges of its blob, TOC parts as copies);
* without ``--quick``: other backends and levels, for the docs table
  (``gzip -6`` runs once: it is slow and only there for context);
* memory: a child process packs one layer of ``--rss-mb`` (the closure
  copied under distinct names until big enough, real copies, no hard
  links) and reports its peak RSS (VmHWM), next to the VmHWM of a child
  that only imports nixery_core; then the same layer as eStargz and as
  zstd:chunked (``--no-chunked-rss`` skips them: about a minute for the
  2 GB layer), each with the peaks of its frame worker processes apart.

Each contender runs ``--repeats`` times (the variants 3 times), interleaved
with the others, each run right after reading every file once (hosts that page out idle page
cache quickly, as this 2-core VM does, would otherwise time the disk); the
best run is kept.

Targets printed as PASS/MISS: ours >= 4x ``pigz -p2 -6`` throughput,
ours >= 0.5x the tar read rate, output <= 1.10x ``pigz -6``, peak RSS
< 150 MB for the big layer (gzip, and eStargz and zstd:chunked counting
the packing process); regrouped from fragments >= 0.5x the tar read
rate, and a cold pack into the fragment cache >= 0.95x the rate of one
without (no slower, within noise), for gzip and for each chunked format.

That last target is judged after the main table, per format, by
:mod:`benchmarks.no_slower`: ``--pairs`` rounds of three runs, cold /
without / a second copy of without (the A/A control), in a balanced order
(every contender in every place of a round equally often), each run
preceded (untimed) by the corpus read at the round's start, the files the
earlier runs wrote written back (``fsync``) and the contender prepared; a
round during which the rest of the host used more than ``--crowded`` CPUs
is not judged and another is run.  The verdict is the median over the
rounds of each round's without / cold seconds with its distribution-free
95% interval (order statistics; "cannot tell" when it holds 0.95 or the
A/A control's misses 1), printed with the rounds' spread, the median CPU
ratio and the A/A control's median, interval and spread.  The main table's
figures (the median of its rounds' pairs, the ratio of the two bests, the
CPU ratio) are printed too, labelled, but no longer judge: there the two
runs of a pair are not adjacent, always in the same order, and its A/A
control (``--aa-table``) moved by more than the margin (docs/performance.md,
"Judging 'no slower' on a noisy host").

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_pack            # 300 MB closure, 2 GB RSS layer
    .venv/bin/python -m benchmarks.bench_pack --quick    # 60 MB, 300 MB RSS layer
    .venv/bin/python -m benchmarks.bench_pack --quick --rss-only   # the peak-RSS rows alone
    .venv/bin/python -m benchmarks.bench_pack --quick --only-pairs # the "no slower" rounds alone
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import attrs

from benchmarks import no_slower
from benchmarks.remote_pack import HERE, ISSUE_18_BASE, RemotePack, export_revision
from nixery_core import frame_processes
from nixery_core.archive import ArchiveOptions, pack_store_paths
from nixery_core.durable import fsync_dir
from nixery_core.fragments import FragmentCache, FragmentSource
from nixery_core.storage.filesystem import FilesystemStore

_B32 = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's base32 alphabet
MB = 1_000_000
_T = TypeVar("_T")


def _fake_hash(seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(_B32[b % 32] for b in digest[:32])


# --- corpus ------------------------------------------------------------------


def _dpkg_packages() -> list[tuple[str, list[str]]]:
    """(store name, host files) per installed Debian package."""
    listing = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Installed-Size}\n"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    packages = []
    for line in listing.splitlines():
        name, version, size = line.split("\t")
        if not size or int(size) > 80_000:  # KiB: skip the few huge ones
            continue
        files_out = subprocess.run(
            ["dpkg-query", "-L", name], capture_output=True, text=True, check=False
        ).stdout
        files = [f for f in files_out.splitlines() if f.startswith("/")]
        store_name = f"{name}-{version}".replace(":", "_").replace("~", "_").replace("+", "_")
        packages.append((store_name, files))
    return packages


def _directory_packages() -> list[tuple[str, list[str]]]:
    packages = []
    for base in ("/usr/lib", "/usr/share", "/usr/bin"):
        for child in sorted(Path(base).iterdir()):
            files = [str(p) for p in child.rglob("*")] if child.is_dir() else [str(child)]
            packages.append((f"{Path(base).name}-{child.name}", [str(child), *files]))
    return packages


def _rebase(host_path: str) -> str:
    rel = host_path.lstrip("/")
    return rel[4:] if rel.startswith("usr/") else rel


def build_corpus(root: Path, size_mb: int) -> list[str]:
    """Fill ``root/nix/store`` with about ``size_mb`` MB; return the store paths."""
    store = root / "nix" / "store"
    store.mkdir(parents=True, exist_ok=True)
    packages = _dpkg_packages() if shutil.which("dpkg-query") else _directory_packages()
    packages.sort(key=lambda p: hashlib.sha256(p[0].encode()).digest())
    total = 0
    paths = []
    for store_name, files in packages:
        if total >= size_mb * MB:
            break
        dest = store / f"{_fake_hash(store_name)}-{store_name}"
        copied = 0
        for host in files:
            try:
                st = os.lstat(host)
            except OSError:
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                continue
            if stat.S_ISLNK(st.st_mode) and Path(host).is_dir():
                continue  # merged-/usr links such as /bin -> usr/bin
            real = Path(os.path.realpath(Path(host).parent)) / Path(host).name
            target = dest / _rebase(str(real))
            if target.exists() or target.is_symlink():
                copied += st.st_size if stat.S_ISREG(st.st_mode) else 0  # a kept corpus
                continue
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if stat.S_ISLNK(st.st_mode):
                    target.symlink_to(Path(host).readlink())
                else:
                    shutil.copyfile(host, target)
                    target.chmod(st.st_mode & 0o755)
                    copied += st.st_size
            except OSError:
                continue
        if dest.exists():
            paths.append(f"/nix/store/{dest.name}")
            total += copied
    return sorted(paths)


def replicate(root: Path, paths: Sequence[str], size_mb: int) -> list[str]:
    """Copy the closure under new names until ``size_mb``, each copy's files made distinct.

    The packer stores identical content once per layer (as a hard link), so
    plain copies would collapse; a marker appended to every file of copy
    ``n`` keeps the layer really ``size_mb`` large.
    """
    store = root / "nix" / "store"
    base = sum(_tree_size(store / p.rsplit("/", 1)[1]) for p in paths)
    out = list(paths)
    copies = max(0, -(-size_mb * MB // max(base, 1)) - 1)
    for n in range(1, copies + 1):
        for path in paths:
            name = path.rsplit("/", 1)[1].split("-", 1)[1]
            dest = store / f"{_fake_hash(f'{name}#{n}')}-{name}"
            if not dest.exists():
                shutil.copytree(store / path.rsplit("/", 1)[1], dest, symlinks=True)
                _make_distinct(dest, n)
            out.append(f"/nix/store/{dest.name}")
    return sorted(out)


def _make_distinct(tree: Path, n: int) -> None:
    """Append a per-copy marker to every regular file under ``tree``."""
    marker = f"\n# copy {n}\n".encode()
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            file = Path(dirpath) / name
            info = file.lstat()
            if not stat.S_ISREG(info.st_mode):
                continue
            file.chmod(info.st_mode | stat.S_IWUSR)
            with file.open("ab") as handle:
                handle.write(marker)
            file.chmod(info.st_mode)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))  # noqa: PTH118 - os.walk gives str paths
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


# --- measurements ------------------------------------------------------------


@attrs.frozen
class Result:
    name: str
    seconds: float  # best wall time over the repeats
    cpu: float  # user + sys seconds of that run (ours: this process; tools: the pipeline)
    input_bytes: int
    output_bytes: int
    #: Every run's wall time, in the order of the rounds (the best is ``seconds``).
    runs: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        return self.input_bytes / self.seconds / MB


def paired_rate_ratio(contender: Result, baseline: Result) -> float:
    """The median over the rounds of ``contender``'s rate / ``baseline``'s in the same round.

    Both ran in every round of :func:`measure`, seconds apart, so a round's
    pair shares what else the host was doing; each round's ratio cancels
    that, where the ratio of two bests (each from whichever round was
    quietest for it) carries the noise of both.  Both inputs the same, the
    ratio of rates is baseline seconds / contender seconds.
    """
    pairs = [base / own for own, base in zip(contender.runs, baseline.runs, strict=True)]
    return statistics.median(pairs)


class _HashingSink:
    """Stands in for a blob writer: hashes and counts what it is given.

    Like the stores' writers it reports its running digest, which the packer
    takes as the layer's digest (the blob is hashed once, as in a build).
    """

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def written_digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def warm(root: Path, paths: Sequence[str]) -> None:
    """Read every file once, so that the timed run reads from the page cache."""
    for path in paths:
        _read_tree(root / path.lstrip("/"))


def _read_tree(top: Path) -> None:
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            full = Path(dirpath, name)
            if full.is_file() and not full.is_symlink():
                with full.open("rb") as handle:
                    while handle.read(1 << 20):
                        pass


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _proc_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_all() -> float:
    """CPU seconds of this process, its waited-for children and its live frame workers.

    eStargz and zstd:chunked frames are compressed in worker processes that
    outlive a layer (nixery_core.frame_processes); their time counts too.
    """
    return _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) + workers_cpu()


def workers_cpu() -> float:
    """CPU seconds of this process's live frame worker processes.

    Each worker's is read exactly from its CPU clock (the clock id Linux
    makes of a pid, as ``clock_getcpuclockid`` does), else in clock ticks
    from ``/proc/PID/stat``: ticks are 10 ms, and a pack's workers' ticks
    were off their clocks by -13 to +6 ms (about 2% of a quick pack's CPU).
    """
    workers = 0.0
    for pid in frame_processes.shared_pids():
        try:
            workers += time.clock_gettime((~pid << 3) | 2)
            continue
        except OSError:  # no such clock here, or it just exited
            pass
        try:
            fields = _proc_fields(pid)
        except OSError:  # it just exited; its time is lost to this count
            continue
        workers += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return workers


Contender = Callable[[], int]  # runs once, returns the output size


def tool(root: Path, list_file: Path, consumer: str | None) -> Contender:
    pipe = f" | {consumer}" if consumer else ""
    command = f"tar -C {root} -cf - --null -T {list_file}{pipe} | wc -c"

    def run() -> int:
        out = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command], check=True, capture_output=True, text=True
        ).stdout
        return int(out)

    return run


class ours:  # noqa: N801 - used like the function it was
    """Pack each group as one layer; several groups are packed in parallel threads.

    ``fragments`` gives the fragment cache of each run (``None``: none); it
    is opened by :meth:`prepare`, untimed (a registry opens it once, not per
    layer), and closed at the end of the timed run.  ``blobs`` gives the
    store each run writes its layers into (a :class:`FilesystemStore`, as a
    registry's), ``None``: a sink that only hashes.  With both, a fragment
    is kept as ``mode`` says: ``"ranges"`` (of the layer blob, once
    committed: :meth:`FragmentCache.on_store`) or ``"copy"``.
    ``read_from``: a store whose blobs the cache's ranges name (a regroup
    writing into the sink).
    """

    def __init__(
        self,
        root: Path,
        groups: Sequence[Sequence[str]],
        options: ArchiveOptions,
        fragments: Callable[[], FragmentCache | None] = lambda: None,
        *,
        blobs: Callable[[], FilesystemStore] | None = None,
        mode: str = "ranges",
        read_from: FilesystemStore | None = None,
    ) -> None:
        self.root, self.groups, self.options, self.fragments = root, groups, options, fragments
        self.blobs, self.mode, self.read_from = blobs, mode, read_from
        self.cache: FragmentCache | None = None
        self.store: FilesystemStore | None = None
        #: The directories the run prepared last writes into (its cache's and its store's).
        self.writes: list[Path] = []

    def prepare(self) -> None:
        """Open the fragment cache and read its files once (as :func:`warm` reads the store)."""
        self.cache = self.fragments()
        if self.cache is not None:
            _read_tree(self.cache.directory)
        self.store = self.blobs() if self.blobs is not None else None
        self.writes = [
            *([self.cache.directory] if self.cache is not None else []),
            *([self.store.root] if self.store is not None else []),
        ]
        if self.read_from is not None:  # the blobs the ranges name, read once like the rest
            _read_tree(self.read_from.root)

    def one(self, paths: Sequence[str]) -> int:
        cache, store = self.cache, self.store
        source: FragmentSource | None = cache
        if cache is not None and self.read_from is not None:
            source = cache.on_store(self.read_from)
        if store is None:
            sink = _HashingSink()
            packed = pack_store_paths(
                paths, sink.write, self.options, store_root=self.root, fragments=source,
                blob_digest=sink.written_digest,
            )
            assert packed.size == sink.size
            return packed.size
        layer = cache.on_store(store).layer() if cache is not None and self.mode == "ranges" \
            else None
        with store.open_blob_writer(self.options.media_type) as writer:
            packed = pack_store_paths(
                paths, writer.write, self.options, store_root=self.root,
                fragments=layer if layer is not None else source,
                blob_digest=writer.written_digest,
            )
            writer.commit(packed.digest)
        if layer is not None:
            layer.stored(packed.digest)
        return packed.size

    def __call__(self) -> int:
        try:
            if len(self.groups) == 1:
                return self.one(self.groups[0])
            with ThreadPoolExecutor(len(self.groups)) as pool:
                return sum(pool.map(self.one, self.groups))
        finally:
            if self.cache is not None:
                self.cache.close()
                self.cache = None


def cold_fragments(root: Path, name: str = "") -> Callable[[], FragmentCache]:
    """A new, empty fragment cache for every run, in a new directory.

    The ones of earlier runs stay until :func:`remove_cold_fragments`:
    deleting 100 MB of fragments right before a timed run made that run pay
    for the file system's handling of just-freed inodes (ext4's
    ``recently_deleted``), which an empty cache being filled does not meet.
    """
    for directory in root.glob(f"cold-fragments{name}-*"):  # left by an earlier run with --keep
        shutil.rmtree(directory, ignore_errors=True)
    counter = [0]

    def make() -> FragmentCache:
        counter[0] += 1
        return FragmentCache(root / f"cold-fragments{name}-{counter[0]}")

    return make


def cold_blobs(root: Path, name: str) -> Callable[[], FilesystemStore]:
    """A new, empty blob store for every run (``durable=False``: no fsync, in every contender
    writing into one alike), in a new directory, removed by :func:`remove_cold_fragments`."""
    counter = [0]

    def make() -> FilesystemStore:
        counter[0] += 1
        return FilesystemStore(root / f"cold-blobs-{name}-{counter[0]}", durable=False)

    return make


def remove_cold_fragments(root: Path) -> None:
    for directory in (*root.glob("cold-fragments-*"), *root.glob("cold-blobs-*")):
        shutil.rmtree(directory, ignore_errors=True)


def warm_fragments(
    root: Path,
    groups: Sequence[Sequence[str]],
    options: ArchiveOptions,
    name: str = "",
    *,
    blobs: FilesystemStore | None = None,
) -> Callable[[], FragmentCache]:
    """A fragment cache holding every path, filled by packing ``groups`` once (untimed).

    With ``blobs``, the layers are written into it and their fragments kept
    as ranges of their blobs.
    """
    directory = root / f"warm-fragments{name}"
    shutil.rmtree(directory, ignore_errors=True)
    filling = ours(root, groups, options, lambda: FragmentCache(directory),
                   blobs=None if blobs is None else lambda: blobs)
    filling.prepare()
    filling()
    return lambda: FragmentCache(directory)


def measure(
    root: Path,
    paths: Sequence[str],
    contenders: Sequence[tuple[str, Contender, int]],
    repeats: int,
) -> list[Result]:
    """Best of ``repeats`` runs each, interleaved, each right after warming the cache.

    The third item of a contender is its input size (the numerator of its rate).
    """
    best: dict[str, Result] = {}
    runs: dict[str, list[float]] = {name: [] for name, _run, _size in contenders}
    for _ in range(repeats):
        for name, run, input_bytes in contenders:
            warm(root, paths)
            if isinstance(run, ours):
                run.prepare()  # untimed: open the fragment cache, read it once
            cpu_before = _cpu_all()
            start = time.perf_counter()
            size = run()
            seconds = time.perf_counter() - start
            cpu = _cpu_all() - cpu_before
            runs[name].append(seconds)
            if name not in best or seconds < best[name].seconds:
                best[name] = Result(name, seconds, cpu, input_bytes, size)
    return [attrs.evolve(best[name], runs=tuple(runs[name])) for name, _run, _size in contenders]


def tar_size(root: Path, paths: Sequence[str]) -> int:
    """The size of our uncompressed layer: the numerator of every rate."""
    return ours(root, [paths], ArchiveOptions(compression="none"))()  # no cache to prepare


def measure_rss(root: Path, paths: Sequence[str], options: ArchiveOptions) -> dict[str, int]:
    """Peak RSS of a child that packs ``paths``, and of one that only imports."""
    list_file = root / "rss.lst"
    list_file.write_text("\n".join(paths))
    spec = json.dumps(attrs.asdict(options))
    report = {}
    for mode in ("baseline", "pack"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_pack", "--rss-child", mode, str(root),
             str(list_file), spec],
            check=True, capture_output=True, text=True,
        ).stdout
        report.update({f"{mode}_{k}": v for k, v in json.loads(out).items()})
    return report


def _rss_child(mode: str, root: str, list_file: str, spec: str) -> None:
    paths = Path(list_file).read_text().split("\n")
    result: dict[str, int] = {}
    if mode == "pack":
        sink = _HashingSink()
        packed = pack_store_paths(
            paths, sink.write, ArchiveOptions(**json.loads(spec)), store_root=Path(root),
            blob_digest=sink.written_digest,
        )
        result["blob_bytes"] = packed.size
        result["file_bytes"] = sum(_tree_size(Path(root) / p.lstrip("/")) for p in paths)
    result["vmhwm_kb"] = _vmhwm_kb("self")
    # Frame worker processes (chunked layers): their peaks, added up.
    result["workers_vmhwm_kb"] = sum(_vmhwm_kb(str(pid)) for pid in frame_processes.shared_pids())
    print(json.dumps(result))


def _vmhwm_kb(pid: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# --- report ------------------------------------------------------------------


def _row(result: Result, reference: Result | None) -> str:
    ratio = f"{result.output_bytes / reference.output_bytes:5.3f}" if reference else "    -"
    return (
        f"  {result.name:<32} {result.seconds:6.2f} s {result.cpu:6.2f} cpu-s "
        f"{result.rate:6.0f} MB/s {result.output_bytes / MB:8.1f} MB   {ratio}"
    )


def _check(label: str, value: float, target: float, *, below: bool = False) -> str:
    ok = value <= target if below else value >= target
    sign = "<=" if below else ">="
    return f"  {'PASS' if ok else 'MISS'}  {label}: {value:.2f} (target {sign} {target})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--size-mb", type=int, default=300, help="closure size (default 300)")
    parser.add_argument("--rss-mb", type=int, default=2000, help="big layer for the RSS check")
    parser.add_argument("--layers", type=int, default=4, help="layers packed in parallel")
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="runs per contender (best kept; default 5, with --quick 2)",
    )
    parser.add_argument("--quick", action="store_true", help="60 MB closure, 300 MB RSS layer")
    parser.add_argument(
        "--chunked-rss", action=argparse.BooleanOptionalAction, default=True,
        help="the peak RSS of estargz and zstd-chunked on the big layer (default: on)",
    )
    parser.add_argument(
        "--rss-only", action="store_true",
        help="only the peak-RSS rows (the big layer as gzip, eStargz, zstd:chunked): no "
             "throughput runs",
    )
    parser.add_argument("--keep", type=Path, help="build (or reuse) the corpus here, keep it")
    pairs = parser.add_argument_group(
        "'no slower' (benchmarks/no_slower.py)",
        "the cold-pack target judged by rounds of three runs in a balanced order, with an A/A "
        "control",
    )
    pairs.add_argument(
        "--pairs", type=int, default=None,
        help=f"rounds of cold / without / A/A copy per format (default {_PAIRS}, "
             f"with --quick {_PAIRS_QUICK}; 0 skips them)",
    )
    pairs.add_argument("--pair-order", choices=no_slower.ORDERS, default="balanced",
                       help="balanced: every contender in every place of a round equally "
                            "often; alternate: without in the middle, the outer two swapping "
                            "every round; fixed: never (default: balanced)")
    pairs.add_argument("--pair-sync", choices=_SYNCS, default=_SYNC,
                       help="before each timed run, write back what the earlier runs wrote "
                            "(fsync of their files), every dirty page of the host (os.sync), "
                            f"or nothing (default: {_SYNC})")
    pairs.add_argument("--pair-warm", choices=_WARMS, default=_WARM,
                       help="read the corpus once (the page cache) before every timed run or "
                            f"before a round's first (default: {_WARM})")
    pairs.add_argument("--aa-only", action="store_true",
                       help="tuning: the cold contender replaced by a third copy of without "
                            "(every run the same code), for position effects and the design's "
                            "noise without looking at cold")
    pairs.add_argument("--pair-formats", nargs="+", choices=_PAIR_FORMATS,
                       default=list(_PAIR_FORMATS), help="formats measured (default: all)")
    pairs.add_argument(
        "--quiet-wait", type=float, default=_QUIET_WAIT,
        help="before each timed run, wait up to this many seconds for the host's CPU to be "
             f"less than {_QUIET:.0%}% busy over {_QUIET_WINDOW} s (default {_QUIET_WAIT}; "
             "0: no wait)",
    )
    pairs.add_argument(
        "--crowded", type=float, default=_CROWDED,
        help="a round is not judged (another is run, up to twice --pairs in all) when the rest "
             f"of the host used more than this many CPUs during one of its runs (default "
             f"{_CROWDED}; inf: judge every round)",
    )
    pairs.add_argument(
        "--today", nargs="?", const=ISSUE_18_BASE, metavar="REV",
        help="judge the cold pack against the pack of the code at REV (default "
             f"{ISSUE_18_BASE}: before issue 18's fragments) instead of this code's pack "
             "without fragments; every contender packs in a server process "
             "(benchmarks/pack_server.py); needs git and REV in the history",
    )
    pairs.add_argument("--only-pairs", action="store_true",
                       help="only these rounds: no main table, no memory rows")
    pairs.add_argument("--pairs-json", type=Path,
                       help="write every round's runs here (for tuning the design)")
    pairs.add_argument(
        "--aa-table", action="store_true",
        help="tuning: in the main table, each cold-fragments contender replaced by a second "
             "copy of its 'into a store' one (the old design's A/A control)",
    )
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        _rss_child(*args.rss_child)
        return 0
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.pairs is None:
        args.pairs = _PAIRS_QUICK if args.quick else _PAIRS
    if args.quick:
        args.size_mb, args.rss_mb = min(args.size_mb, 60), min(args.rss_mb, 300)
    return in_work_dir(args.keep, "bench-pack-", lambda root: _run(root, args))


def in_work_dir(keep: Path | None, prefix: str, run: Callable[[Path], int]) -> int:
    """``run`` in ``keep`` (made if missing, left behind), else in a temporary directory.

    The temporary one is removed after, every directory in it made writable
    first so that none left read-only stops the removal.
    """
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return run(keep)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        try:
            return run(Path(tmp))
        finally:
            for dirpath, _dirs, _files in os.walk(tmp):
                Path(dirpath).chmod(0o755)


def closure_main(
    argv: Sequence[str] | None,
    doc: str | None,
    prefix: str,
    run: Callable[[Path, argparse.Namespace], int],
    more: Callable[[argparse.ArgumentParser], object] | None = None,
) -> int:
    """The command line of a benchmark on this corpus: ``--size-mb``, ``--quick``,
    ``--repeats``, ``--keep`` and what ``more`` adds; ``run(root, args)`` in
    :func:`in_work_dir`."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n", 1)[0])
    parser.add_argument("--size-mb", type=int, default=300, help="closure size (default 300)")
    parser.add_argument("--quick", action="store_true", help="60 MB closure")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each (best kept)")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the corpus here, keep it")
    if more is not None:
        more(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb = min(args.size_mb, 60)
    return in_work_dir(args.keep, prefix, lambda root: run(root, args))


def _run(root: Path, args: argparse.Namespace) -> int:
    print(f"building a {args.size_mb} MB closure under {root} ...", flush=True)
    start = time.perf_counter()
    paths = build_corpus(root, args.size_mb)
    content = sum(_tree_size(root / p.lstrip("/")) for p in paths)
    files = sum(len(f) for p in paths for _d, _s, f in os.walk(root / p.lstrip("/")))
    print(
        f"  {len(paths)} store paths, {files} files and symlinks, {content / MB:.0f} MB, "
        f"built in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    options = ArchiveOptions()
    spec = options.compressor()
    print(f"  default options: gzip via {spec.library}, level {spec.level}")
    chunked = [ArchiveOptions(compression="estargz"), ArchiveOptions(compression="zstd-chunked")]
    if args.rss_only:
        big, rss = _memory(root, paths, args.rss_mb, options)
        print(_check("peak RSS, MB", rss["pack_vmhwm_kb"] / 1024, 150, below=True))
        if args.chunked_rss:
            _chunked_memory(root, big, chunked)
        return 0
    if args.only_pairs:
        _no_slower(root, paths, args, {})
        return 0
    tar_bytes = tar_size(root, paths)
    list_file = root / "paths.lst"
    list_file.write_bytes(b"".join(p.lstrip("/").encode() + b"\0" for p in paths))
    groups = [list(paths[i :: args.layers]) for i in range(args.layers)]
    size = -(-len(paths) // args.layers)
    regroups = [list(paths[i : i + size]) for i in range(0, len(paths), size)]
    # Fragments kept as ranges of the blobs of the layers packed first (written into a store).
    shutil.rmtree(root / "warm-blobs", ignore_errors=True)
    warm_blobs = FilesystemStore(root / "warm-blobs", durable=False)
    warm_cache = warm_fragments(root, groups, options, blobs=warm_blobs)
    contenders: list[tuple[str, Contender, int]] = [
        ("tar -c | wc -c  (read limit)", tool(root, list_file, None), tar_bytes),
        ("tar -c | pigz -p2 -6", tool(root, list_file, "pigz -p2 -6"), tar_bytes),
        ("ours, 1 layer", ours(root, [paths], options), tar_bytes),
        (f"ours, {args.layers} layers in threads", ours(root, groups, options), tar_bytes),
        _cold_or_copy(root, paths, options, "", copy=args.aa_table, tar_bytes=tar_bytes),
        (f"ours, regrouped {args.layers} layers",
         ours(root, regroups, options, warm_cache, read_from=warm_blobs), tar_bytes),
        ("ours, 1 layer into a store", ours(root, [paths], options,
                                            blobs=cold_blobs(root, "without")), tar_bytes),
        ("ours, 1 layer, cold copies", ours(root, [paths], options, cold_fragments(root, "-c"),
                                            blobs=cold_blobs(root, "copies"), mode="copy"),
         tar_bytes),
    ]
    for chunked_options in chunked:
        name = chunked_options.compression
        # Frames kept as ranges of the first layers' blobs, TOC parts as copies (as auto does).
        shutil.rmtree(root / f"warm-blobs-{name}", ignore_errors=True)
        chunked_blobs = FilesystemStore(root / f"warm-blobs-{name}", durable=False)
        contenders += [
            (f"ours {name}, 1 layer", ours(root, [paths], chunked_options), tar_bytes),
            (
                f"ours {name}, {args.layers} layers",
                ours(root, groups, chunked_options),
                tar_bytes,
            ),
            (
                f"ours {name}, regrouped {args.layers}",
                ours(root, regroups, chunked_options,
                     warm_fragments(root, groups, chunked_options, "-" + name,
                                    blobs=chunked_blobs),
                     read_from=chunked_blobs),
                tar_bytes,
            ),
            (f"ours {name}, into a store",
             ours(root, [paths], chunked_options, blobs=cold_blobs(root, f"{name}-without")),
             tar_bytes),
            _cold_or_copy(root, paths, chunked_options, name, copy=args.aa_table,
                          tar_bytes=tar_bytes),
        ]
    print(f"measuring, best of {args.repeats} ...", flush=True)
    results = measure(root, paths, contenders, args.repeats)
    remove_cold_fragments(root)
    if not args.quick:
        results += measure(root, paths, _variants(root, paths, tar_bytes), 3)
        results += measure(
            root, paths, [("tar -c | gzip -6", tool(root, list_file, "gzip -6"), tar_bytes)], 1
        )
    read, pigz, single, parallel, cold, regrouped, stored, copies = results[:8]
    chunked_results = results[8 : 8 + _CHUNKED_ROWS * len(chunked)]  # after the eight above
    print("\nthroughput = uncompressed tar bytes / wall time; size ratio against pigz -6:")
    print(f"  {'':<32} {'wall':>8} {'cpu':>12} {'rate':>11} {'output':>11}   size/pigz")
    for result in results:
        print(_row(result, pigz))
    best = max(single, parallel, key=lambda r: r.rate)
    ratios = [
        ("ours 1 layer / pigz -p2 -6 throughput", single.rate / pigz.rate),
        (f"ours {args.layers} layers / pigz -p2 -6 throughput", parallel.rate / pigz.rate),
        ("ours 1 layer / tar read throughput", single.rate / read.rate),
        (f"ours {args.layers} layers / tar read throughput", parallel.rate / read.rate),
        ("ours / pigz -6 output size", single.output_bytes / pigz.output_bytes),
        # CPU time does not depend on what else the machine runs.
        ("CPU: pigz -p2 -6 / ours 1 layer", pigz.cpu / single.cpu),
        ("CPU: ours 1 layer / tar read", single.cpu / read.cpu),
        # Both write their blob into a FilesystemStore: like with like.
        ("cold pack into fragments / into a store", cold.rate / stored.rate),
        ("  the same, median of the rounds' pairs", paired_rate_ratio(cold, stored)),
        ("CPU: cold into fragments / into a store", cold.cpu / stored.cpu),
        ("cold copies / into a store", copies.rate / stored.rate),
        ("CPU: cold copies / into a store", copies.cpu / stored.cpu),
        ("regrouped from fragments / tar read", regrouped.rate / read.rate),
        ("CPU: regrouped / ours 1 layer", regrouped.cpu / single.cpu),
    ]
    print("\nratios:")
    for label, value in ratios:
        print(f"  {label:<42} {value:6.3f}")
    big, rss = _memory(root, paths, args.rss_mb, options)
    print("\ntargets (default options):")
    print(_check("ours / pigz -p2 -6 throughput", best.rate / pigz.rate, 4.0))
    print(_check("ours / tar read throughput", best.rate / read.rate, 0.5))
    print(_check("ours / pigz -6 size", single.output_bytes / pigz.output_bytes, 1.10, below=True))
    print(_check("peak RSS, MB", rss["pack_vmhwm_kb"] / 1024, 150, below=True))
    print(_check("regrouped from fragments / tar read throughput",
                 regrouped.rate / read.rate, 0.5))
    main_table = {"gzip": _main_table_figures(cold, stored, args)}
    print(f"  ----  cold pack into fragments / without: {main_table['gzip']} "
          "(judged by the rounds below)")
    print(_check("regrouped output / pigz -6 size", regrouped.output_bytes / pigz.output_bytes,
                 1.10, below=True))
    print("\ntargets (file-granular formats, issue 17):")
    rows = [chunked_results[i : i + _CHUNKED_ROWS]
            for i in range(0, len(chunked_results), _CHUNKED_ROWS)]
    for options, (one, many, again, into_store, cold_chunked) in zip(chunked, rows, strict=True):
        name = options.compression
        fastest = max(one, many, key=lambda r: r.rate)
        size = one.output_bytes / pigz.output_bytes
        print(_check(f"{name} / pigz -p2 -6 throughput", fastest.rate / pigz.rate, 3.0))
        print(_check(f"{name} / pigz -6 size", size, 1.15, below=True))
        print(f"  ----  {name} regrouped from fragments / tar read throughput: "
              f"{again.rate / read.rate:.2f} (no target; CPU {again.cpu / one.cpu:.2f}x 1 layer)")
        main_table[name] = _main_table_figures(cold_chunked, into_store, args)
        print(f"  ----  {name} cold pack into fragments / without (issue 18): "
              f"{main_table[name]} (judged by the rounds below)")
    _no_slower(root, paths, args, main_table)
    if args.chunked_rss:
        _chunked_memory(root, big, chunked)
    return 0


#: Rows per chunked format: 1 layer, N layers, regrouped, 1 layer into a store, cold fragments.
_CHUNKED_ROWS = 5


def _cold_or_copy(
    root: Path, paths: Sequence[str], options: ArchiveOptions, name: str, *, copy: bool,
    tar_bytes: int,
) -> tuple[str, Contender, int]:
    """The main table's cold pack into fragments of ``options`` (``name`` "" for gzip); with
    ``copy``, a second pack into a store without fragments in its place (``--aa-table``)."""
    label = "ours, 1 layer," if not name else f"ours {name},"
    suffix = f"-{name}" if name else ""
    if copy:
        return (f"{label} A/A copy",
                ours(root, [paths], options, blobs=cold_blobs(root, f"aa{suffix}")), tar_bytes)
    return (f"{label} cold fragments",
            ours(root, [paths], options, cold_fragments(root, suffix),
                 blobs=cold_blobs(root, f"{name}-ranges" if name else "ranges")),
            tar_bytes)


def _main_table_figures(cold: Result, stored: Result, args: argparse.Namespace) -> str:
    """The main table's figures of a cold pack against one without: the median of its
    rounds' ratios, the ratio of the bests and of their CPU (with ``--aa-table``, of the A/A
    copy, and each round's ratio)."""
    text = (f"{'A/A copy ' if args.aa_table else ''}paired {paired_rate_ratio(cold, stored):.3f} "
            f"over {len(cold.runs)} rounds, best / best {cold.rate / stored.rate:.3f}, "
            f"CPU {cold.cpu / stored.cpu:.3f}x")
    if args.aa_table:
        text += " [" + " ".join(f"{b / a:.3f}" for a, b in zip(cold.runs, stored.runs,
                                                               strict=True)) + "]"
    return text


#: Rounds of the "no slower" measurement (chosen from A/A data, docs/performance.md).
_PAIRS = 36
_PAIRS_QUICK = 72
#: A host is quiet when less than this share of its CPU time was busy (anything but idle and
#: iowait, steal included) over the last _QUIET_WINDOW seconds.
_QUIET = 0.2
_QUIET_WINDOW = 0.1
#: See --quiet-wait, --pair-sync and --pair-warm (chosen from A/A data, docs/performance.md).
_QUIET_WAIT = 0.0
_SYNCS = ("written", "all", "none")
_SYNC = "written"
_WARMS = ("run", "round")
_WARM = "round"


#: See --crowded (chosen from A/A data, docs/performance.md).
_CROWDED = 0.25


def remove_stores(roots: Sequence[Path]) -> None:
    """Remove the store directories ``roots`` and write the removal back (``fsync`` of their
    parents), so that no timed run pays for it."""
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    for parent in {root.parent for root in roots}:
        fsync_dir(parent)


def sync_files(directories: Sequence[Path]) -> int:
    """Write back every file under ``directories`` and the directories themselves (``fsync``):
    what a run wrote, without the rest of the host's dirty pages (``os.sync``); the number of
    files and directories synced."""
    synced = 0
    for top in directories:
        for dirpath, _dirs, files in os.walk(top):
            for name in (*files, "."):
                full = Path(dirpath, name)
                try:
                    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:  # a symlink, or removed meanwhile: nothing of ours to write
                    continue
                try:
                    os.fsync(fd)
                    synced += 1
                finally:
                    os.close(fd)
    return synced


def host_cpu() -> float:
    """CPU seconds the whole host has been busy (all CPUs, steal included) since boot."""
    return _cpu_ticks()[0] / os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> tuple[int, int]:
    """Busy and total CPU ticks of the host so far (``/proc/stat``, all CPUs, steal busy)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def host_busy(window: float = _QUIET_WINDOW) -> float:
    """The share of the host's CPU time busy over the next ``window`` seconds (we sleep)."""
    busy, total = _cpu_ticks()
    time.sleep(window)
    busy_after, total_after = _cpu_ticks()
    return (busy_after - busy) / max(total_after - total, 1)


def wait_quiet(limit: float) -> float:
    """Wait up to ``limit`` seconds for a quiet host (:data:`_QUIET`); its last busy share."""
    if limit <= 0:
        return 0.0
    deadline = time.monotonic() + limit
    busy = host_busy()
    while busy >= _QUIET and time.monotonic() < deadline:
        busy = host_busy()
    return busy


#: Formats of the "no slower" measurement, as ArchiveOptions.compression.
_PAIR_FORMATS = ("gzip", "estargz", "zstd-chunked")


def _no_slower(
    root: Path, paths: Sequence[str], args: argparse.Namespace, main_table: dict[str, str]
) -> None:
    """Judge each format's cold pack against one without by rounds of three runs in the
    ``--pair-order`` (balanced by default) with an A/A control (:mod:`benchmarks.no_slower`),
    and print the verdicts."""
    if args.pairs < 1:
        return
    print(f"\nno slower: {args.pairs} rounds per format of cold / without / A/A copy, "
          f"order {args.pair_order}, rounds crowded by over {args.crowded} CPUs "
          f"re-run, "
          f"sync {args.pair_sync}, warm every {args.pair_warm}, quiet wait {args.quiet_wait} s; "
          f"load average "
          f"{os.getloadavg()[0]:.1f} ...", flush=True)
    # The stores and caches in a directory of this run's own: another run on a kept corpus
    # removes cold-blobs-* and cold-fragments-* under its root.
    work = no_slower_work_dir(root)
    try:
        dump = _rounds_of_formats(root, work, paths, args, main_table)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.pairs_json is not None:
        args.pairs_json.write_text(json.dumps(
            {"order": args.pair_order, "sync": args.pair_sync, "warm": args.pair_warm,
             "quiet_wait": args.quiet_wait, "aa_only": args.aa_only, "formats": dump},
            indent=1))


def no_slower_work_dir(root: Path) -> Path:
    """A new directory of this run's own under ``root`` (``no-slower-<pid>-*``), for the
    rounds' stores and caches; those a run stopped before its end left (its process gone)
    are removed first, hundreds of MB each on the 300 MB corpus.  Another live run's are
    kept."""
    for left in root.glob("no-slower-*-*"):
        pid = left.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"no-slower-{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _rounds_of_formats(
    root: Path, work: Path, paths: Sequence[str], args: argparse.Namespace,
    main_table: dict[str, str],
) -> dict[str, object]:
    """:func:`_no_slower`'s rounds and verdicts, stores and caches under ``work``; each
    format's rounds as ``--pairs-json`` writes them, with the untimed steps' seconds."""
    dump: dict[str, object] = {}
    for name in args.pair_formats:
        if args.today:
            dump[name] = _rounds_against(root, work, paths, args, name)
            continue
        options = ArchiveOptions(compression=name)
        contenders: dict[str, RoundContender] = {
            no_slower.WITHOUT: ours(root, [paths], options,
                                    blobs=cold_blobs(work, f"{name}-without")),
            no_slower.COPY: ours(root, [paths], options, blobs=cold_blobs(work, f"{name}-copy")),
            no_slower.COLD: ours(root, [paths], options, cold_fragments(work, f"-{name}"),
                                 blobs=cold_blobs(work, f"{name}-ranges")),
        }
        if args.aa_only:  # every run the same code: a third copy of without in cold's place
            contenders[no_slower.COLD] = ours(root, [paths], options,
                                              blobs=cold_blobs(work, f"{name}-third"))
        label = f"{name} (A/A/A: --aa-only)" if args.aa_only else name
        dump[name] = _judge(root, paths, args, contenders, label=label,
                            main_table=main_table.get(name, ""))
    return dump


def _judge(
    root: Path,
    paths: Sequence[str],
    args: argparse.Namespace,
    contenders: Mapping[str, RoundContender],
    *,
    label: str,
    cpu: Callable[[], float] = _cpu_all,
    baseline: str = no_slower.WITHOUT,
    main_table: str = "",
    tail: Callable[[], str] = str,
) -> dict[str, object]:
    """One format's rounds of ``contenders`` (after the untimed steps ``args`` asks for),
    their verdict printed (``baseline`` naming the ``without`` contender) with where the time
    went, and ``tail()`` at the end of that line; returned as ``--pairs-json`` dumps them."""
    steps = Steps()
    before = untimed_steps(contenders, lambda: warm(root, paths), steps,
                           warm_every=args.pair_warm, sync=args.pair_sync,
                           quiet_wait=args.quiet_wait)
    start = time.perf_counter()
    rounds = no_slower.run_rounds(contenders, args.pairs, scheme=args.pair_order,
                                  before=before, clock=time.perf_counter, cpu=cpu,
                                  host=host_cpu, crowded=args.crowded, most=2 * args.pairs)
    for line in no_slower.verdict_lines(label, rounds, main_table=main_table, baseline=baseline):
        print(line)
    took = time.perf_counter() - start
    timed = sum(run.seconds for runs in rounds.runs.values() for run in runs)
    print(f"          ({took:.0f} s, {len(rounds.kept)} rounds run: timed runs {timed:.1f} s, "
          f"{steps}; load average {os.getloadavg()[0]:.1f}{tail()})", flush=True)
    return {"orders": rounds.orders, "kept": rounds.kept, "load": os.getloadavg()[0],
            "seconds": took, "steps": steps.seconds, "each": steps.each,
            **{role: [attrs.asdict(run) for run in runs] for role, runs in rounds.runs.items()}}


def _rounds_against(
    root: Path, work: Path, paths: Sequence[str], args: argparse.Namespace, name: str
) -> dict[str, object]:
    """``--today``: one format's rounds of this code's cold pack into fragments against the
    pack of the code at ``args.today`` (and an A/A copy of that), each contender a server
    process (:class:`~benchmarks.remote_pack.RemotePack`), judged and dumped by
    :func:`_judge` with the blobs' digests each wrote."""
    old = export_revision(args.today, work)
    servers: dict[str, RemotePack] = {}
    try:
        for role, code, cold in ((no_slower.COLD, HERE, True), (no_slower.WITHOUT, old, False),
                                 (no_slower.COPY, old, False)):
            servers[role] = RemotePack(code, root, paths, compression=name,
                                       work=work / "runs", name=f"{name}-{role}", fragments=cold)

        def digest(role: str) -> object:
            return servers[role].last.get("digest")

        dump = _judge(
            root, paths, args, dict(servers), label=name,
            cpu=lambda: _cpu_all() + sum(server.cpu for server in servers.values()),
            baseline=f"the pack at {args.today}",
            tail=lambda: (f"; blobs: this code's {digest(no_slower.COLD)}, "
                          f"{args.today}'s {digest(no_slower.WITHOUT)}"),
        )
        return {"today": args.today, "digests": {role: digest(role) for role in servers},
                **dump}
    finally:
        for server in servers.values():
            server.close()


class RoundContender(Protocol):
    """What the untimed steps need of a contender of the rounds (``ours``, ``RemotePack``)."""

    #: Where the run prepared last writes its blob (``None``: nowhere kept).
    @property
    def store(self) -> _HasRoot | None: ...

    #: The directories the run prepared last writes into.
    writes: list[Path]

    def prepare(self) -> None: ...

    def __call__(self) -> object: ...


class _HasRoot(Protocol):
    @property
    def root(self) -> Path: ...


def untimed_steps(
    contenders: Mapping[str, RoundContender],
    warm_corpus: Callable[[], object],
    steps: Steps,
    *,
    warm_every: str,
    sync: str,
    quiet_wait: float,
) -> Callable[[str], float]:
    """The untimed steps before each timed run of a round of three (``no_slower.run_rounds``'s
    ``before``), each timed into ``steps``: the corpus read (``warm_every`` ``"run"``, or
    ``"round"``: before a round's first run only), what the earlier runs wrote written back
    (``sync`` ``"written"``; ``"all"``: ``os.sync()`` after the prepare), the contender
    prepared, Python's cyclic garbage collected (``gc.collect()``: a full collection, tens of
    ms in this process, otherwise lands in whichever run crosses its threshold, cold or not),
    and a wait of up to ``quiet_wait`` seconds for a quiet host (its last busy share
    returned).  At a round's start the stores the earlier rounds' runs wrote their blobs into
    are removed (100+ MB each on 300 MB: a run of 30 rounds would otherwise fill the disk),
    the removal written back before anything is timed; their fragment caches are kept."""
    runs = [0]
    per_round = len(contenders)  # a round runs each contender once
    stores: list[Path] = []

    def before(role: str) -> float:
        starts = runs[0] % per_round == 0
        if starts and stores:
            steps.time("remove", lambda: remove_stores(stores))
            stores.clear()
        if warm_every == "run" or starts:
            steps.time("warm", warm_corpus)
        runs[0] += 1
        if sync == "written":
            written = [d for contender in contenders.values() for d in contender.writes]
            steps.time("sync", lambda: sync_files(written))
            for contender in contenders.values():
                contender.writes = []
        steps.time("prepare", contenders[role].prepare)
        store = contenders[role].store
        if store is not None:
            stores.append(store.root)
        if sync == "all":
            steps.time("sync", os.sync)
        steps.time("collect", gc.collect)  # no run pays for the garbage of the runs before it
        return steps.time("quiet", lambda: wait_quiet(quiet_wait))

    return before


class Steps:
    """Seconds spent in each untimed step before the timed runs (warm, sync, prepare, collect,
    quiet), in all and each time (for tuning: how long a wait for quiet took, run by run)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.each: dict[str, list[float]] = {}

    def time(self, step: str, work: Callable[[], _T]) -> _T:
        start = time.perf_counter()
        try:
            return work()
        finally:
            took = time.perf_counter() - start
            self.seconds[step] = self.seconds.get(step, 0.0) + took
            self.each.setdefault(step, []).append(round(took, 4))

    def __str__(self) -> str:
        return ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.seconds.items())


def _memory(
    root: Path, paths: Sequence[str], rss_mb: int, options: ArchiveOptions
) -> tuple[list[str], dict[str, int]]:
    """Pack one layer of about ``rss_mb`` in a child process and print its peak RSS; the
    big layer's paths and the figures."""
    print(f"\nmemory: one layer of ~{rss_mb} MB packed in a child process ...", flush=True)
    big = replicate(root, paths, rss_mb)
    rss = measure_rss(root, big, options)
    print(
        f"  {len(big)} store paths, {rss['pack_file_bytes'] / MB:.0f} MB of files -> "
        f"{rss['pack_blob_bytes'] / MB:.0f} MB blob; peak RSS (VmHWM) "
        f"{rss['pack_vmhwm_kb'] / 1024:.0f} MB; interpreter + imports alone: "
        f"{rss['baseline_vmhwm_kb'] / 1024:.0f} MB"
    )
    return big, rss


def _chunked_memory(root: Path, big: Sequence[str], chunked: Sequence[ArchiveOptions]) -> None:
    """Print the peak RSS rows of the big layer packed in each chunked format."""
    for options in chunked:
        rss = measure_rss(root, big, options)
        name = options.compression
        print(_check(f"{name} peak RSS, MB (packing process)",
                     rss["pack_vmhwm_kb"] / 1024, 150, below=True))
        print(f"  ----  {name}: {rss['pack_file_bytes'] / MB:.0f} MB of files -> "
              f"{rss['pack_blob_bytes'] / MB:.0f} MB blob; its frame worker processes "
              f"peaked at {rss['pack_workers_vmhwm_kb'] / 1024:.0f} MB together (no target)")


def _variants(root: Path, paths: Sequence[str], tar_bytes: int) -> list[tuple[str, Contender, int]]:
    candidates = [
        ("isal level 1", ArchiveOptions(level=1, gzip_backend="isal")),
        ("isal level 2", ArchiveOptions(level=2, gzip_backend="isal")),
        ("zlib level 1", ArchiveOptions(level=1, gzip_backend="zlib")),
        ("zlib level 6", ArchiveOptions(level=6, gzip_backend="zlib")),
        ("zstd level 3", ArchiveOptions(compression="zstd")),
        ("none (tar + sha256)", ArchiveOptions(compression="none")),
    ]
    out: list[tuple[str, Contender, int]] = []
    for name, options in candidates:
        try:
            options.parameters()
        except ImportError as exc:
            print(f"  ({name}: {exc})")
            continue
        out.append((f"ours, {name}", ours(root, [paths], options), tar_bytes))
    return out


if __name__ == "__main__":
    sys.exit(main())
