"""The public surface: what ``import nixery_core`` offers, and nothing by accident."""

from __future__ import annotations

import nixery_core
import nixery_core.testing


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, names only real attributes, and covers every public name."""
    assert nixery_core.__all__ == sorted(nixery_core.__all__)
    for name in nixery_core.__all__:
        assert hasattr(nixery_core, name), name
    public = {
        name for name, value in vars(nixery_core).items()
        if not name.startswith("_") and not isinstance(value, type(nixery_core))
    }
    assert public == set(nixery_core.__all__)


def test_heart_of_the_api_is_exported() -> None:
    """Image.from_name, build_image and BuildCache are reachable from the top level."""
    image = nixery_core.Image.from_name("shell/hello")
    assert image.canonical_name == "shell/hello"
    assert callable(nixery_core.build_image)
    assert nixery_core.BuildCache(None).stats == nixery_core.CacheStats()


def test_every_error_derives_from_the_root() -> None:
    """Every exported exception class is a NixeryError, so one except clause catches all."""
    for name in nixery_core.__all__:
        value = getattr(nixery_core, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, nixery_core.NixeryError), name


def test_testing_fakes_are_exported() -> None:
    """The fakes embedders use are importable from nixery_core.testing."""
    assert nixery_core.testing.__all__ == sorted(nixery_core.testing.__all__)
    for name in ("FakeNix", "FakePackage", "MemoryStore", "RecordingRunner", "ReplayRunner"):
        assert name in nixery_core.testing.__all__
        assert hasattr(nixery_core.testing, name)
