# The package set a source description names (see nixery_core/sources.py):
#
#   { "type": "nixpkgs", "url": "https://.../nixpkgs/archive/<rev>.tar.gz" [, "sha256": ...] }
#       import (builtins.fetchTarball url) { system; config = { }; overlays = [ ]; }
#   { "type": "git", "url": ..., "rev": "<40 hex>" }     builtins.fetchGit, any ref (allRefs)
#   { "type": "git", "url": ..., "ref": "<branch/tag>" } builtins.fetchGit of that ref
#       import <checkout> { system; }
#   { "type": "path", "path": "/absolute/dir" }
#       import /absolute/dir { system; }
#
# nixpkgs gets an empty config and no overlays so that a user's
# ~/.config/nixpkgs cannot change what an image contains.  Git and path
# sources may hold any nixpkgs-style set, so they only get `system`.
# Only builtins are used: this works with any package set, in a sandbox too.
{ source, system }:
let
  has = builtins.hasAttr;
  req = key:
    if has key source && builtins.isString source.${key} then source.${key}
    else throw "nixery: source description lacks the string field '${key}'";
  type = req "type";
in
if type == "nixpkgs" then
  import
    (builtins.fetchTarball ({ url = req "url"; } // (if has "sha256" source then { sha256 = req "sha256"; } else { })))
    { inherit system; config = { }; overlays = [ ]; }
else if type == "git" then
  import
    (builtins.fetchGit ({ url = req "url"; }
      // (if has "rev" source then { rev = req "rev"; allRefs = true; } else { ref = req "ref"; })))
    { inherit system; }
else if type == "path" then
  let path = req "path"; in
  if builtins.substring 0 1 path != "/" then throw "nixery: source path '${path}' is not absolute"
  else import (/. + path) { inherit system; }
else throw "nixery: unknown source type '${type}'"
