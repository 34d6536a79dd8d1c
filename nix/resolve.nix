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
#                 "outputPath":"/nix/store/...-xev"}, ...]}
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

  record = name: attrPath: drv: {
    inherit name attrPath;
    drvPath = drv.drvPath;
    outputName = drv.outputName or "out";
    outputPath = drv.outPath;
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
