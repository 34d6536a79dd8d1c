"""Fakes for embedders' tests: a recording/replaying Nix runner, an in-memory store.

Filled in by nixery_core.testing.runners and nixery_core.testing.storage.
"""
