"""The ``nixery-core`` command line (also ``python -m nixery_core``).

``build``, ``push``, ``gc``, ``verify`` and ``demo``.  Progress goes to stderr by stage;
the result (a layer table, a digest) to stdout.  Exit codes: 0 success,
1 build or storage failure, 2 bad input (invalid name, unknown packages,
missing source).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from nixery_core.archive import ArchiveOptions
from nixery_core.build import default_store, user_cache_dir
from nixery_core.builder import Builder
from nixery_core.cache import BuildCache
from nixery_core.display import build_result_table
from nixery_core.errors import InvalidInput, NixeryError, UnknownPackages
from nixery_core.expressions import NixExpression
from nixery_core.fragment_bucket import FragmentBucketPolicy
from nixery_core.image_config import ImageConfig, User
from nixery_core.names import AMD64, ARM64, Architecture, Image
from nixery_core.nixexprs import nix_dir
from nixery_core.oci_layout import write_oci_layout
from nixery_core.results import BuildResult, MultiArchResult, ProgressEvent
from nixery_core.sources import (
    GitSource,
    LocalPathSource,
    NixpkgsSource,
    PackageSource,
    source_from_env,
)
from nixery_core.storage.filesystem import FilesystemStore

__all__ = ["main"]

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def _progress(event: ProgressEvent) -> None:
    print(f"[{event.stage}] {event.message}", file=sys.stderr, flush=True)


def _source(args: argparse.Namespace) -> PackageSource:
    if args.pkgs_path:
        return LocalPathSource(Path(args.pkgs_path))
    if args.pkgs_repo:
        return GitSource(args.pkgs_repo)
    if args.channel:
        return NixpkgsSource(args.channel)
    return source_from_env()


def _store(args: argparse.Namespace) -> FilesystemStore:
    return FilesystemStore(Path(args.store)) if args.store else default_store()


def _cache(args: argparse.Namespace) -> BuildCache | None:
    if args.no_cache:
        return None
    directory = Path(args.cache) if args.cache else _default_cache_dir()
    bucket = FragmentBucketPolicy() if args.share_fragments else None
    return BuildCache(directory, fragment_bucket=bucket)


def _default_cache_dir() -> Path:
    return user_cache_dir() / "cache"


def _pairs(items: Sequence[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{option} takes KEY=VALUE, not {item!r}")
        pairs[key] = value
    return pairs


def _positive_int(raw: str) -> int:
    """An argparse type: a positive integer (argparse turns the error into exit 2)."""
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a positive integer")
    return int(raw)


def _nix_options(args: argparse.Namespace) -> dict[str, str]:
    options = _pairs(args.nix_option, "--nix-option")
    if args.offline:
        options["substituters"] = ""
    return options


def _archs(args: argparse.Namespace) -> tuple[Architecture, ...]:
    known = {arch.oci_arch: arch for arch in (AMD64, ARM64)}
    names = [name.strip() for name in (args.arch or "amd64").split(",")]
    unknown = [name for name in names if name not in known]
    if unknown or len(set(names)) != len(names):
        raise InvalidInput(f"--arch takes amd64 and/or arm64 (comma-separated), not {args.arch!r}")
    return tuple(known[name] for name in names)


def _config(args: argparse.Namespace) -> ImageConfig:
    user = User.from_spec(args.user) if args.user else None
    return ImageConfig(env=_pairs(args.env, "--env"), user=user, cmd=args.cmd or None)


def _expression(args: argparse.Namespace) -> NixExpression | None:
    if args.expr_file is None:
        if args.expr_attr is not None:
            raise InvalidInput("--expr-attr needs --expr-file")
        return None
    return NixExpression.from_file(Path(args.expr_file), args.expr_attr)


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="image name, e.g. shell/hello or shell/hello:latest")
    src = parser.add_argument_group("package source (default: NIXERY_* environment variables)")
    src.add_argument("--pkgs-path", help="a local package set directory (NIXERY_PKGS_PATH)")
    src.add_argument("--pkgs-repo", help="a git repository URL (NIXERY_PKGS_REPO)")
    src.add_argument("--channel", help="a nixpkgs channel or commit (NIXERY_CHANNEL)")
    parser.add_argument("--store", help="blob store directory (~/.cache/nixery-core/store)")
    parser.add_argument("--cache", help="local cache directory (~/.cache/nixery-core/cache)")
    parser.add_argument("--no-cache", action="store_true", help="build without the build cache")
    parser.add_argument(
        "--share-fragments", action="store_true",
        help="also keep compressed store paths in the store, for other hosts sharing it",
    )
    parser.add_argument("--format", choices=["oci", "docker"], default="oci")
    parser.add_argument(
        "--compression",
        choices=["gzip", "zstd", "none", "estargz", "zstd-chunked"],
        default="gzip",
        help="layer compression; estargz and zstd-chunked are file-granular (partial pulls)",
    )
    parser.add_argument("--arch", help="amd64 (default), arm64, or amd64,arm64 for an index")
    parser.add_argument("--user", help="run as NAME:UID:GID[:HOME]")
    parser.add_argument("--env", action="append", default=[], metavar="K=V")
    parser.add_argument("--cmd", nargs="+", help="the image's command")
    parser.add_argument("--timeout", type=float, default=600.0, help="Nix build timeout (s)")
    parser.add_argument("--offline", action="store_true", help="no binary caches")
    parser.add_argument("--nix-option", action="append", default=[], metavar="K=V")
    parser.add_argument("--expr-file", help="a trusted Nix file whose value joins the image")
    parser.add_argument("--expr-attr", help="the attribute path to take from --expr-file")


def _build(args: argparse.Namespace, store: FilesystemStore) -> BuildResult | MultiArchResult:
    """One image, or an index when --arch names several architectures."""
    image = Image.from_name(args.name)
    archs = _archs(args)
    cache = _cache(args)
    try:
        with Builder(
            uploader=store,
            cache=cache,
            archive=ArchiveOptions(compression=args.compression),
            timeout=args.timeout,
            nix_options=_nix_options(args),
            progress=_progress,
        ) as builder:
            config, expression = _config(args), _expression(args)
            if len(archs) > 1:
                return builder.build_multiarch(
                    image, _source(args), archs=archs, format=args.format, config=config,
                    expression=expression,
                )
            return builder.build(
                image.with_arch(archs[0]), _source(args), format=args.format, config=config,
                expression=expression,
            )
    finally:
        if cache is not None:
            cache.close()


def _manifest(result: BuildResult | MultiArchResult) -> tuple[bytes, str, str]:
    """(bytes, media type, digest) of what a registry or layout should point at."""
    if isinstance(result, MultiArchResult):
        return result.index, result.media_type, result.index_digest
    return result.manifest, result.manifest_media_type, result.manifest_digest


def _show(result: BuildResult | MultiArchResult) -> None:
    if isinstance(result, MultiArchResult):
        for arch, single in result.manifests.items():
            print(f"[{arch}]\n{build_result_table(single)}")
        print(f"index {result.index_digest} ({result.media_type})")
    else:
        print(build_result_table(result))


def cmd_build(args: argparse.Namespace) -> int:
    store = _store(args)
    result = _build(args, store)
    _show(result)
    if args.oci:
        manifest, media_type, _digest = _manifest(result)
        tag = result.image.tag
        write_oci_layout(Path(args.oci), store=store, manifest=manifest,
                         media_type=media_type, ref_name=tag)
        print(f"OCI layout: {args.oci} (ref {tag})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Build (or find in the cache) one image and push it to every target."""
    from nixery_core.push_command import push_targets  # noqa: PLC0415 - optional dependency

    store = _store(args)
    result = _build(args, store)
    manifest, media_type, _ = _manifest(result)
    push_targets(
        store, manifest, media_type, args.target, out=sys.stdout, insecure=args.insecure,
        mount_from=args.mount_from, jobs=args.jobs,
    )
    return 0


