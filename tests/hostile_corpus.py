"""Hostile input as data: names, tags, digests, package names, object keys and URL paths.

Every sample is a :class:`Sample` (the value and why it is hostile).  The
lists say nothing about the expected outcome; each consumer states its own
rule (the image-name grammar, "every digest here is refused", "an accepted
package name must reach Nix as data").  Reuse them in any test that takes
input from outside: ``tests/test_hostile_input.py`` for the library, the
registry example's routing tests later.

Families: path traversal (``..``, ``%2e%2e``, absolute paths, backslashes),
case, Unicode (look-alikes, fullwidth, RTL override, zero-width, characters
whose lower case is ASCII), empty components, very long values, NUL and
control bytes, shell metacharacters, Nix syntax, option-looking values,
JSON that imitates Nix's structured error, and URL-ish strings.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = [
    "DIGESTS",
    "IMAGE_NAMES",
    "OBJECT_KEYS",
    "PACKAGE_NAMES",
    "PAYLOADS",
    "TAGS",
    "URL_PATHS",
    "Sample",
    "ids",
]


@attrs.frozen
class Sample:
    """One hostile value and the reason it is in the corpus."""

    value: str
    why: str


def _samples(why: str, values: Iterable[str]) -> list[Sample]:
    return [Sample(value, why) for value in values]


HEX = "0123456789abcdef" * 4

#: Payloads that are hostile wherever a name goes: names, tags, package names, keys.
PAYLOADS: tuple[Sample, ...] = tuple(
    _samples(
        "path traversal",
        [
            "..",
            ".",
            "../",
            "../../etc/passwd",
            "a/../../b",
            "./a",
            "....//....//etc",
            "%2e%2e",
            "%2e%2e%2f%2e%2e%2fetc",
            "..%2f..%2fetc",
            "%252e%252e",
            "..\\..\\windows\\win.ini",
            "/etc/passwd",
            "/",
            "~root/.ssh",
            "file:///etc/passwd",
            "/nix/store/../../etc/shadow",
        ],
    )
    + _samples("upper case", ["Git", "HELLO", "sHeLl", "ARM64", "bashInteractive"])
    + _samples(
        "unicode",
        [
            "gït",
            "\uff47\uff49\uff54",  # fullwidth "git"
            "g\u0456t",  # Cyrillic i
            "git\u202egnp.exe",  # right-to-left override
            "\u200bgit",  # zero-width space
            "git\ufeff",  # byte order mark
            "\U0001d420\U0001d422\U0001d42d",  # mathematical bold "git"
            "\u0661\u0662\u0663",  # Arabic-Indic digits (\d, not [0-9])
            "\u212aey",  # Kelvin sign: lower() is ASCII "k"
            "\u0130nstall",  # Turkish dotted I: lower() is two code points
            "stra\u00dfe",
            "\u2024\u2024/etc",  # one-dot leaders look like ".."
            "\ud800",  # a lone surrogate (not encodable as UTF-8)
        ],
    )
    + _samples("empty components", ["", " ", "a//b", "a/", "/a", "a/ /b", "//", "a/./b"])
    + _samples(
        "very long",
        ["a" * 256, "a" * 300, "a" * 10_000, "a/" * 200 + "a", "a-" * 200 + "a", "." * 300],
    )
    + _samples(
        "NUL and control bytes",
        [
            "git\x00",
            "\x00",
            "git\x00/../../etc",
            "git\nhtop",
            "git\r\nX-Injected: 1",
            "git\t",
            "\x1b[31mred\x1b[0m",
            "git\x7f",
            "git\x0b",
            "\x08\x08\x08\x08root",
        ],
    )
    + _samples(
        "shell metacharacters",
        [
            "git;rm -rf /",
            "$(id)",
            "`id`",
            "git|sh",
            "git&&id",
            "git>out",
            "<in",
            "'",
            '"',
            "*",
            "?",
            "git #comment",
            "${IFS}",
            "!!",
            "git&",
        ],
    )
    + _samples(
        "Nix syntax",
        [
            '${builtins.abort "x"}',
            '"; builtins.abort "pwned',
            "''",
            "''${builtins.abort \"x\"}",
            "\\",
            "#",
            "/*",
            "builtins.abort",
            "import /etc/passwd",
            "<nixpkgs>",
            '(abort "x")',
            "x: x",
            "rec { }",
            "let a = 1; in a",
            "with import <nixpkgs> {}; hello",
            "${",
            "}",
        ],
    )
    + _samples("option-looking", ["--option", "-I", "--arg", "-E", "--expr", "-", "--", "-e"])
    + _samples(
        "imitates structured output",
        ['{"error":"not_found","pkgs":["x"]}', '\n{"error": "not_found"}', "null", "[]"],
    )
    + _samples(
        "URL-ish",
        ["docker://evil/x", "http://evil/x", "git@evil:x", "sha256:abc", "a?b=c", "a#frag"],
    )
)

#: Registry image names (the path before ``/manifests/``), plus ``name:tag`` forms.
IMAGE_NAMES: tuple[Sample, ...] = PAYLOADS + tuple(
    _samples(
        "name:tag splitting",
        [
            "git:../../x",
            "git:latest:extra",
            "git:",
            ":latest",
            "git@sha256:" + HEX,
            "git:" + "a" * 200,
        ],
    )
    + _samples(
        "grammar edges",
        [
            "a--b",
            "a___b",
            "a..b",
            "a._b",
            "-a",
            "a-",
            "_a",
            "a.",
            "shell/shell",
            "arm64/arm64/shell",
            "git/git/git",
            "a" * 255,
            ("a" * 50 + "/") * 5 + "a" * 5,
        ],
    )
)

#: Tags (the reference after ``:``).
TAGS: tuple[Sample, ...] = PAYLOADS + tuple(
    _samples(
        "tag edges",
        ["a" * 128, "a" * 129, ".hidden", "-flag", "latest\n", "v1.0+build", HEX, "LATEST"],
    )
)

#: Digests; every one of these is malformed.
DIGESTS: tuple[Sample, ...] = tuple(
    _samples("payload after sha256:", ["sha256:" + s.value for s in PAYLOADS])
    + _samples(
        "near miss",
        [
            "sha256:" + HEX.upper(),
            "sha256:" + HEX[:63],
            "sha256:" + HEX + "0",
            "sha256:" + HEX + "\n",
            " sha256:" + HEX,
            "sha256: " + HEX[:63],
            "SHA256:" + HEX,
            "sha512:" + HEX + HEX,
            "md5:" + HEX[:32],
            HEX,
            "sha256:",
            "sha256:" + HEX[:62] + "\u0661\u0662",
            "sha256:" + HEX[:63] + "g",
            "sha256:" + HEX[:60] + "/../",
            "sha256:" + HEX[:63] + "\x00",
            "sha256:" + "\uff10" * 64,  # fullwidth zeros
            "sha256::" + HEX,
            "sha256/" + HEX,
            "sha256:" + HEX + "/../../etc/passwd",
        ],
    )
)

#: Package names given by code (Image.from_packages); the ones it accepts go to Nix.
#: Upper-case names are left out on purpose: Nix name lookup retries case-insensitively,
#: so ``HELLO`` legitimately resolves to ``hello``.
PACKAGE_NAMES: tuple[Sample, ...] = tuple(
    s for s in PAYLOADS if s.why != "upper case"
) + tuple(
    _samples(
        "Nix code that leaves a trace if evaluated",
        [
            '${builtins.trace "CANARY-interpolation" "x"}',
            '"; builtins.trace "CANARY-string-break" "x',
            "'' + builtins.trace \"CANARY-indented\" \"\" + ''",
            '" + (builtins.trace "CANARY-concat" "") + "',
            "hello.${builtins.trace \"CANARY-attr\" \"x\"}",
        ],
    )
    + _samples(
        "attribute paths that are not packages",
        ["lib", "hello..x", ".hello", "hello.", "hello.outPath", "builtins", "pkgs.hello"],
    )
)

#: Object keys for stores (``manifests/<key>``-style).
OBJECT_KEYS: tuple[Sample, ...] = PAYLOADS + tuple(
    _samples(
        "store layout",
        [
            "layers/" + HEX,
            "staging/x",
            "layers",
            "staging",
            "manifests/../layers/" + HEX,
            "manifests/",
            "/manifests/x",
            "manifests//x",
            "manifests/.",
            "manifests/..",
            "manifests/x\x00",
            "manifests/" + "a" * 600,
            "a" * 513,
            "manifests/%2e%2e/x",
            "manifests\\..\\x",
        ],
    )
)

#: URL paths a registry front end may receive (for routing tests).
URL_PATHS: tuple[Sample, ...] = tuple(
    _samples(
        "registry routing",
        [
            "/v2/../../etc/passwd",
            "/v2/%2e%2e/%2e%2e/etc/passwd/manifests/latest",
            "/v2/git/manifests/../../../etc",
            "/v2//manifests/latest",
            "/v2/git/blobs/sha256:../../etc",
            "/v2/git/blobs/sha256:" + HEX.upper(),
            "/v2/Git/manifests/latest",
            "/v2/git/manifests/" + "a" * 10_000,
            "/v2/git%00/manifests/latest",
            "/v2/git/manifests/latest%0d%0aX-Injected:%201",
            "/v2/${builtins.abort%20%22x%22}/manifests/latest",
        ],
    )
)


def ids(samples: Iterable[Sample]) -> list[str]:
    """Readable, unique, ASCII pytest ids: ``012-path-traversal``."""
    return [f"{i:03d}-{s.why.replace(' ', '-')}" for i, s in enumerate(samples)]
