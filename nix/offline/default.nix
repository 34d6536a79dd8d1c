# An offline, nixpkgs-style package set built from the host's static busybox:
# no network, no stdenv, builds in milliseconds.  Tests and demos use it as a
# LocalPathSource (`import ./nix/offline { system = "aarch64-linux"; }`).
#
# Packages an image needs:
#   busybox, bashInteractive (bin/bash, bin/sh), coreutils (incl. bin/env),
#   moreutils (sponge, ts, ifne), nano (busybox vi), hello (prints
#   "Hello, world!"), cacert (etc/ssl/certs/ca-bundle.crt, the host's bundle),
#   iana-etc (etc/protocols, etc/services).
# Versioned packages (SBOM examples: a `pname-version` derivation name, and
# `pname`, `version` and `meta` as nixpkgs gives them):
#   openssl (3.0.13), openssl_1_1 (1.1.1w), curl (8.4.0, references openssl),
#   socat (1.7.4.4, references openssl_1_1).
# `meta` (description, homepage, license in nixpkgs' `lib.licenses` shape) is
# added with `//`, which leaves the derivation and its store path alone; it
# says what nixpkgs says of the real package each stand-in is named after.
# Name-resolution cases:
#   xorg.xev, xorg.libX11          nested, reached with a dot (xorg.libx11 too)
#   camelCase                      reached as `camelcase`
#   haskellPackages.ShellCheck     reached as `haskellpackages.shellcheck`
#   _1password                     reached as `1password`
#   lib                            an attribute set, not a package (unknown)
#   removed-alias                  throws when forced, like a removed alias (unknown)
#   aborting-alias                 aborts when forced (uncatchable by tryEval; unknown)
#   recursive-alias                infinite recursion when forced (uncatchable; unknown)
#   overflowing-alias              overflows Nix's stack when forced (uncatchable; unknown)
# Content cases (one package each, for packers):
#   edge-cases     hard links, paths and names longer than 100 bytes, relative,
#                  absolute (in and outside the store), dangling, looping and
#                  directory symlinks, empty directories and files, executable
#                  and plain files, spaces and UTF-8 in names, a reference to
#                  another store path inside a file.
#   multiout       outputs "out" (default) and "man" (reach it as multiout.man)
# Failure cases:
#   broken-build   its builder exits 3
#   broken-eval    its derivation throws when instantiated
#   slow           its builder never finishes while its Nix lives (timeouts)
#
# Arguments:
#   system       the derivations' system (default: the evaluating host's)
#   busyboxDir   directory holding a static `busybox` (default /usr/bin)
#   caBundle     host CA bundle copied into cacert (a stand-in when missing)
#   salt         a string added to every derivation (fresh paths for cold
#                benchmarks); empty by default
# The aarch64-linux set carries the host's (x86_64) busybox; see lib.nix.
{ system ? builtins.currentSystem
, busyboxDir ? /usr/bin
, caBundle ? /etc/ssl/certs/ca-certificates.crt
, salt ? ""
, ...
}:
let
  inherit (import ./lib.nix { inherit system busyboxDir salt; }) mk busybox;

  sh = "${busybox}/bin/sh";

  # A package holding executable scripts: { name = "text"; } -> bin/<name>.
  # Script i (in sorted name order) travels in the variable script_<i>.
  scripts = name: files:
    let names = builtins.attrNames files; in
    mk name ''
      mkdir -p $out/bin
      i=0
      for f in $scriptNames; do
        eval "printf '%s' \"\$script_$i\"" > "$out/bin/$f"
        chmod 0555 "$out/bin/$f"
        i=$((i + 1))
      done
    '' ({ scriptNames = names; }
        // builtins.listToAttrs (builtins.genList
          (i: { name = "script_" + toString i; value = files.${builtins.elemAt names i}; })
          (builtins.length names)));

  # Symlinks bin/<applet> -> <busybox>/bin/busybox (absolute, into another store path).
  applets = name: list: mk name ''
    mkdir -p $out/bin
    for a in $applets; do ln -s ${busybox}/bin/busybox "$out/bin/$a"; done
  '' { applets = list; };

  caText =
    if builtins.pathExists caBundle then builtins.readFile caBundle
    else "# nixery offline set: the host has no CA bundle at ${toString caBundle}\n";

  repeat = n: s: builtins.concatStringsSep "" (builtins.genList (_: s) n);

  # nixpkgs' lib.licenses entries used below (same attribute names).
  licenses = {
    gpl2Plus = { spdxId = "GPL-2.0-or-later"; fullName = "GNU General Public License v2.0 or later"; url = "https://spdx.org/licenses/GPL-2.0-or-later.html"; free = true; };
    gpl2Only = { spdxId = "GPL-2.0-only"; fullName = "GNU General Public License v2.0 only"; url = "https://spdx.org/licenses/GPL-2.0-only.html"; free = true; };
    gpl3Plus = { spdxId = "GPL-3.0-or-later"; fullName = "GNU General Public License v3.0 or later"; url = "https://spdx.org/licenses/GPL-3.0-or-later.html"; free = true; };
    asl20 = { spdxId = "Apache-2.0"; fullName = "Apache License 2.0"; url = "https://spdx.org/licenses/Apache-2.0.html"; free = true; };
    openssl = { spdxId = "OpenSSL"; fullName = "OpenSSL License"; url = "https://spdx.org/licenses/OpenSSL.html"; free = true; };
    curl = { spdxId = "curl"; fullName = "curl License"; url = "https://spdx.org/licenses/curl.html"; free = true; };
    mpl20 = { spdxId = "MPL-2.0"; fullName = "Mozilla Public License 2.0"; url = "https://spdx.org/licenses/MPL-2.0.html"; free = true; };
    mit = { spdxId = "MIT"; fullName = "MIT License"; url = "https://spdx.org/licenses/MIT.html"; free = true; };
  };
  # Metadata on a derivation without changing it (drvPath, outPath stay).
  withMeta = drv: meta: drv // { inherit meta; };

  # A versioned stand-in: `<pname>-<version>` store path holding a marker file
  # and, for each dependency, a file naming it (which makes it a reference).
  versioned = pname: version: deps: meta:
    (mk "${pname}-${version}" ''
      mkdir -p $out/share/${pname} $out/bin
      printf '%s %s (offline stand-in)\n' ${pname} ${version} > $out/share/${pname}/VERSION
      for d in $deps; do printf '%s\n' "$d" >> $out/share/${pname}/depends; done
      printf '#!%s\necho "%s %s (offline stand-in)"\n' ${sh} ${pname} ${version} > $out/bin/${pname}
      chmod 0555 $out/bin/${pname}
    '' { inherit deps; }) // { inherit pname version meta; };

  base = {
    busybox = withMeta busybox {
      description = "Tiny versions of common UNIX utilities in a single small executable";
      homepage = "https://busybox.net/";
      license = licenses.gpl2Only;
    };

    bashInteractive = mk "bash-interactive" ''
      mkdir -p $out/bin
      ln -s ${busybox}/bin/busybox $out/bin/sh
      printf '#!%s\nexec %s "$@"\n' ${sh} ${sh} > $out/bin/bash
      chmod 0555 $out/bin/bash
    '' { };

    coreutils = applets "coreutils" [
      "basename" "cat" "chmod" "chown" "cp" "cut" "date" "dd" "df" "dirname" "du" "echo"
      "env" "false" "head" "id" "ln" "ls" "mkdir" "mktemp" "mv" "nproc" "printf" "pwd"
      "readlink" "realpath" "rm" "rmdir" "seq" "sleep" "sort" "stat" "tail" "tee" "test"
      "touch" "tr" "true" "uname" "uniq" "wc" "yes"
    ];

    moreutils = scripts "moreutils" {
      sponge = ''
        #!${sh}
        # sponge [FILE]: soak up all of stdin, then write it to FILE (or stdout).
        tmp=$(mktemp)
        cat > "$tmp"
        if [ $# -gt 0 ]; then cat "$tmp" > "$1"; else cat "$tmp"; fi
        rm -f "$tmp"
      '';
      ifne = ''
        #!${sh}
        # ifne COMMAND...: run COMMAND only if stdin is not empty.
        tmp=$(mktemp)
        cat > "$tmp"
        if [ -s "$tmp" ]; then "$@" < "$tmp"; status=$?; else status=0; fi
        rm -f "$tmp"
        exit $status
      '';
      ts = ''
        #!${sh}
        exec ${busybox}/bin/busybox ts "$@"
      '';
    };

    nano = scripts "nano" {
      nano = ''
        #!${sh}
        exec ${busybox}/bin/busybox vi "$@"
      '';
    };

    hello = withMeta (scripts "hello" {
      hello = ''
        #!${sh}
        echo "Hello, world!"
      '';
    }) {
      description = "A program that produces a familiar, friendly greeting";
      homepage = "https://www.gnu.org/software/hello/manual/";
      license = licenses.gpl3Plus;
    };

    openssl = versioned "openssl" "3.0.13" [ ] {
      description = "A cryptographic library that implements the SSL and TLS protocols";
      homepage = "https://www.openssl.org/";
      license = licenses.asl20;
    };
    openssl_1_1 = versioned "openssl" "1.1.1w" [ ] {
      description = "A cryptographic library that implements the SSL and TLS protocols";
      homepage = "https://www.openssl.org/";
      license = licenses.openssl;
    };
    curl = versioned "curl" "8.4.0" [ self.openssl ] {
      description = "A command line tool for transferring files with URL syntax";
      homepage = "https://curl.se/";
      license = licenses.curl;
    };
    socat = versioned "socat" "1.7.4.4" [ self.openssl_1_1 ] {
      description = "Utility for bidirectional data transfer between two independent data channels";
      homepage = "http://www.dest-unreach.org/socat/";
      license = licenses.gpl2Only;
    };

    cacert = mk "nss-cacert" ''
      mkdir -p $out/etc/ssl/certs
      cp $bundle $out/etc/ssl/certs/ca-bundle.crt
      ln -s ca-bundle.crt $out/etc/ssl/certs/ca-certificates.crt
    '' { bundle = builtins.toFile "ca-bundle.crt" caText; };

    iana-etc = mk "iana-etc" ''
      mkdir -p $out/etc
      printf '%s' "$protocols" > $out/etc/protocols
      printf '%s' "$services" > $out/etc/services
    '' {
      protocols = ''
        # Internet (IP) protocols (a small offline excerpt)
        ip	0	IP
        icmp	1	ICMP
        tcp	6	TCP
        udp	17	UDP
        ipv6	41	IPv6
        ipv6-icmp	58	IPv6-ICMP
      '';
      services = ''
        # Network services (a small offline excerpt)
        ftp		21/tcp
        ssh		22/tcp
        smtp		25/tcp		mail
        domain		53/tcp
        domain		53/udp
        http		80/tcp		www
        https		443/tcp
        https		443/udp
      '';
    };

    xorg = {
      xev = scripts "xev" { xev = "#!${sh}\necho 'xev (offline stand-in)'\n"; };
      libX11 = mk "libX11" ''
        mkdir -p $out/lib
        printf 'not really a library\n' > $out/lib/libX11.so.6
      '' { };
    };

    camelCase = scripts "camel-case" { camel-case = "#!${sh}\necho camelCase\n"; };

    haskellPackages = {
      ShellCheck = scripts "ShellCheck" { shellcheck = "#!${sh}\necho 'shellcheck (offline stand-in)'\n"; };
    };

    _1password = scripts "1password" { "1password" = "#!${sh}\necho 1password\n"; };

    lib = { version = "offline"; };

    removed-alias = throw "removed-alias has been removed (offline set test case)";
    aborting-alias = abort "aborting-alias: aborts when forced (offline set test case)";
    recursive-alias = let loop = loop; in loop;
    overflowing-alias = let deeper = n: 1 + deeper (n + 1); in deeper 0;

    edge-cases = mk "edge-cases" ''
      mkdir -p $out/bin $out/lib $out/share/empty/nested $out/var/empty
      printf '#!%s\necho edge\n' ${sh} > $out/bin/run
      chmod 0555 $out/bin/run
      printf 'data\n' > $out/share/data.txt
      printf '#!/bin/sh\nexit 0\n' > $out/share/executable-outside-bin
      chmod 0555 $out/share/executable-outside-bin
      : > $out/share/empty-file
      printf 'one inode, three names\n' > $out/share/hardlink-a
      ln $out/share/hardlink-a $out/share/hardlink-b
      mkdir -p $out/share/hardlinks/sub
      ln $out/share/hardlink-a $out/share/hardlinks/sub/hardlink-c
      mkdir -p "$out/share/long/$dir60/$dir60"
      printf 'a long path\n' > "$out/share/long/$dir60/$dir60/$name120"
      ln -s "$name120" "$out/share/long/$dir60/link-with-a-long-target"
      ln -s ../share/data.txt $out/lib/relative-link
      ln -s ${busybox}/bin/busybox $out/bin/absolute-store-link
      ln -s /etc/hostname $out/lib/absolute-outside-link
      ln -s does-not-exist $out/lib/dangling-link
      ln -s loop-b $out/lib/loop-a
      ln -s loop-a $out/lib/loop-b
      ln -s ../share $out/lib/directory-link
      printf 'space\n' > "$out/share/with space.txt"
      printf 'utf-8\n' > "$out/share/$utf8name"
      mkdir -p $out/share/deep/a/b/c/d/e/f/g/h/i/j
      printf 'deep\n' > $out/share/deep/a/b/c/d/e/f/g/h/i/j/file
      printf '%s\n' ${self.hello} > $out/share/refers-to-hello
    '' {
      dir60 = repeat 60 "d";
      name120 = repeat 120 "n";
      utf8name = "ünïcödé.txt";
    };

    multiout = mk "multiout" ''
      mkdir -p $out/bin $man/share/man/man1
      printf '#!%s\necho multiout\n' ${sh} > $out/bin/multiout
      chmod 0555 $out/bin/multiout
      printf '.TH MULTIOUT 1\n' > $man/share/man/man1/multiout.1
    '' { outputs = [ "out" "man" ]; };

    broken-build = mk "broken-build" ''
      echo "broken-build: failing on purpose" >&2
      exit 3
    '' { };

    broken-eval = derivation {
      name = "broken-eval";
      inherit system;
      builder = throw "broken-eval: this package fails to evaluate on purpose";
    };

    # Hangs for as long as the Nix process that started it lives, then fails.
    # (Polling its parent keeps a killed Nix from leaving the builder behind;
    # /proc is used because `kill -0` from a build user to root fails.)
    slow = mk "slow" ''
      echo "slow: waiting for my Nix to go away" >&2
      while [ -d /proc/$PPID ]; do sleep 0.1; done
      exit 1
    '' { };
  };

  # What nixpkgs' meta says of the real packages these stand in for.
  metas = {
    bashInteractive = {
      description = "GNU Bourne-Again Shell, the de facto standard shell on Linux";
      homepage = "https://www.gnu.org/software/bash/";
      license = licenses.gpl3Plus;
    };
    coreutils = {
      description = "The GNU Core Utilities";
      homepage = "https://www.gnu.org/software/coreutils/";
      license = licenses.gpl3Plus;
    };
    moreutils = {
      description = "Growing collection of the unix tools that nobody thought to write long ago when unix was young";
      homepage = "https://joeyh.name/code/moreutils/";
      license = licenses.gpl2Plus;
    };
    nano = {
      description = "A small, user-friendly console text editor";
      homepage = "https://www.nano-editor.org/";
      license = licenses.gpl3Plus;
    };
    cacert = {
      description = "A bundle of X.509 certificates of public Certificate Authorities (CA)";
      homepage = "https://curl.se/docs/caextract.html";
      license = licenses.mpl20;
    };
    iana-etc = {
      description = "IANA protocol and port number assignments (/etc/protocols and /etc/services)";
      homepage = "https://www.iana.org/protocols";
      license = licenses.mit;
    };
  };

  self = base // builtins.mapAttrs (name: meta: withMeta base.${name} meta) metas;
in
self
