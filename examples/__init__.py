"""Examples built on nixery_core: an on-demand registry, a notebook, a test harness.

They are importable (``python -m examples.registry``) so that the test suite
runs them as they are shipped.
"""
