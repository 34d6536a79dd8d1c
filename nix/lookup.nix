# Name resolution, the way Nixery does it, with builtins only.
#
#   lookup pkgs "xorg.xev"          -> { found = true; attrPath = [ "xorg" "xev" ]; value = <drv>; }
#   lookup pkgs "haskellpackages"   -> haskellPackages (case-insensitive retry)
#   lookup pkgs "1password"         -> _1password     (digit-leading names get a "_")
#   lookup pkgs "\"; abort \"x"     -> { found = false; }
#
# A name is data: it is split on "." and each part is compared with attribute
# names.  It is never parsed or evaluated as Nix code, so quotes, "${...}",
# "../" or "/abs" in a name can only ever fail to match.
#
# Rules, per dot-separated segment, against the current attribute set:
#   1. the exact attribute name;
#   2. if the segment starts with a digit, "_" + segment;
#   3. otherwise the first attribute (in Nix's sorted attrNames order) whose
#      lower-cased name equals the lower-cased segment (or "_" + it).
# The case-insensitive retry applies at every level, so registry names (lower
# case only) reach nested camel-case attributes too (haskellpackages.shellcheck).
# Empty segments ("a..b", ".a", "a.") never match.
#
# The final value must be a derivation.  A segment whose value throws when
# forced (a removed alias, an unsupported attribute) counts as not found, as do
# attribute sets and functions that are not derivations.
let
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  startsWithDigit = s: builtins.match "[0-9].*" s != null;

  # builtins.split keeps the separators' match groups as lists; drop them.
  segments = name: builtins.filter builtins.isString (builtins.split "[.]" name);

  # Force `v` to weak head normal form without letting a `throw` escape.
  isAttrsSafe = v: let r = builtins.tryEval (builtins.isAttrs v); in r.success && r.value;
  # (builtins.isDerivation is not in Nix 2.8; this is nixpkgs' lib.isDerivation.)
  isDerivationSafe = v:
    let r = builtins.tryEval (builtins.isAttrs v && (v.type or null) == "derivation");
    in r.success && r.value;

  # Find one segment in an attribute set: { name, value } or null.
  findIn = set: seg:
    if seg == "" then null
    else if builtins.hasAttr seg set then { name = seg; value = set.${seg}; }
    else if startsWithDigit seg && builtins.hasAttr ("_" + seg) set then { name = "_" + seg; value = set.${"_" + seg}; }
    else
      let
        want = toLower seg;
        hits = builtins.filter (n: let l = toLower n; in l == want || l == "_" + want) (builtins.attrNames set);
      in
        if hits == [ ] then null
        else { name = builtins.head hits; value = set.${builtins.head hits}; };

  # Walk the segments; { found, attrPath, value }.
  walk = set: segs: path:
    if segs == [ ] then { found = true; attrPath = path; value = set; }
    else if !(isAttrsSafe set) then { found = false; }
    else
      let hit = findIn set (builtins.head segs);
      in
        if hit == null then { found = false; }
        else walk hit.value (builtins.tail segs) (path ++ [ hit.name ]);

in
pkgs: name:
let
  segs = segments name;
  r = if !(builtins.isString name) || segs == [ ] then { found = false; } else walk pkgs segs [ ];
in
  if r.found && isDerivationSafe r.value then r else { found = false; }