def cmd_sbom(args: argparse.Namespace) -> int:
    """Build (or find in the cache) one image and print or write its SBOM."""
    store = _store(args)
    if len(_archs(args)) > 1:
        raise InvalidInput("sbom takes one architecture at a time (--arch amd64 or arm64)")
    result = _build(args, store)
    if isinstance(result, MultiArchResult):  # not reached: one architecture
        raise InvalidInput("sbom takes one architecture at a time")
    document = result.sbom(store, args.sbom_format)
    if args.output:
        Path(args.output).write_bytes(document)
        print(f"{args.sbom_format} SBOM of {result.manifest_digest}: {args.output}",
              file=sys.stderr)
    else:
        sys.stdout.buffer.write(document + b"\n")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from nixery_core.gc import collect_garbage  # noqa: PLC0415

    store = _store(args)
    local = Path(args.cache) / "fragments" if args.cache else None
    if local is None or args.dry_run or not local.is_dir():
        report = collect_garbage(
            store, grace_seconds=args.grace, dry_run=args.dry_run,
            fragment_grace_seconds=args.fragment_grace,
        )
        print(report)
        if local is not None:
            _sweep_fragments(local, dry_run=args.dry_run)
        return 0
    from nixery_core.fragments import FragmentCache  # noqa: PLC0415

    with FragmentCache(local) as fragments:  # opening it sweeps files left by killed processes
        report = collect_garbage(
            store, grace_seconds=args.grace, fragment_grace_seconds=args.fragment_grace,
            fragments=fragments,
        )
        print(report)
        fragments.sweep()
        print(f"removed {fragments.swept} stray fragment files in {local}")
    return 0


