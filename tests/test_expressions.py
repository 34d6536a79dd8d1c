"""Nix expressions as image content (trusted callers only), with real Nix, umoci and runc.

``build_image(..., expression=...)`` evaluates Nix source against the
package set; its outputs join the image.  Image names never reach it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import attrs
import pytest
from conftest import OFFLINE_SET
from containers import run_in_bundle, unpack

from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.errors import InvalidInput, NixBuildFailed, NixError
from nixery_core.expressions import NixExpression
from nixery_core.names import Image
from nixery_core.oci_layout import write_oci_layout
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.runners import RecordingRunner

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix")]

SOURCE = LocalPathSource(OFFLINE_SET)
NIX_OPTIONS = {"substituters": ""}
HELLO = "pkgs: [ pkgs.hello ]"
#: A program that exists nowhere in the package set: made by the expression itself.
GREETER = r"""pkgs: [
  (derivation {
    name = "greeter";
    system = pkgs.busybox.system;
    builder = "${pkgs.busybox}/bin/sh";
    args = [ "-c" ''
      mkdir -p $out/bin
      printf '#!${pkgs.busybox}/bin/sh\necho "greetings from an expression"\n' > $out/bin/greeter
      chmod 0555 $out/bin/greeter
    '' ];
  })
]"""


def _build(
    store: FilesystemStore,
    expression: str | NixExpression | None,
    *,
    cache: BuildCache | None = None,
    runner: RecordingRunner | None = None,
    image: Image | None = None,
) -> BuildResult:
    return build_image(
        image if image is not None else Image.from_packages([]), SOURCE, uploader=store,
        cache=cache, expression=expression, nix_options=NIX_OPTIONS,
        runner=runner if runner is not None else SubprocessRunner(),
    )


def _run(store: FilesystemStore, result: BuildResult, args: list[str], tmp_path: Path) -> str:
    layout = tmp_path / "oci"
    write_oci_layout(
        layout, store=store, manifest=result.manifest, ref_name="latest",
        media_type=result.manifest_media_type,
    )
    bundle = unpack(layout, "latest", tmp_path / "bundle")
    ran = run_in_bundle(bundle, args, state=tmp_path / "state")
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


@pytest.mark.tools
def test_expression_image_runs_hello(tmp_path: Path) -> None:
    """An image with no package names and ``pkgs: [ pkgs.hello ]`` runs hello under runc."""
    store = FilesystemStore(tmp_path / "store")
    result = _build(store, HELLO)
    assert any("hello" in layer.packages for layer in result.layers)
    assert _run(store, result, ["hello"], tmp_path) == "Hello, world!\n"


@pytest.mark.tools
def test_expression_builds_and_ships_a_new_program(tmp_path: Path) -> None:
    """A derivation written in the expression is built by Nix and runs from the image."""
    store = FilesystemStore(tmp_path / "store")
    result = _build(store, GREETER)
    assert any("greeter" in layer.packages for layer in result.layers)
    out = _run(store, result, ["greeter"], tmp_path)
    assert out == "greetings from an expression\n"


def test_expression_text_is_part_of_the_cache_key(tmp_path: Path) -> None:
    """Two expressions give two keys and manifests; the same one again is a hit without Nix."""
    store = FilesystemStore(tmp_path / "store")
    with BuildCache(tmp_path / "cache") as cache:
        hello = _build(store, HELLO, cache=cache)
        greeter = _build(store, GREETER, cache=cache)
        plain = _build(store, None, cache=cache)
        runner = RecordingRunner(SubprocessRunner())
        again = _build(store, HELLO, cache=cache, runner=runner)
        spaced = _build(store, HELLO.replace("[ ", "[  "), cache=cache)
    assert len({hello.cache_key, greeter.cache_key, plain.cache_key}) == 3
    assert len({hello.manifest_digest, greeter.manifest_digest, plain.manifest_digest}) == 3
    assert again.from_cache
    assert runner.calls == []
    assert (again.cache_key, again.manifest) == (hello.cache_key, hello.manifest)
    # The key is over the text: a white-space change is another key, the same image.
    assert not spaced.from_cache
    assert spaced.cache_key != hello.cache_key
    assert spaced.manifest_digest == hello.manifest_digest


def test_image_names_never_carry_an_expression(tmp_path: Path) -> None:
    """Nothing in Image holds Nix source, build_image defaults to none, names pass none to Nix."""
    assert inspect.signature(build_image).parameters["expression"].default is None
    assert not any("expr" in name for name in attrs.fields_dict(Image))
    runner = RecordingRunner(SubprocessRunner())
    _build(
        FilesystemStore(tmp_path / "store"), None, runner=runner,
        image=Image.from_name("shell/hello"),
    )
    assert runner.calls
    for call in runner.calls:
        assert "expr" not in call.argv
        assert not any(arg.startswith("pkgs:") for arg in call.argv)


@pytest.mark.parametrize(
    ("expression", "nix_says"),
    [
        ("pkgs: [ pkgs.hello", "syntax error"),
        ("pkgs: [ pkgs.nosuchpackage ]", "attribute 'nosuchpackage' missing"),
        ('pkgs: [ (throw "expression says no") ]', "expression says no"),
        ("pkgs: 42", "must give a derivation, a list or an attribute set"),
    ],
)
def test_bad_expression_is_a_typed_nix_error(
    tmp_path: Path, expression: str, nix_says: str
) -> None:
    """A broken expression raises NixBuildFailed with Nix's message; nothing is stored."""
    store = FilesystemStore(tmp_path / "store")
    with pytest.raises(NixBuildFailed) as caught:
        _build(store, expression)
    assert isinstance(caught.value, NixError)
    assert nix_says in caught.value.stderr_tail
    assert list(store.list_blobs()) == []


