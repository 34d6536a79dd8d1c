"""RecentErrors: a bounded, thread-safe, newest-first record of build failures."""

from __future__ import annotations

import threading

import pytest

from nixery_core.errors import InvalidInput, NixBuildFailed, UnknownPackages
from nixery_core.names import Image
from nixery_core.recent_errors import MAX_MESSAGE, BuildFailure, RecentErrors


class Clock:
    """A clock that ticks one second per reading."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_records_newest_first_with_clock_time() -> None:
    """snapshot() lists failures newest first, each stamped by the injected clock."""
    clock = Clock()
    errors = RecentErrors(clock=clock)
    errors.record("a:latest", RuntimeError("first"))
    errors.record("b:latest", RuntimeError("second"))
    first, second = clock.now - 1, clock.now
    assert [(f.image_reference, f.message, f.at) for f in errors.snapshot()] == [
        ("b:latest", "second", second),
        ("a:latest", "first", first),
    ]


def test_capacity_bounds_the_record() -> None:
    """Only the newest `capacity` failures are kept; older ones fall off."""
    errors = RecentErrors(capacity=3, clock=Clock())
    for i in range(7):
        errors.record(f"img{i}", ValueError(str(i)))
    assert [f.message for f in errors.snapshot()] == ["6", "5", "4"]
    assert len(errors) == 3


def test_unknown_packages_are_listed() -> None:
    """An UnknownPackages failure carries the unknown names; the image is named by reference."""
    errors = RecentErrors(clock=Clock())
    image = Image.from_name("shell/gitt/htopp")
    failure = errors.record(image, UnknownPackages(["htopp", "gitt"]))
    assert failure.image_reference == "shell/gitt/htopp:latest"
    assert failure.error_type == "UnknownPackages"
    assert failure.packages == ("gitt", "htopp")
    other = errors.record(image, NixBuildFailed(["nix-build"], 1, "boom"))
    assert other.packages == ()
    assert "boom" in other.message


def test_huge_messages_are_cut() -> None:
    """A failure message longer than MAX_MESSAGE is cut, so memory stays bounded."""
    errors = RecentErrors(clock=Clock())
    failure = errors.record("x", RuntimeError("y" * (MAX_MESSAGE * 5)))
    assert len(failure.message) == MAX_MESSAGE
    assert failure.message.endswith("...")


def test_empty_message_falls_back_to_the_type() -> None:
    """An exception without a message is still described (by its type name)."""
    failure = BuildFailure.from_exception("x", KeyError(), 0.0)
    assert failure.message == "KeyError"


def test_clear_forgets_everything() -> None:
    """clear() empties the record."""
    errors = RecentErrors(clock=Clock())
    errors.record("x", RuntimeError("boom"))
    errors.clear()
    assert errors.snapshot() == ()


def test_recording_records_and_reraises() -> None:
    """recording() records a failure raised in the block and lets it propagate unchanged."""
    errors = RecentErrors(clock=Clock())
    boom = UnknownPackages(["nope"])
    with pytest.raises(UnknownPackages) as caught, errors.recording("nope:latest"):
        raise boom
    assert caught.value is boom
    assert errors.snapshot()[0].packages == ("nope",)


def test_recording_success_and_interrupts_leave_no_record() -> None:
    """A block that succeeds, or is interrupted (KeyboardInterrupt), records nothing."""
    errors = RecentErrors(clock=Clock())
    with errors.recording("ok"):
        pass
    with pytest.raises(KeyboardInterrupt), errors.recording("ctrl-c"):
        raise KeyboardInterrupt
    assert errors.snapshot() == ()


def test_recording_kinds_filter() -> None:
    """recording(kinds=...) records only the given exception types (all still propagate)."""
    errors = RecentErrors(clock=Clock())
    with pytest.raises(TypeError), errors.recording("t", kinds=(ValueError,)):
        raise TypeError("not recorded")
    with pytest.raises(ValueError, match="recorded"), errors.recording("v", kinds=(ValueError,)):
        raise ValueError("recorded")
    assert [f.error_type for f in errors.snapshot()] == ["ValueError"]


@pytest.mark.parametrize("capacity", [0, -1, True, 2.5])
def test_bad_capacity_is_invalid_input(capacity: object) -> None:
    """A capacity that is not a positive integer is refused with InvalidInput."""
    with pytest.raises(InvalidInput):
        RecentErrors(capacity=capacity)  # type: ignore[arg-type]


def test_concurrent_records_are_all_counted_up_to_capacity() -> None:
    """Threads recording at once lose nothing and never exceed the capacity."""
    errors = RecentErrors(capacity=1000, clock=Clock())
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        barrier.wait()
        for i in range(200):
            errors.record(f"t{n}", RuntimeError(str(i)))
            errors.snapshot()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = errors.snapshot()
    assert len(snapshot) == 1000
    assert len({(f.image_reference, f.message) for f in snapshot}) == 1000
