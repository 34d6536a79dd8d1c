# Building blocks shared by the offline package set and the synthetic
# generator: a builder made from the host's static busybox, and no stdenv.
#
#   busyboxDir  a directory holding a *static* busybox binary named `busybox`
#               (Debian's busybox-static installs /usr/bin/busybox).  Only that
#               one file is imported into the store.  busybox picks its applet
#               from argv[0], which is why the store file keeps its name.
#   system      the derivations' `system`.  The builder is always the host
#               binary, so an aarch64-linux set built on an x86_64 host runs
#               x86_64 busybox (realise it with `--option extra-platforms
#               aarch64-linux`); its files are still marked with the target.
#   salt        any string; when not empty it is added to every derivation, so
#               a benchmark gets fresh (never built) store paths without
#               deleting anything from a store others use.
{ system, busyboxDir, salt ? "" }:
let
  bbsrc = builtins.path {
    path = busyboxDir;
    name = "busybox-static";
    filter = p: t: baseNameOf p == "busybox";
  };

  # A derivation whose builder is `busybox sh -c <script>` (with `set -eu`).
  # busybox's shell runs its applets (mkdir, cp, ln, awk...) without a PATH.
  # Extra attributes become environment variables, as with any derivation.
  mk = name: script: extra: derivation ({
    inherit name system;
    builder = "${bbsrc}/busybox";
    args = [ "sh" "-c" ("set -eu\n" + script) ];
  } // (if salt == "" then { } else { inherit salt; }) // extra);

  # busybox itself: bin/busybox (a copy) plus a relative symlink per applet,
  # and a marker naming the target system, so the x86_64 and aarch64 sets
  # differ in content as well as in their derivations.
  busybox = mk "busybox" ''
    mkdir -p $out/bin $out/share/nixery-offline
    cp $bbsrc/busybox $out/bin/busybox
    chmod 0555 $out/bin/busybox
    for applet in $($out/bin/busybox --list); do
      if [ "$applet" != busybox ]; then ln -s busybox "$out/bin/$applet"; fi
    done
    printf 'host busybox packaged for %s\n' "$system" > $out/share/nixery-offline/system
  '' { inherit bbsrc; };
in
{
  inherit bbsrc mk busybox;
}
