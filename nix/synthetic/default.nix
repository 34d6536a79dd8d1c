# A parameterised synthetic package set for benchmarks: N packages with a
# chosen dependency shape and deterministic content, built offline from the
# host's static busybox (see ../offline/lib.nix).  nixpkgs-style: an attribute
# set of derivations named <prefix><index>, zero-padded to at least 4 digits
# (p0000, p0001, ...), plus `names`, the list of those names.
#
# Arguments (all optional):
#   system     derivations' system (default: the host's)
#   count      number of packages (default 20)
#   shape      dependency shape (default "dag"):
#                "none"   no dependencies
#                "chain"  p(i) depends on p(i-1)
#                "star"   every p(i), i > 0, depends on p(0)
#                "dag"    p(i) depends on 1..fanout packages drawn from p(0..i-1)
#   fanout     most dependencies per package for "dag" (default 3)
#   seed       integer seed for the DAG, the sizes and the content (default 1)
#   minSize    smallest content size per package, bytes (default 4096)
#   maxSize    largest content size per package, bytes (default 65536);
#              each package's size is drawn from [minSize, maxSize]
#   mode       where the content comes from (default "random"):
#                "random" `files` text files of pseudo-random words (busybox
#                         awk with srand(seed), ~8 MB/s); gzip ratio ~2.7
#                "host"   real files copied from `hostPaths` (binaries,
#                         libraries, documentation): the host's files, sorted
#                         by path, are dealt out round-robin, package i taking
#                         files i, i+count, ... until it holds its size
#   files      files per package in "random" mode (default 4)
#   hostPaths  directories for "host" mode (default /usr/bin,
#              /usr/lib/x86_64-linux-gnu, /usr/share/doc; missing ones are
#              skipped).  They are imported with builtins.path, so the set
#              stays pure and rebuilds when a host file changes; the price is
#              that every evaluation hashes them again (~5 s for 1.4 GB).
#   hostStorePaths  store paths already holding such trees (e.g. from
#              `nix-store --add /usr/bin`); used instead of hostPaths and
#              not hashed again (builtins.storePath), for repeated builds
#   prefix     package name prefix (default "p")
#   embedReferences  "host" mode: every executable or shared-library file
#              gets its package's dependency paths written into it after its
#              first 512 bytes, as a RUNPATH or a shebang puts them there
#              (default false).  A dependency with a new store path then
#              changes these files in a few bytes only, as in Nix.
#   revisions  attribute set from package index (as a string) to a revision
#              number (default {}): "host" mode package i at revision r > 0
#              takes other host files (the r-th next run of its share of
#              the index, files no package has at revision 0): a new version
#              of that package, and so a new store path for it and for every
#              package that depends on it.
#   busyboxDir directory holding a static `busybox` (default /usr/bin)
#
# Every package also has nix-support/depends listing its dependencies' store
# paths, which is what makes them runtime references.
# Example: a 300 MB+ realistic set:
#   import ./nix/synthetic { count = 60; shape = "dag"; mode = "host";
#                            minSize = 4000000; maxSize = 8000000; }
{ system ? builtins.currentSystem
, count ? 20
, shape ? "dag"
, fanout ? 3
, seed ? 1
, minSize ? 4096
, maxSize ? 65536
, mode ? "random"
, files ? 4
, hostPaths ? [ /usr/bin /usr/lib/x86_64-linux-gnu /usr/share/doc ]
, hostStorePaths ? null
, prefix ? "p"
, embedReferences ? false
, revisions ? { }
, busyboxDir ? /usr/bin
, ...
}:
let
  inherit (import ../offline/lib.nix { inherit system busyboxDir; }) mk;

  check = cond: msg: if cond then true else throw "nixery synthetic: ${msg}";
  valid =
    check (builtins.isInt count && count >= 0) "count must be a non-negative integer"
    && check (builtins.elem shape [ "none" "chain" "star" "dag" ]) "shape must be none, chain, star or dag"
    && check (builtins.isInt fanout && fanout >= 1) "fanout must be >= 1"
    && check (builtins.isInt seed) "seed must be an integer"
    && check (builtins.isInt minSize && minSize >= 0 && maxSize >= minSize) "need 0 <= minSize <= maxSize"
    && check (builtins.elem mode [ "random" "host" ]) "mode must be random or host"
    && check (builtins.isInt files && files >= 1) "files must be >= 1";

  mod = a: b: a - (a / b) * b;

  # A stateless pseudo-random integer in [0, 2^28) for (i, j): sha256 of the
  # seed and indices, first 7 hex digits read through TOML's hex integers.
  rand = i: j:
    let h = builtins.hashString "sha256" "${toString seed}/${toString i}/${toString j}";
    in (builtins.fromTOML "v = 0x${builtins.substring 0 7 h}").v;

  width = let digits = builtins.stringLength (toString count); in if digits < 4 then 4 else digits;
  pad = n: let s = toString n; l = builtins.stringLength s; in
    if l >= width then s else builtins.concatStringsSep "" (builtins.genList (_: "0") (width - l)) + s;
  nameOf = i: prefix + pad i;

  unique = xs: builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ] xs;

  depsOf = i:
    if i == 0 || shape == "none" then [ ]
    else if shape == "chain" then [ (i - 1) ]
    else if shape == "star" then [ 0 ]
    else builtins.sort builtins.lessThan
      (unique (builtins.genList (j: mod (rand i (j + 1)) i) (1 + mod (rand i 0) fanout)));

  sizeOf = i: minSize + mod (rand i (-1)) (maxSize - minSize + 1);

  hostTrees =
    if hostStorePaths != null then map builtins.storePath hostStorePaths
    else map
      (p: builtins.path {
        path = p;
        name = "synthetic-host-" + baseNameOf (toString p);
        filter = _: t: t == "regular" || t == "directory" || t == "symlink";
      })
      (builtins.filter builtins.pathExists hostPaths);

  # Every regular file of the host trees as "<size> <path>", shuffled
  # deterministically by a hash of the path below the tree, so that binaries,
  # libraries and text are dealt out evenly.  Built once, read by every package.
  hostIndex = mk "synthetic-host-index" ''
    find $hostTrees -type f -print0 | xargs -0 stat -c '%s %n' | awk '
      BEGIN { for (i = 32; i < 127; i++) ord[sprintf("%c", i)] = i }
      {
        p = $0
        sub(/^[0-9]+ \/nix\/store\/[^-\/]*-/, "", p)
        h = 7
        for (i = 1; i <= length(p); i++) h = (h * 31 + ord[substr(p, i, 1)]) % 1000000007
        print h, $0
      }' | sort -n | cut -d' ' -f2- > $out
  '' { inherit hostTrees; };

  # A vocabulary of 2048 pseudo-words (letters in English-like frequency),
  # then lines of 4..15 words; ~8 MB/s with busybox awk, gzip ratio ~2.7.
  randomScript = ''
    mkdir -p $out/share/synthetic
    awk -v seed="$contentSeed" -v size="$size" -v files="$files" -v dir="$out/share/synthetic" '
      BEGIN {
        srand(seed)
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        nw = 2048
        for (i = 0; i < nw; i++) {
          len = 1 + int(rand() * 9); w = ""
          for (k = 0; k < len; k++) w = w substr(letters, 1 + int(rand() * rand() * 26), 1)
          words[i] = w
        }
        per = int(size / files)
        for (f = 0; f < files; f++) {
          name = sprintf("%s/file-%03d.txt", dir, f)
          want = (f == files - 1) ? size - per * (files - 1) : per
          printf "" > name
          n = 0
          while (n < want) {
            line = words[int(rand() * nw)]
            m = 3 + int(rand() * 12)
            for (k = 0; k < m; k++) line = line " " words[int(rand() * rand() * nw)]
            if (length(line) + 1 > want - n) line = substr(line, 1, want - n - 1)
            print line > name
            n += length(line) + 1
          }
          close(name)
        }
      }'
  '';

  # Package i takes index lines i, i+count, ... while it stays within its
  # size (the first file is always taken), keeping the path below the tree.
  hostScript = ''
    mkdir -p $out/share/synthetic
    awk -v count="$count" -v idx="$index" -v size="$size" -v skip="$revision" '
      (NR - 1) % count == idx {
        s = $1
        if (phase < skip) {
          skipped += s
          if (skipped >= size) { phase++; skipped = 0 }
          next
        }
        if (total == 0 || total + s <= size) { p = $0; sub(/^[0-9]+ /, "", p); print p; total += s }
        if (total >= size) exit
      }' $hostIndex > $TMPDIR/files
    while IFS= read -r f; do
      rel=''${f#/nix/store/*-}
      rel=''${rel#synthetic-host-}
      mkdir -p "$out/share/synthetic/$(dirname "$rel")"
      dest="$out/share/synthetic/$rel"
      embed=
      if [ -n "$embedReferences" ]; then
        case "$rel" in *.so|*.so.*) embed=1 ;; esac
        [ -x "$f" ] && embed=1
      fi
      if [ -n "$embed" ] && [ -n "$deps" ]; then
        { head -c 512 "$f"; printf 'RUNPATH=%s\0' "$deps"; tail -c +513 "$f"; } > "$dest"
        [ -x "$f" ] && chmod 0555 "$dest"
      else
        cp "$f" "$dest"
      fi
    done < $TMPDIR/files
  '';

  package = i: mk (nameOf i)
    (''
      mkdir -p $out/nix-support
      : > $out/nix-support/depends
      for d in $deps; do echo "$d" >> $out/nix-support/depends; done
    '' + (if mode == "random" then randomScript else hostScript))
    ({
      deps = map (d: self.${nameOf d}) (depsOf i);
      size = sizeOf i;
    } // (if mode == "random"
      then { inherit files; contentSeed = mod (seed * 100003 + i) 2147483647; }
      else {
        inherit hostIndex count;
        index = i;
        revision = revisions.${toString i} or 0;
        embedReferences = if embedReferences then "1" else "";
      }));

  names = builtins.genList nameOf count;

  self = builtins.listToAttrs (builtins.genList (i: { name = nameOf i; value = package i; }) count);
in
assert valid;
self // { inherit names; }
