# Is one package name found, evaluating nothing but its lookup?
#
#   nix-instantiate --eval --strict --json nix/probe.nix \
#     --argstr name hello --argstr source '{"type":"path",...}' --argstr system x86_64-linux
#
# Prints `true` or `false`.  nixery_core runs it only after resolve.nix failed
# with an error `builtins.tryEval` cannot catch (`abort`, infinite recursion,
# a stack overflow): one call per name finds the names whose attribute cannot
# be forced, which are then reported as unknown, like a throwing alias.  The
# name "" only loads the package set, to tell a broken set from a broken name.
{ name, source, system }:
let
  pkgs = import ./load-pkgs.nix { source = builtins.fromJSON source; inherit system; };
  lookup = import ./lookup.nix pkgs;
in
builtins.seq (builtins.isAttrs pkgs) (if name == "" then true else (lookup name).found)
