"""The layering simulator: a synthetic nixpkgs-like package set and the measures run on it.

Not part of the runtime library (the wheel ships only ``nixery_core``):
:mod:`nixery_core_sim.universe` generates seeded package sets and their
weekly revisions, :mod:`nixery_core_sim.evaluation` measures layering
strategies on them (``benchmarks/layering_sim.py`` is the command line;
``docs/layering.md`` has the figures).
"""