def test_file_and_attribute_expression_runs_and_is_keyed_by_content(tmp_path: Path) -> None:
    """A file + attribute expression builds; editing the file (or a neighbour) changes the key."""
    tools = tmp_path / "exprs" / "tools.nix"
    tools.parent.mkdir()
    tools.write_text("pkgs: { sets = { small = [ pkgs.hello ]; }; }\n")
    store = FilesystemStore(tmp_path / "store")
    with BuildCache(tmp_path / "cache") as cache:
        first = _build(store, NixExpression.from_file(tools, "sets.small"), cache=cache)
        assert any("hello" in layer.packages for layer in first.layers)
        again = _build(store, NixExpression.from_file(tools, "sets.small"), cache=cache)
        assert again.from_cache
        tools.write_text("pkgs: { sets = { small = [ pkgs.hello pkgs.nano ]; }; }\n")
        edited = _build(store, NixExpression.from_file(tools, "sets.small"), cache=cache)
        assert not edited.from_cache
        assert any("nano" in layer.packages for layer in edited.layers)
    assert edited.cache_key != first.cache_key
    before = NixExpression.from_file(tools, "sets.small").key
    (tools.parent / "helper.nix").write_text("{ }\n")  # a neighbour it could import
    assert NixExpression.from_file(tools, "sets.small").key != before
    assert NixExpression.from_file(tools, "sets").key != NixExpression.from_file(tools).key


def test_file_expression_runs_its_program(tmp_path: Path) -> None:
    """An image whose content comes from a file's attribute runs that program under runc."""
    tools = tmp_path / "tools.nix"
    tools.write_text("pkgs: { greeting = [ pkgs.hello ]; }\n")
    store = FilesystemStore(tmp_path / "store")
    result = _build(store, NixExpression.from_file(tools, "greeting"))
    assert _run(store, result, ["hello"], tmp_path) == "Hello, world!\n"


@pytest.mark.parametrize("attribute", ["a..b", "x; builtins.abort 1", "${x}", "", ".a"])
def test_file_expression_rejects_bad_attribute_paths(tmp_path: Path, attribute: str) -> None:
    """An attribute path that is not dotted identifiers is refused before Nix sees it."""
    tools = tmp_path / "tools.nix"
    tools.write_text("{ }\n")
    with pytest.raises(InvalidInput):
        NixExpression.from_file(tools, attribute)


def test_file_expression_needs_an_existing_file(tmp_path: Path) -> None:
    """A missing expression file is a typed error naming it."""
    with pytest.raises(InvalidInput, match="does not exist"):
        NixExpression.from_file(tmp_path / "nowhere.nix")
