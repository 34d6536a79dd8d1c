# Resolve image package names to derivations, in one evaluation.
#
#   nix-instantiate --eval --strict --json --read-write-mode nix/resolve.nix \
#     --argstr packages '["bashInteractive","xorg.xev"]' \
#     --argstr source '{"type":"path","path":"/repo/nix/offline"}' \
#     --argstr system x86_64-linux
#
# Answers, as JSON on stdout, either every unknown name at once:
#
#   {"error":"not_found","pkgs":["nosuchpkg","xorg.nope"]}
#
# or one record per name, in the order given:
#
#   {"packages":[{"name":"xorg.xev","attrPath":["xorg","xev"],
#                 "drvPath":"/nix/store/...-xev.drv","outputName":"out",
#                 "outputPath":"/nix/store/...-xev",
#                 "meta":{"pname":"xev","version":"1.2.5","description":"...",
#                         "homepage":["https://..."],
#                         "licenses":[{"spdxId":"MIT","name":"MIT License","url":"..."}]}}, ...]}
#
# `meta` is package metadata for SBOMs, read as data: only strings from known
# fields (`pname`, `version`, `meta.description`, `meta.homepage`,
# `meta.license`), each forced under `tryEval`, so a field that is missing,
# of another type or throws is just null (or left out of its list).
#
# (Not "outPath": Nix prints any attribute set holding an outPath as that string.)
# `--read-write-mode` makes Nix write the .drv files, so that
# `nix-store --realise <drvPath>!<outputName>` can build them next.
# Only a package's default output (`outputName`, normally "out") is taken, as
# Nixery does; `pkg.man` selects another output explicitly.
#
# Arguments (all strings, so names are data and never Nix source):
#   packages  JSON list of names (see lookup.nix for the rules)
#   source    JSON source description (see load-pkgs.nix)
#   system    target system, e.g. "x86_64-linux" or "aarch64-linux"
#   expr      (optional, `--arg`, trusted callers only) a function from the
#             package set to a derivation, a list of derivations or an
#             attribute set of derivations, added to the answer under their
#             attribute names (or derivation names).  Never reachable from an
#             image name: nixery_core only passes it from realise_expression.
{ packages
, source
, system
, expr ? null
}:
let
  names = builtins.fromJSON packages;
  pkgs = import ./load-pkgs.nix { source = builtins.fromJSON source; inherit system; };
  lookup = import ./lookup.nix pkgs;

  checkedNames =
    if builtins.isList names && builtins.all builtins.isString names then names
    else throw "nixery: 'packages' must be a JSON list of strings";

  isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";
  sortedUnique = xs: builtins.attrNames (builtins.listToAttrs (map (n: { name = n; value = null; }) xs));

  looked = map (name: { inherit name; r = lookup name; }) checkedNames;
  missing = sortedUnique (map (x: x.name) (builtins.filter (x: !x.r.found) looked));

  # --- metadata, as data (never evaluated beyond these fields) ---
  try = v: default: let r = builtins.tryEval v; in if r.success then r.value else default;
  str = v: try (if builtins.isString v then v else null) null;
  strings = v:
    let l = try (if builtins.isList v then v else [ v ]) [ ];
    in builtins.filter (x: x != null) (map str l);
  license = l:
    if try (builtins.isString l) false then { spdxId = null; name = str l; url = null; }
    else if try (builtins.isAttrs l) false then {
      spdxId = str (l.spdxId or null);
      name = let full = str (l.fullName or null); in if full != null then full else str (l.shortName or null);
      url = str (l.url or null);
    }
    else null;
  metaOf = drv:
    let m = try (let v = drv.meta or { }; in if builtins.isAttrs v then v else { }) { };
    in {
      pname = str (drv.pname or null);
      version = str (drv.version or null);
      description = str (m.description or null);
      homepage = strings (m.homepage or [ ]);
      licenses = builtins.filter (x: x != null)
        (map license (try (let l = m.license or [ ]; in if builtins.isList l then l else [ l ]) [ ]));
    };

  record = name: attrPath: drv: {
    inherit name attrPath;
    drvPath = drv.drvPath;
    outputName = drv.outputName or "out";
    outputPath = drv.outPath;
    meta = metaOf drv;
  };

  exprValue = let v = if builtins.isFunction expr then expr pkgs else expr; in
    if builtins.isList v then
      builtins.listToAttrs (map (d: { name = d.name; value = d; }) v)
    else if isDerivation v then { ${v.name} = v; }
    else if builtins.isAttrs v then v
    else throw "nixery: 'expr' must give a derivation, a list or an attribute set of derivations";

  exprRecords =
    if expr == null then [ ]
    else map
      (n: let d = exprValue.${n}; in
        if isDerivation d then record n [ ] d
        else throw "nixery: 'expr' attribute '${n}' is not a derivation")
      (builtins.attrNames exprValue);
in
if missing != [ ] then { error = "not_found"; pkgs = missing; }
else { packages = map (x: record x.name x.r.attrPath x.r.value) looked ++ exprRecords; }