def _sweep_fragments(directory: Path, *, dry_run: bool) -> None:
    """Remove fragment files left by killed processes (opening the cache already does)."""
    from nixery_core.fragments import FragmentCache  # noqa: PLC0415

    if not directory.is_dir():
        return
    if dry_run:  # opening the cache would sweep: look without opening it
        print(f"fragment files in {directory} not swept in a dry run")
        return
    with FragmentCache(directory) as fragments:
        fragments.sweep()
        print(f"removed {fragments.swept} stray fragment files in {directory}")


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every blob; exit 1 when any is corrupt (removed too with --repair)."""
    from nixery_core.verify import verify_store  # noqa: PLC0415

    directory = Path(args.cache) if args.cache else _default_cache_dir()
    cache = BuildCache(directory) if directory.is_dir() else None
    try:
        report = verify_store(_store(args), repair=args.repair, cache=cache)
    finally:
        if cache is not None:
            cache.close()
    print(report)
    return 0 if report.ok else EXIT_FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    """Build shell/hello from the bundled package set, show it, run hello from it."""
    # A fixed default directory: a second run shows the cache at work (layers reused).
    work = Path(args.workdir) if args.workdir else _default_cache_dir().parent / "demo"
    work.mkdir(parents=True, exist_ok=True)
    store = FilesystemStore(work / "store")
    image = Image.from_name("shell/hello")
    with (
        BuildCache(work / "cache") as cache,
        Builder(
            uploader=store, cache=cache, nix_options={"substituters": ""}, progress=_progress
        ) as builder,
    ):
        result = builder.build(image, LocalPathSource(nix_dir() / "offline"))
    print(build_result_table(result))
    layout = work / "oci"
    write_oci_layout(layout, store=store, manifest=result.manifest,
                     media_type=result.manifest_media_type, ref_name="latest")
    print(f"\nOCI layout written to {layout}")
    if shutil.which("skopeo"):
        inspect = subprocess.run(
            ["skopeo", "inspect", f"oci:{layout}:latest"], capture_output=True, text=True,
            check=True,
        )
        info = json.loads(inspect.stdout)
        print(f"skopeo inspect oci:{layout}:latest -> {info['Digest']}, "
              f"{info['Os']}/{info['Architecture']}, {len(info['Layers'])} layers")
    if shutil.which("umoci") and os.geteuid() == 0:
        bundle = work / "bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)],
                       check=True, capture_output=True)
        rootfs = bundle / "rootfs"
        for argv in (["/bin/hello"], ["/bin/bash", "-c", "echo ok from bash in the image"]):
            ran = subprocess.run(["chroot", str(rootfs), *argv], capture_output=True, text=True,
                                 check=True)
            print(f"$ {' '.join(argv)}\n{ran.stdout.rstrip()}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="nixery-core", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build an image from Nix package names")
    _add_build_options(build)
    build.add_argument("--oci", help="also write an OCI image layout to this directory")
    build.set_defaults(func=cmd_build)

    push = sub.add_parser("push", help="build an image and push it to an OCI registry")
    _add_build_options(push)
    push.add_argument(
        "target", nargs="+",
        help="[docker://]HOST[:PORT]/REPO[:TAG] (tag latest by default); several targets "
        "share what was pushed, so a second repository mounts instead of uploading",
    )
    push.add_argument("--insecure", action="store_true", help="plain HTTP (loopback only)")
    push.add_argument(
        "--mount-from", metavar="REPO",
        help="mount blobs the target lacks from this repository of the same registry",
    )
    push.add_argument(
        "--jobs", type=_positive_int, default=4, metavar="N",
        help="blobs pushed at once (default 4; 1 pushes one after another)",
    )
    push.set_defaults(func=cmd_push)

    sbom = sub.add_parser("sbom", help="build an image and print its SBOM (SPDX or CycloneDX)")
    _add_build_options(sbom)
    sbom.add_argument("--sbom-format", choices=["spdx", "cyclonedx"], default="spdx",
                      help="SPDX 2.3 JSON (default) or CycloneDX 1.5 JSON")
    sbom.add_argument("-o", "--output", help="write the document to this file, not stdout")
    sbom.set_defaults(func=cmd_sbom)

    gc = sub.add_parser("gc", help="delete blobs no cached manifest or build names")
    gc.add_argument("--store", help="blob store directory")
    gc.add_argument(
        "--grace", type=float, default=86400.0,
        help="keep blobs younger than this (seconds); uploads in progress are kept for at "
        "least 6 hours whatever the grace",
    )
    gc.add_argument(
        "--fragment-grace", type=float, default=None, metavar="SECONDS",
        help="keep shared store-path fragments unused for less than this (default: --grace)",
    )
    gc.add_argument(
        "--cache", help="local cache directory whose stray fragment files to remove too",
    )
    gc.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    gc.set_defaults(func=cmd_gc)

    verify = sub.add_parser("verify", help="re-hash every blob and report corrupt ones")
    verify.add_argument("--store", help="blob store directory")
    verify.add_argument("--cache", help="local cache directory whose entries to repair too")
    verify.add_argument("--repair", action="store_true",
                        help="remove corrupt blobs and the cache entries naming them")
    verify.set_defaults(func=cmd_verify)

    demo = sub.add_parser("demo", help="build shell/hello from the bundled set and run it")
    demo.add_argument("--workdir", help="where to keep the store, cache and layout "
                      "(default: ~/.cache/nixery-core/demo)")
    demo.set_defaults(func=cmd_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except UnknownPackages as exc:
        print(f"error: unknown packages: {', '.join(exc.packages)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except InvalidInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NixeryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code
