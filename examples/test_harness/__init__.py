"""How an embedder tests code that builds with a ``Builder``, without Nix.

``publisher.py`` is the embedder's code: it publishes one image per
service and writes a lock file of digests.  ``test_publisher.py`` is its
test suite: the code under test takes a :class:`~nixery_core.builder.Builder`,
and the tests pass one made of the fakes :mod:`nixery_core.testing` ships:

- :class:`~nixery_core.testing.runners.FakeNix` plays Nix for a declared
  package set, writing real files into a temporary ``/nix/store``, so the
  whole pipeline (layering, packing, hashing) runs for real;
- :class:`~nixery_core.testing.runners.RecordingRunner` and
  :class:`~nixery_core.testing.runners.ReplayRunner` record a session and
  replay it: pin an exact Nix answer (an error, an output format) and
  check the code under test asks the same questions again;
- :class:`~nixery_core.testing.storage.MemoryStore` is the blob store, with
  counters and injected failures.

Run it like any suite: ``python -m pytest examples/test_harness``
(``tests/test_test_harness.py`` does exactly that).
"""
